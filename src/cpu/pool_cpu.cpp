// Sparse pooling on the CPU over the same neighbour tables as convolution.
//
// Sum pooling (average pooling divides by the active count in Python) and max pooling with its
// backward. Every loop writes only the rows its thread owns: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "spconv_lite/checks.h"

namespace spconv_lite {
namespace {

constexpr int64_t kPoolGrain = 256;

void check_pool_inputs(const at::Tensor& features, const at::Tensor& nbr,
                       const at::Tensor& nbr_t) {
  check_features(features, "features");
  check_neighbor_table(nbr, "nbr", -1, -1);
  check_neighbor_table(nbr_t, "nbr_t", features.size(0), nbr.size(1));
  check_neighbor_entries_cpu(nbr, "nbr", features.size(0));
}

// dst[r, c] = sum over k of src[table[r, k], c] where include(r, table[r, k], c) holds, summed in
// offset order by the thread that owns row r.
template <typename scalar_t, typename Include>
void sum_over_neighbors(const scalar_t* src, const int32_t* table, int64_t rows, int64_t volume,
                        int64_t channels, scalar_t* dst, const Include& include) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, kPoolGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(channels);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < volume; ++k) {
        const int64_t n = table[r * volume + k];
        if (n < 0) continue;
        for (int64_t c = 0; c < channels; ++c) {
          if (include(r, n, c)) acc[c] += static_cast<acc_t>(src[n * channels + c]);
        }
      }
      for (int64_t c = 0; c < channels; ++c) dst[r * channels + c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

// out[o] = sum over k of in[nbr[o, k]].
at::Tensor sparse_sum_pool_cpu(const at::Tensor& features, const at::Tensor& nbr,
                               const at::Tensor& nbr_t) {
  check_pool_inputs(features, nbr, nbr_t);
  const at::Tensor x = features.contiguous();
  const at::Tensor table = nbr.contiguous();
  const int64_t rows = nbr.size(0), volume = nbr.size(1), channels = features.size(1);
  at::Tensor out = at::empty({rows, channels}, features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "sparse_sum_pool_cpu", [&] {
    sum_over_neighbors(x.data_ptr<scalar_t>(), table.data_ptr<int32_t>(), rows, volume, channels,
                       out.data_ptr<scalar_t>(), [](int64_t, int64_t, int64_t) { return true; });
  });
  return out;
}

// out[o, c] = max over active k of in[nbr[o, k], c]; argmax[o, c] = that input row (the first
// offset wins ties; NaN propagates and, as in F.max_pool3d, the last NaN is the argmax).
std::tuple<at::Tensor, at::Tensor> sparse_max_pool_cpu(const at::Tensor& features,
                                                       const at::Tensor& nbr,
                                                       const at::Tensor& nbr_t) {
  check_pool_inputs(features, nbr, nbr_t);
  const at::Tensor x = features.contiguous();
  const at::Tensor table = nbr.contiguous();
  const int64_t rows = nbr.size(0), volume = nbr.size(1), channels = features.size(1);
  at::Tensor out = at::empty({rows, channels}, features.options());
  at::Tensor argmax = at::empty({rows, channels}, features.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "sparse_max_pool_cpu", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const int32_t* t = table.data_ptr<int32_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    int32_t* arg = argmax.data_ptr<int32_t>();
    at::parallel_for(0, rows, kPoolGrain, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        scalar_t* y_row = y + o * channels;
        int32_t* arg_row = arg + o * channels;
        std::fill(arg_row, arg_row + channels, -1);
        for (int64_t k = 0; k < volume; ++k) {
          const int32_t i = t[o * volume + k];
          if (i < 0) continue;
          const scalar_t* x_row = in + static_cast<int64_t>(i) * channels;
          for (int64_t c = 0; c < channels; ++c) {
            const scalar_t v = x_row[c];
            const bool take = arg_row[c] < 0 || v > y_row[c] || v != v;
            if (take) {
              y_row[c] = v;
              arg_row[c] = i;
            }
          }
        }
        // An output site always has an active input (that is how it was created); keep rows of a
        // hand-made table without one well defined.
        for (int64_t c = 0; c < channels; ++c) {
          if (arg_row[c] < 0) y_row[c] = scalar_t(0);
        }
      }
    });
  });
  return {out, argmax};
}

// grad_in[i, c] = sum of grad_out[o, c] over the outputs o that took their maximum from i.
// Walks the transposed table so that each thread writes only its own input rows.
at::Tensor sparse_max_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& argmax,
                                        const at::Tensor& nbr_t) {
  check_features(grad_out, "grad_out");
  TORCH_CHECK_VALUE(argmax.sizes() == grad_out.sizes(), "argmax shape ", argmax.sizes(),
                    " must equal grad_out shape ", grad_out.sizes());
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kInt, "argmax must be int32, got ",
                   argmax.scalar_type());
  check_neighbor_table(nbr_t, "nbr_t", -1, -1);
  check_neighbor_entries_cpu(nbr_t, "nbr_t", grad_out.size(0));
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor arg = argmax.contiguous();
  const at::Tensor table = nbr_t.contiguous();
  const int64_t rows = nbr_t.size(0), volume = nbr_t.size(1), channels = grad_out.size(1);
  at::Tensor grad_in = at::empty({rows, channels}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(),
                                  "sparse_max_pool_backward_cpu", [&] {
    const int32_t* arg_rows = arg.data_ptr<int32_t>();
    sum_over_neighbors(g.data_ptr<scalar_t>(), table.data_ptr<int32_t>(), rows, volume, channels,
                       grad_in.data_ptr<scalar_t>(), [&](int64_t i, int64_t o, int64_t c) {
                         return arg_rows[o * channels + c] == i;
                       });
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CPU, m) {
  m.impl("sparse_sum_pool", &sparse_sum_pool_cpu);
  m.impl("sparse_max_pool", &sparse_max_pool_cpu);
  m.impl("sparse_max_pool_backward", &sparse_max_pool_backward_cpu);
}

}  // namespace spconv_lite
