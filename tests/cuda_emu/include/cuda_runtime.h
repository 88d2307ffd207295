// Stub of the CUDA runtime header for the CPU emulation of src/cuda (see ../emu.h): the few
// types and queries the kernels' host code uses.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

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

// The runtime's error codes the emulation can give (values as in CUDA's driver_types.h).
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

namespace emu {
// The error of the last launch (a launch whose configuration a GPU refuses does not run),
// returned and cleared by cudaGetLastError as the runtime does; what the launch asked for.
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local char last_error_detail[256] = "";
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = ::emu::last_error;
  ::emu::last_error = cudaSuccess;
  return error;
}

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
};

namespace emu {
inline int env_int(const char* name, int otherwise) {
  const char* value = std::getenv(name);
  return (value != nullptr && *value != '\0') ? std::atoi(value) : otherwise;
}
inline int sm_major() { return env_int("SPCONV_LITE_EMU_SM_MAJOR", 9); }
// The virtual architecture the kernels' code was built for (10 x compute capability), as
// cudaFuncGetAttributes reports it: by default the device's own; SPCONV_LITE_EMU_PTX_VERSION=75
// emulates a build for compute_75 only, JIT-compiled for a newer device.
inline int ptx_version() { return env_int("SPCONV_LITE_EMU_PTX_VERSION", 10 * sm_major()); }
}  // namespace emu

// The emulated device: 4 multiprocessors of 2048 threads (1024 on compute capability 7),
// compute capability SPCONV_LITE_EMU_SM_MAJOR (default 9, so the tensor-core kernels run; 7
// selects the SIMT fallbacks).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = 4;
      break;
    case cudaDevAttrMaxThreadsPerMultiProcessor:
      *value = ::emu::sm_major() == 7 ? 1024 : 2048;
      break;
  }
  return cudaSuccess;
}

struct cudaFuncAttributes {
  int binaryVersion;
  int ptxVersion;
};

template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel) {
  attributes->binaryVersion = 10 * ::emu::sm_major();
  attributes->ptxVersion = ::emu::ptx_version();
  return cudaSuccess;
}

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
// Launch limits of the emulated device, as a GPU enforces them (CUDA C++ Programming Guide,
// "Technical Specifications per Compute Capability"): a block's dynamic shared memory above
// 48 KB needs the kernel's opt-in (cudaFuncSetAttribute), up to the device's maximum: 227 KB
// on sm_90, 99 KB on sm_86 / sm_89 (the least of compute capability 8), 64 KB on sm_75 (the
// least of 7).
constexpr int kDefaultSharedBytes = 48 * 1024;
inline int max_shared_bytes_optin() {
  const int major = sm_major();
  return major >= 9 ? 227 * 1024 : major == 8 ? 99 * 1024 : 64 * 1024;
}

// Each kernel's opt-in, set by cudaFuncSetAttribute and read by its launches.
inline std::mutex shared_optin_mutex;
inline std::map<const void*, int> shared_optin;
inline int shared_bytes_allowed(const void* kernel) {
  const std::lock_guard<std::mutex> lock(shared_optin_mutex);
  const auto found = shared_optin.find(kernel);
  return found == shared_optin.end() ? kDefaultSharedBytes : found->second;
}
}  // namespace emu

// Records the kernel's dynamic shared memory opt-in; more than the device has is refused.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int bytes) {
  if (bytes < 0 || bytes > ::emu::max_shared_bytes_optin()) {
    std::snprintf(::emu::last_error_detail, sizeof(::emu::last_error_detail),
                  "%d bytes of dynamic shared memory, where the device has at most %d", bytes,
                  ::emu::max_shared_bytes_optin());
    return cudaErrorInvalidValue;
  }
  const std::lock_guard<std::mutex> lock(::emu::shared_optin_mutex);
  ::emu::shared_optin[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}
