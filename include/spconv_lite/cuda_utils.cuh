// Helpers shared by the CUDA kernels (src/cuda/*_cuda.cu): launch shapes, device queries,
// environment switches and the reading of neighbour-table entries.
//
// Only narrow headers: c10/cuda's stream, guard and exception headers. ATen/cuda/CUDAContext.h
// would pull in the cuBLAS / cuSPARSE headers, which a CPU torch wheel does not ship; GEMMs go
// through ATen ops instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace spconv_lite {
namespace cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items (one item per thread, capped; the loops index
// with int64, so n may exceed 2^31).
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, int64_t{1} << 20));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

inline int multiprocessor_count(int device) {
  return device_attribute(cudaDevAttrMultiProcessorCount, device);
}

inline int compute_capability_major(int device) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor, device);
}

// An environment switch is on when set to anything but "" or "0". Read on every call (a
// getenv costs far less than a kernel launch), so tests can flip it.
inline bool env_enabled(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' && std::strcmp(value, "0") != 0;
}

// Convolution algorithm: SPCONV_LITE_CUDA_CONV_ALGO = auto (default) | fused | gemm.
enum class ConvAlgo { kAuto, kFused, kGemm };

inline ConvAlgo conv_algo_from_env() {
  const char* value = std::getenv("SPCONV_LITE_CUDA_CONV_ALGO");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) {
    return ConvAlgo::kAuto;
  }
  if (std::strcmp(value, "fused") == 0) return ConvAlgo::kFused;
  if (std::strcmp(value, "gemm") == 0) return ConvAlgo::kGemm;
  TORCH_CHECK_VALUE(false, "SPCONV_LITE_CUDA_CONV_ALGO must be auto, fused or gemm, got '",
                    value, "'");
  return ConvAlgo::kAuto;
}

// Reads table[pos], a row of the tensor the table indexes or -1. The functions of
// spconv_lite.ops check hand-made tables before they get here (the maps the library builds need
// no check); an entry outside [-1, limit) that gets here anyway (torch.ops called directly, or
// inside torch.compile) stops the kernel with a device-side assertion (as torch's own CUDA
// indexing ops do) instead of reading out of bounds. SPCONV_LITE_CUDA_CHECK_TABLES=1 makes every
// op check eagerly (check_neighbor_entries_cuda), raising the CPU op's ValueError.
__device__ __forceinline__ int32_t table_entry(const int32_t* __restrict__ table, int64_t pos,
                                               int64_t limit) {
  const int32_t value = table[pos];
  CUDA_KERNEL_ASSERT_MSG(value >= -1 && value < limit,
                         "spconv_lite: neighbour table entry outside [-1, rows of the indexed "
                         "tensor)");
  return value;
}

// static: this header is included by several translation units.
static __global__ void find_bad_entries_kernel(const int32_t* __restrict__ table, int64_t count,
                                        int64_t limit, int32_t* bad) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < count;
       j += int64_t{gridDim.x} * blockDim.x) {
    const int32_t value = table[j];
    if (value < -1 || value >= limit) *bad = 1;  // every writer stores the same value
  }
}

// The CPU op's entry check (check_neighbor_entries_cpu), on the GPU, when
// SPCONV_LITE_CUDA_CHECK_TABLES is on. Off by default: it costs a host synchronisation per op.
inline void check_neighbor_entries_cuda(const at::Tensor& nbr, const char* name, int64_t limit) {
  if (!env_enabled("SPCONV_LITE_CUDA_CHECK_TABLES") || nbr.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(nbr.device());
  const at::Tensor table = nbr.contiguous();
  at::Tensor bad = at::zeros({1}, table.options());
  find_bad_entries_kernel<<<blocks_for(table.numel()), kThreads, 0, current_stream()>>>(
      table.data_ptr<int32_t>(), table.numel(), limit, bad.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Host sync (opt-in): reads the flag to raise on the host.
  TORCH_CHECK_VALUE(bad.item<int32_t>() == 0, name, " has entries outside [-1, ", limit,
                    "): it does not index the given features");
}

}  // namespace cuda
}  // namespace spconv_lite
