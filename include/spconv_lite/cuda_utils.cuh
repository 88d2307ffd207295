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
#include <string>

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

// Kernel variants prepared for the GPU speed work (issue 13) and not yet measured on a GPU, each
// off by default until a GPU run shows it faster: SPCONV_LITE_CUDA_VARIANTS, a comma-separated
// list of key=value, read on every call (so that a benchmark can alternate them):
//   rows=N              conv row orders with N splits of the kernel offsets (0 = none); read by
//                       spconv_lite/kernel_map.py, which builds them with the maps; checked here
//   wgrad=chunked|compact  weight gradient of the fused path: chunks of all rows (chunked) or
//                       only the rows with a neighbour at the offset, compacted per chunk
//                       (which then also takes float32's wide layers off the per-offset GEMMs)
//   tiles=wmma64|pipelined  conv tiles: the default ones (wmma64: float16 / bfloat16 64x64
//                       with register-staged gathers), or 128-row tiles (64 on layers too small
//                       for two blocks per multiprocessor) sized by the channel counts with
//                       cp.async gathers in a 3-stage pipeline (pipelined: float16 / bfloat16
//                       on the tensor cores, and float32 on the SIMT cores, which then also
//                       takes float32's wide layers off the per-offset GEMMs)
//   mapsort=torch|radix  output-site sort of build_conv_map: at::sort of the 64-bit keys, or a
//                       radix sort of only the bits the output grid's keys use
struct Variants {
  bool compact_weight_grad = false;
  bool pipelined_tiles = false;
  bool radix_map_sort = false;
};

inline Variants variants_from_env() {
  Variants variants;
  const char* value = std::getenv("SPCONV_LITE_CUDA_VARIANTS");
  if (value == nullptr) return variants;
  const std::string text(value);
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, comma - start);
    start = comma + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    const std::string choice = eq == std::string::npos ? "" : item.substr(eq + 1);
    bool known = true;
    if (key == "rows") {
      known = choice.size() == 1 && choice[0] >= '0' && choice[0] <= '8';
    } else if (key == "wgrad" && (choice == "chunked" || choice == "compact")) {
      variants.compact_weight_grad = choice == "compact";
    } else if (key == "tiles" && (choice == "wmma64" || choice == "pipelined")) {
      variants.pipelined_tiles = choice == "pipelined";
    } else if (key == "mapsort" && (choice == "torch" || choice == "radix")) {
      variants.radix_map_sort = choice == "radix";
    } else {
      known = false;
    }
    TORCH_CHECK_VALUE(known, "SPCONV_LITE_CUDA_VARIANTS: unknown entry '", item,
                      "' (known: rows=0..8, wgrad=chunked|compact, tiles=wmma64|pipelined, "
                      "mapsort=torch|radix)");
  }
  return variants;
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

// ---------------------------------------------------------------- shared-memory pipelines
// The emulation (tests/cuda_emu/emu.h) runs the same calls on the CPU: copies land at the
// wait that covers them, dynamic shared memory starts as 0xFF bytes in every block.

// 16 bytes global -> shared without going through registers (cp.async.cg, sm_80+), or 16 zero
// bytes when !valid (then `global` is not read, but must still be a valid address).
__device__ __forceinline__ void cp_async16(void* shared, const void* global, bool valid) {
#if defined(SPCONV_LITE_CUDA_EMULATION)
  ::emu::cp_async(shared, global, valid ? 16 : 0, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global),
               "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(shared) =
      valid ? *reinterpret_cast<const uint4*>(global) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// Closes the group of the cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(SPCONV_LITE_CUDA_EMULATION)
  ::emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's newest groups are still in flight (the copies
// of other threads need a barrier after it).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SPCONV_LITE_CUDA_EMULATION)
  ::emu::cp_async_wait(kPending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// The block's dynamic shared memory (the launch's third configuration argument; above 48 KB
// only after cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)).
#if defined(SPCONV_LITE_CUDA_EMULATION)
inline unsigned char* dynamic_shared_memory() { return ::emu::dynamic_shared; }
#else
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(128) unsigned char dynamic_shared[];
  return dynamic_shared;
}
#endif

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
