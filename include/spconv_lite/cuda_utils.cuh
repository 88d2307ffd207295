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

// Threads the device runs at once: a bound on how many threads of a grid-stride kernel can be
// between a check of a shared counter and their update of it.
inline int64_t resident_threads(int device) {
  return int64_t{multiprocessor_count(device)} *
         device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor, device);
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
//   mma=wmma|sync       tensor-core instructions of the pipelined conv tiles and of the
//                       compacted weight gradient (float16 / bfloat16): WMMA fragments, or
//                       ldmatrix + mma.sync with their fixed register layouts (bfloat16's WMMA
//                       fragments load without ldmatrix on sm_90); the same sums
struct Variants {
  bool compact_weight_grad = false;
  bool pipelined_tiles = false;
  bool radix_map_sort = false;
  bool sync_mma = false;
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
    } else if (key == "mma" && (choice == "wmma" || choice == "sync")) {
      variants.sync_mma = choice == "sync";
    } else {
      known = false;
    }
    TORCH_CHECK_VALUE(known, "SPCONV_LITE_CUDA_VARIANTS: unknown entry '", item,
                      "' (known: rows=0..8, wgrad=chunked|compact, tiles=wmma64|pipelined, "
                      "mapsort=torch|radix, mma=wmma|sync)");
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

// ---------------------------------------------------------------- warp-level tensor-core MMA
// ldmatrix + mma.sync (sm_80+), whose register layouts the PTX ISA fixes (WMMA's fragments are
// opaque). The emulation runs both as warp collectives.

// Four 8 x 8 matrices of 16-bit elements from shared memory: lane l gives the address of row
// l % 8 of matrix l / 8 (16-byte aligned) and receives in r[j] the elements (l / 4, 2 (l % 4) +
// {0, 1}) of matrix j, or with kTrans (2 (l % 4) + {0, 1}, l / 4); the lower-numbered element in
// the low 16 bits.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(SPCONV_LITE_CUDA_EMULATION)
  ::emu::ldmatrix_x4(r, row, kTrans);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

// d += a @ b for a 16 x 8 tile over 16 (float16 or, with kBFloat16, bfloat16 operands; float32
// sums): lane l, with g = l / 4 and t = l % 4, holds A's elements (g + 8 (i % 2), 2t + 8 (i / 2)
// + {0, 1}) in a[i], B's (2t + 8 i + {0, 1}, g) in b_i and C's (g + 8 (i / 2), 2t + i % 2) in
// d[i]. The same instruction as a 16 x 16 x 16 WMMA's two halves, so the same sums.
template <bool kBFloat16>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#if defined(SPCONV_LITE_CUDA_EMULATION)
  ::emu::mma_m16n8k16(d, a, b0, b1, kBFloat16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
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
