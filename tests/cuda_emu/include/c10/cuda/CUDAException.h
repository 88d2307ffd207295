// Stub for the CPU emulation of src/cuda: emulated launches run synchronously and cannot fail.
#pragma once
#include <cuda_runtime.h>
#define C10_CUDA_CHECK(expr) (void)(expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
