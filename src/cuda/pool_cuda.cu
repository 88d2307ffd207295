// Sparse pooling on the GPU over the same neighbour tables as convolution: the kernels of
// src/cpu/pool_cpu.cpp with one thread per (row, channel).
//
// Each thread reduces the kernel offsets of its own output element in offset order, exactly as
// the CPU loop does, so the results are deterministic and equal to the CPU's (bitwise for max
// pooling and its backward; sums in the same order, in float32 for half types). No atomics, no
// host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "spconv_lite/checks.h"
#include "spconv_lite/cuda_utils.cuh"

namespace spconv_lite {
namespace {

using cuda::blocks_for;
using cuda::current_stream;
using cuda::kThreads;
using cuda::table_entry;

void check_pool_inputs(const at::Tensor& features, const at::Tensor& nbr,
                       const at::Tensor& nbr_t) {
  check_features(features, "features");
  check_device(nbr, "nbr", features.device());
  check_device(nbr_t, "nbr_t", features.device());
  check_neighbor_table(nbr, "nbr", -1, -1);
  check_neighbor_table(nbr_t, "nbr_t", features.size(0), nbr.size(1));
  cuda::check_neighbor_entries_cuda(nbr, "nbr", features.size(0));
}

// out[o, c] = sum over k of in[nbr[o, k], c].
template <typename scalar_t>
__global__ void sum_pool_kernel(const scalar_t* __restrict__ in, const int32_t* __restrict__ nbr,
                                scalar_t* __restrict__ out, int64_t rows, int64_t volume,
                                int64_t channels, int64_t in_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = rows * channels;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t o = e / channels;
    const int64_t c = e - o * channels;
    acc_t acc = 0;
    for (int64_t k = 0; k < volume; ++k) {
      const int64_t i = table_entry(nbr, o * volume + k, in_rows);
      if (i >= 0) acc += static_cast<acc_t>(in[i * channels + c]);
    }
    out[e] = static_cast<scalar_t>(acc);
  }
}

// out[o, c] = max over active k of in[nbr[o, k], c]; argmax = that input row. The first offset
// wins ties and the last NaN wins, as on the CPU.
template <typename scalar_t>
__global__ void max_pool_kernel(const scalar_t* __restrict__ in, const int32_t* __restrict__ nbr,
                                scalar_t* __restrict__ out, int32_t* __restrict__ argmax,
                                int64_t rows, int64_t volume, int64_t channels,
                                int64_t in_rows) {
  const int64_t total = rows * channels;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t o = e / channels;
    const int64_t c = e - o * channels;
    scalar_t best = scalar_t(0);
    int32_t best_row = -1;
    for (int64_t k = 0; k < volume; ++k) {
      const int32_t i = table_entry(nbr, o * volume + k, in_rows);
      if (i < 0) continue;
      const scalar_t v = in[static_cast<int64_t>(i) * channels + c];
      const bool take = best_row < 0 || v > best || v != v;
      if (take) {
        best = v;
        best_row = i;
      }
    }
    out[e] = best;  // 0 for a row without an active input (only in hand-made tables)
    argmax[e] = best_row;
  }
}

// grad_in[i, c] = sum of grad_out[o, c] over the outputs o that took their maximum from i,
// walking the transposed table so that each thread owns its input element.
template <typename scalar_t>
__global__ void max_pool_backward_kernel(const scalar_t* __restrict__ grad_out,
                                         const int32_t* __restrict__ argmax,
                                         const int32_t* __restrict__ nbr_t,
                                         scalar_t* __restrict__ grad_in, int64_t rows,
                                         int64_t volume, int64_t channels, int64_t out_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = rows * channels;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / channels;
    const int64_t c = e - i * channels;
    acc_t acc = 0;
    for (int64_t k = 0; k < volume; ++k) {
      const int64_t o = table_entry(nbr_t, i * volume + k, out_rows);
      if (o >= 0 && argmax[o * channels + c] == i) {
        acc += static_cast<acc_t>(grad_out[o * channels + c]);
      }
    }
    grad_in[e] = static_cast<scalar_t>(acc);
  }
}

at::Tensor sparse_sum_pool_cuda(const at::Tensor& features, const at::Tensor& nbr,
                                const at::Tensor& nbr_t) {
  check_pool_inputs(features, nbr, nbr_t);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = features.contiguous();
  const at::Tensor table = nbr.contiguous();
  const int64_t rows = nbr.size(0), volume = nbr.size(1), channels = features.size(1);
  at::Tensor out = at::empty({rows, channels}, features.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "sparse_sum_pool_cuda", [&] {
    sum_pool_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), table.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), rows,
        volume, channels, x.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_max_pool_cuda(const at::Tensor& features,
                                                        const at::Tensor& nbr,
                                                        const at::Tensor& nbr_t) {
  check_pool_inputs(features, nbr, nbr_t);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = features.contiguous();
  const at::Tensor table = nbr.contiguous();
  const int64_t rows = nbr.size(0), volume = nbr.size(1), channels = features.size(1);
  at::Tensor out = at::empty({rows, channels}, features.options());
  at::Tensor argmax = at::empty({rows, channels}, features.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(),
                                  "sparse_max_pool_cuda", [&] {
    max_pool_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), table.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
        argmax.data_ptr<int32_t>(), rows, volume, channels, x.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, argmax};
}

at::Tensor sparse_max_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& argmax,
                                         const at::Tensor& nbr_t) {
  check_features(grad_out, "grad_out");
  check_device(argmax, "argmax", grad_out.device());
  check_device(nbr_t, "nbr_t", grad_out.device());
  TORCH_CHECK_VALUE(argmax.sizes() == grad_out.sizes(), "argmax shape ", argmax.sizes(),
                    " must equal grad_out shape ", grad_out.sizes());
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kInt, "argmax must be int32, got ",
                   argmax.scalar_type());
  check_neighbor_table(nbr_t, "nbr_t", -1, -1);
  cuda::check_neighbor_entries_cuda(nbr_t, "nbr_t", grad_out.size(0));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor arg = argmax.contiguous();
  const at::Tensor table = nbr_t.contiguous();
  const int64_t rows = nbr_t.size(0), volume = nbr_t.size(1), channels = grad_out.size(1);
  at::Tensor grad_in = at::empty({rows, channels}, grad_out.options());
  if (grad_in.numel() == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(),
                                  "sparse_max_pool_backward_cuda", [&] {
    max_pool_backward_kernel<scalar_t>
        <<<blocks_for(grad_in.numel()), kThreads, 0, current_stream()>>>(
            g.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), table.data_ptr<int32_t>(),
            grad_in.data_ptr<scalar_t>(), rows, volume, channels, g.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CUDA, m) {
  m.impl("sparse_sum_pool", &sparse_sum_pool_cuda);
  m.impl("sparse_max_pool", &sparse_max_pool_cuda);
  m.impl("sparse_max_pool_backward", &sparse_max_pool_backward_cuda);
}

}  // namespace spconv_lite
