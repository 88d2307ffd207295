// Stub for the CPU emulation of src/cuda: emulated launches run synchronously; a launch whose
// configuration a GPU refuses (../../emu.h) does not run and leaves its error for
// C10_CUDA_KERNEL_LAUNCH_CHECK, which raises as torch's does ("CUDA error: ...").
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace emu {
inline void check_cuda(cudaError_t error, const char* expression) {
  TORCH_CHECK(error == cudaSuccess, "CUDA error: ", cudaGetErrorString(error), " (emulated: ",
              expression, "; ", last_error_detail, ")");
}
}  // namespace emu

#define C10_CUDA_CHECK(expr) ::emu::check_cuda((expr), #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
