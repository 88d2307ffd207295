// Sparse convolution compute on the CPU: fused gather-GEMM-scatter driven by neighbour tables.
//
// Forward and input gradient are the same kernel (the input gradient runs it with the
// transposed table and transposed weights). Each thread owns a block of output rows and sums
// the kernel offsets in a fixed order, so there are no atomics and results are bitwise
// independent of the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "spconv_lite/checks.h"

namespace spconv_lite {
namespace {

// out[o] = sum_k in[nbr[o, k]] @ weight[k]  with weight [K, C_in, C_out].
template <typename scalar_t>
void gather_gemm_scatter(const scalar_t* in, const scalar_t* weight, const int32_t* nbr,
                         scalar_t* out, int64_t rows, int64_t volume, int64_t c_in,
                         int64_t c_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, volume * c_in * c_out / 64));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(c_out);
    for (int64_t o = begin; o < end; ++o) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int32_t* row_nbr = nbr + o * volume;
      for (int64_t k = 0; k < volume; ++k) {
        const int64_t i = row_nbr[k];
        if (i < 0) continue;
        const scalar_t* x = in + i * c_in;
        const scalar_t* w = weight + k * c_in * c_out;
        for (int64_t ci = 0; ci < c_in; ++ci) {
          const acc_t xv = static_cast<acc_t>(x[ci]);
          const scalar_t* w_row = w + ci * c_out;
          acc_t* a = acc.data();
          for (int64_t co = 0; co < c_out; ++co) a[co] += xv * static_cast<acc_t>(w_row[co]);
        }
      }
      scalar_t* y = out + o * c_out;
      for (int64_t co = 0; co < c_out; ++co) y[co] = static_cast<scalar_t>(acc[co]);
    }
  });
}

at::Tensor sparse_conv_cpu(const at::Tensor& features, const at::Tensor& weight,
                           const at::Tensor& nbr, const at::Tensor& nbr_t) {
  check_features(features, "features");
  TORCH_CHECK_VALUE(weight.dim() == 3, "weight must be [K, C_in, C_out], got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == features.scalar_type(), "weight dtype ",
                   weight.scalar_type(), " must match features dtype ", features.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == features.size(1), "weight expects ", weight.size(1),
                    " input channels but features has ", features.size(1));
  const int64_t volume = weight.size(0);
  check_neighbor_table(nbr, "nbr", -1, volume);
  check_neighbor_table(nbr_t, "nbr_t", features.size(0), volume);
  check_neighbor_entries_cpu(nbr, "nbr", features.size(0));
  const at::Tensor x = features.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor table = nbr.contiguous();
  at::Tensor out = at::empty({nbr.size(0), weight.size(2)}, features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "sparse_conv_cpu", [&] {
                                    gather_gemm_scatter<scalar_t>(
                                        x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                        table.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
                                        out.size(0), volume, w.size(1), w.size(2));
                                  });
  return out;
}

// grad_weight[k] = sum over pairs (i, o) of offset k of in[i]^T grad_out[o]. One thread owns
// each offset k, and pairs are summed in output-row order: deterministic.
template <typename scalar_t>
void weight_grad_kernel(const scalar_t* in, const scalar_t* grad_out, const int32_t* nbr,
                        scalar_t* grad_weight, int64_t rows, int64_t volume, int64_t c_in,
                        int64_t c_out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, volume, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(c_in * c_out);
    for (int64_t k = begin; k < end; ++k) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t o = 0; o < rows; ++o) {
        const int64_t i = nbr[o * volume + k];
        if (i < 0) continue;
        const scalar_t* x = in + i * c_in;
        const scalar_t* g = grad_out + o * c_out;
        for (int64_t ci = 0; ci < c_in; ++ci) {
          const acc_t xv = static_cast<acc_t>(x[ci]);
          acc_t* a = acc.data() + ci * c_out;
          for (int64_t co = 0; co < c_out; ++co) a[co] += xv * static_cast<acc_t>(g[co]);
        }
      }
      scalar_t* dst = grad_weight + k * c_in * c_out;
      for (int64_t j = 0; j < c_in * c_out; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
    }
  });
}

at::Tensor sparse_conv_weight_grad_cpu(const at::Tensor& features, const at::Tensor& grad_out,
                                       const at::Tensor& nbr) {
  check_features(features, "features");
  check_features(grad_out, "grad_out");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == features.scalar_type(), "grad_out dtype ",
                   grad_out.scalar_type(), " must match features dtype ",
                   features.scalar_type());
  check_neighbor_table(nbr, "nbr", grad_out.size(0), -1);
  check_neighbor_entries_cpu(nbr, "nbr", features.size(0));
  const at::Tensor x = features.contiguous();
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor table = nbr.contiguous();
  const int64_t volume = nbr.size(1);
  at::Tensor grad_weight =
      at::empty({volume, features.size(1), grad_out.size(1)}, features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "sparse_conv_weight_grad_cpu", [&] {
                                    weight_grad_kernel<scalar_t>(
                                        x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                        table.data_ptr<int32_t>(),
                                        grad_weight.data_ptr<scalar_t>(), g.size(0), volume,
                                        x.size(1), g.size(1));
                                  });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CPU, m) {
  m.impl("sparse_conv", &sparse_conv_cpu);
  m.impl("sparse_conv_weight_grad", &sparse_conv_weight_grad_cpu);
}

}  // namespace spconv_lite
