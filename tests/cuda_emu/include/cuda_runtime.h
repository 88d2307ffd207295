// Stub of the CUDA runtime header for the CPU emulation of src/cuda (see ../emu.h): the few
// types and queries the kernels' host code uses.
#pragma once

#include <cstdlib>
#include <cstring>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

struct uint4 {
  unsigned int x, y, z, w;
};

inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return {x, y, z, w};
}

struct alignas(8) float2 {
  float x, y;
};

inline float2 make_float2(float x, float y) { return {x, y}; }

struct alignas(16) float4 {
  float x, y, z, w;
};

inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t { cudaSuccess = 0 };

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
};

// The emulated device: 4 multiprocessors, compute capability SPCONV_LITE_EMU_SM_MAJOR
// (default 9, so the tensor-core kernels run; 7 selects the SIMT fallbacks).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  if (attribute == cudaDevAttrMultiProcessorCount) {
    *value = 4;
  } else {
    const char* major = std::getenv("SPCONV_LITE_EMU_SM_MAJOR");
    *value = (major != nullptr && *major != '\0') ? std::atoi(major) : 9;
  }
  return cudaSuccess;
}

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// Any size is fine for the emulation (the launch allocates what it is given).
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}
