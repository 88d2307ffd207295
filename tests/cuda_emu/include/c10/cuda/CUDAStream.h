// Stub for the CPU emulation of src/cuda: one null stream.
#pragma once
#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(signed char = -1) { return {}; }
}  // namespace c10::cuda
