// CUDA execution emulated on the CPU, to run the kernels of src/cuda without a GPU.
//
// Force-included (g++ -include) before a CUDA source that has been rewritten by build.py
// (kernel<<<grid, block, smem, stream>>>(args) -> ::emu::launch(kernel, grid, block, smem,
// stream)(args)). Every CUDA thread of a block is a fiber on the launching OS thread (built with
// a sanitizer: a std::thread, see EMU_OS_THREADS), blocks run one after another
// (SPCONV_LITE_EMU_BLOCK_ORDER=reverse: last to first, since a GPU keeps no order), so
// function-local statics stand in for __shared__ memory, and a buffer of the launch's size for
// dynamic shared memory (both refilled at every block's start; see fill_shared_memory; new
// tensors are filled too: include/emu_memory.h). __syncthreads* are block
// barriers, the *_sync warp intrinsics (and ldmatrix, mma.sync) warp collectives, atomics
// std::atomic_ref; cp.async copies land at the wait_group that covers them (as late as allowed,
// so a missing wait reads stale data; or as early as allowed, SPCONV_LITE_EMU_CP_ASYNC=early, so
// a missing barrier before a stage's refill changes what slower threads read). The stub headers
// in include/ replace cuda_runtime.h, the c10/cuda stream, guard and exception headers, WMMA and
// cub's radix sort. A launch a GPU refuses (no blocks, more than 65535 along y or z, a block
// beyond 1024 threads or its kernel's __launch_bounds__, dynamic shared memory beyond 48 KB
// without the kernel's opt-in) does not run, and C10_CUDA_KERNEL_LAUNCH_CHECK raises as torch
// does. Accesses a GPU refuses as misaligned (vector casts, cp.async, WMMA tiles,
// ldmatrix rows) abort. The fibers take turns from one barrier or warp collective to the next,
// in thread order (reversed with the blocks), so a read of another thread's write with no
// barrier between them (a missing __syncthreads or __syncwarp: what compute-sanitizer's
// racecheck looks for) sees the write in one of the two orders and not in the other; threads
// that wait at barriers no other thread reaches abort (a GPU would hang). Built with
// ThreadSanitizer (scripts/emu_race_check.sh) every such pair of accesses is reported, whatever
// the order, since only the barriers and the warp collectives order the threads. What this
// cannot show: races between blocks (they run in sequence), memory-ordering bugs of real
// hardware beyond the two schedules of the copies, performance, and anything about the real
// compiler for the device.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// A sanitizer watches OS threads (ThreadSanitizer orders them by the barriers alone), so under one
// every CUDA thread is a std::thread; otherwise a fiber (ucontext) on the launching thread, which
// spares the kernel a futex and a context switch of the OS at every barrier: several times faster.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define EMU_OS_THREADS 1
#else
#define EMU_OS_THREADS 0
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)  // build.py turns each into check_launch_bounds in the body
#define __shared__ static
// build.py puts this after each __shared__ variable's declaration (see fill_shared_memory).
#define EMU_REGISTER_SHARED(name)                       \
  [[maybe_unused]] static const bool emu_shared_##name = \
      ::emu::register_static_shared(&(name), sizeof(name))
#define __align__(n) __attribute__((aligned(n)))

namespace emu {

#if EMU_OS_THREADS
using Barrier = std::barrier<>;
#else
// std::barrier's counting for fibers: the expected-th arrival releases the waiting ones.
class FiberBarrier {
 public:
  explicit FiberBarrier(int expected) : expected_(expected) {}
  void arrive_and_wait();  // below FiberScheduler

 private:
  int expected_;
  int arrived_ = 0;
  std::vector<int> waiting_;  // fibers
};
using Barrier = FiberBarrier;
#endif

struct Warp {
  Barrier barrier{32};
  unsigned int bits[32];
  unsigned long long values[32];
  uint32_t registers[32][10];  // mma.sync: each lane's operands (a[4], b[2], c[4])
};

struct Block {
  explicit Block(int threads) : barrier(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  Barrier barrier;
  std::atomic<int> reduction{0};
  std::vector<std::unique_ptr<Warp>> warps;
};

// The byte that fills the n-th block's shared memory or the n-th new tensor (include/
// emu_memory.h), memory a kernel has not written yet: 0xFF (NaN as float16 / float32; -1 as
// int32, the tables' "no neighbour") and 0x7F (huge floats; int32 rows far beyond any tensor)
// in turn, so that a read before a write shows whether it takes the value as data or as a row
// index.
inline int fill_byte(unsigned long long n) { return n % 2 == 0 ? 0xFF : 0x7F; }

inline dim3 grid_dim, block_dim, block_idx;
inline thread_local dim3 thread_idx;
inline thread_local Block* block = nullptr;
inline thread_local int linear_id = 0;
// The launch's dynamic shared memory (extern __shared__), and each kernel's static shared
// memory (its __shared__ variables, function-local statics here, which build.py registers
// where they are declared), refilled at the start of every block with fill_byte(block number):
// a kernel must write what it reads.
inline unsigned char* dynamic_shared = nullptr;
inline const void* running_kernel = nullptr;
inline int block_fill = 0xFF;
inline std::mutex static_shared_mutex;
inline std::map<const void*, std::vector<std::pair<void*, std::size_t>>> static_shared;

// Where a __shared__ variable is first declared: filled at once, before any thread can reach
// it (the others wait for the static's initialisation), then at every block's start.
inline bool register_static_shared(void* variable, std::size_t bytes) {
  const std::lock_guard<std::mutex> lock(static_shared_mutex);
  static_shared[running_kernel].emplace_back(variable, bytes);
  std::memset(variable, block_fill, bytes);
  return true;
}

// Before the block_number-th block of the running kernel (between two block barriers).
inline void fill_shared_memory(std::size_t dynamic_bytes, unsigned long long block_number) {
  block_fill = fill_byte(block_number);
  std::memset(dynamic_shared, block_fill, dynamic_bytes);
  const std::lock_guard<std::mutex> lock(static_shared_mutex);
  for (const auto& [variable, bytes] : static_shared[running_kernel]) {
    std::memset(variable, block_fill, bytes);
  }
}

// cp.async: each copy lands as late as the real one may, at the cp.async.wait_group that
// covers its group (commit_group closes a group), so a read of a stage before its wait sees the
// stale bytes. A copy still pending when the block ends is a kernel bug.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;      // copied
  int total;      // written (the rest zero-filled)
};
inline thread_local std::vector<AsyncCopy> open_group;
inline thread_local std::vector<std::vector<AsyncCopy>> committed_groups;

// What a GPU demands of an address (x86 would read it anyway): an access of n bytes (a vector
// load, a cp.async) or a WMMA tile (32) must start at a multiple of n, else the launch fails
// with "misaligned address", a sticky error that ends every later CUDA call of the process.
inline void check_aligned(const void* p, std::size_t n, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % n != 0) {
    std::fprintf(stderr, "emu: %s at %p is not aligned to %zu bytes\n", what, p, n);
    std::abort();
  }
}

// reinterpret_cast to a pointer to a CUDA vector type, checked (build.py rewrites the casts).
template <typename Pointer, typename From>
Pointer aligned_cast(From* p) {
  using Vector = std::remove_cv_t<std::remove_pointer_t<Pointer>>;
  check_aligned(p, sizeof(Vector), "a vector access");
  return reinterpret_cast<Pointer>(p);
}

// SPCONV_LITE_EMU_CP_ASYNC=early (read at each launch): copies land at once instead, as early
// as a real one may, so that a stage refilled while other threads still read it (a missing
// barrier between a step's multiplication and the copies into its stage) changes what they
// read, which landing late hides.
inline bool copies_land_early = false;

inline void land(const AsyncCopy& c) {
  std::memcpy(c.dst, c.src, c.bytes);
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, c.total - c.bytes);
}

inline void cp_async(void* dst, const void* src, int bytes, int total) {
  check_aligned(dst, total, "a cp.async destination");
  if (bytes > 0) check_aligned(src, total, "a cp.async source");
  // A zero-byte copy still takes a global address: a null (empty tensor's) pointer faults.
  if (reinterpret_cast<std::uintptr_t>(src) < 4096) {
    std::fprintf(stderr, "emu: a cp.async source at %p (a null pointer)\n", src);
    std::abort();
  }
  if (copies_land_early) {
    land({dst, src, bytes, total});
  } else {
    open_group.push_back({dst, src, bytes, total});
  }
}
inline void cp_async_commit() {
  committed_groups.push_back(std::move(open_group));
  open_group.clear();
}
inline void cp_async_wait(int newest_pending) {
  while (static_cast<int>(committed_groups.size()) > newest_pending) {
    for (const AsyncCopy& c : committed_groups.front()) land(c);
    committed_groups.erase(committed_groups.begin());
  }
}
inline void check_no_pending_copies() {
  if (!open_group.empty() || !committed_groups.empty()) {
    std::fprintf(stderr, "emu: a block ended with cp.async copies never waited for\n");
    std::abort();
  }
}

#if !EMU_OS_THREADS
// Runs the CUDA threads of a launch as fibers on the calling OS thread, each on a stack of its
// own, in passes: every fiber not waiting at a barrier runs in turn, in thread order (or
// reversed), until it arrives at its next barrier or ends. The thread_local state above (which
// thread this is, its cp.async groups) is swapped in and out with the fiber.
class FiberScheduler {
 public:
  void run(int count, bool reversed, const std::function<void(int)>& body) {
    body_ = &body;
    fibers_.resize(count);
    for (int t = 0; t < count; ++t) {
      Fiber& fiber = fibers_[t];
      fiber.runnable = true;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = stack(t);
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &scheduler_context_;
      makecontext(&fiber.context, &FiberScheduler::start, 0);
    }
    running = this;
    int left = count;
    while (left > 0) {
      bool ran = false;
      for (int i = 0; i < count; ++i) {
        current_ = reversed ? count - 1 - i : i;
        Fiber& fiber = fibers_[current_];
        if (!fiber.runnable) continue;
        ran = true;
        swap_thread_state(fiber);
        swapcontext(&scheduler_context_, &fiber.context);
        swap_thread_state(fiber);
        if (fiber.finished) --left;
      }
      if (!ran) {
        std::fprintf(stderr, "emu: %d threads wait at barriers that the others never reach "
                     "(a GPU hangs)\n", left);
        std::abort();
      }
    }
    running = nullptr;
  }

  int current() const { return current_; }
  void wake(int fiber) { fibers_[fiber].runnable = true; }
  // Back to the scheduler; a fiber that waits is not run again until woken.
  void yield(bool wait) {
    Fiber& fiber = fibers_[current_];
    fiber.runnable = !wait;
    swapcontext(&fiber.context, &scheduler_context_);
  }

  inline static FiberScheduler* running = nullptr;

 private:
  // Deep enough for the kernels' register arrays and the emulated WMMA fragments; a guard page
  // below each stack turns an overflow into a fault.
  static constexpr std::size_t kStackBytes = 512 * 1024;

  struct Fiber {
    ucontext_t context;
    bool runnable = false;
    bool finished = false;
    dim3 thread_idx;
    Block* block = nullptr;
    int linear_id = 0;
    std::vector<AsyncCopy> open_group;
    std::vector<std::vector<AsyncCopy>> committed_groups;
  };

  static void start() {
    FiberScheduler& self = *running;
    (*self.body_)(self.current_);
    self.fibers_[self.current_].finished = true;
    self.fibers_[self.current_].runnable = false;
  }  // returns to uc_link, the scheduler

  static void swap_thread_state(Fiber& fiber) {
    std::swap(thread_idx, fiber.thread_idx);
    std::swap(block, fiber.block);
    std::swap(linear_id, fiber.linear_id);
    open_group.swap(fiber.open_group);
    committed_groups.swap(fiber.committed_groups);
  }

  // The t-th fiber's stack, mapped at first use and kept for later launches (untouched pages
  // cost nothing).
  static void* stack(int t) {
    static std::vector<char*> stacks;
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    while (static_cast<int>(stacks.size()) <= t) {
      void* mapped = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
      if (mapped == MAP_FAILED || mprotect(mapped, page, PROT_NONE) != 0) {
        std::fprintf(stderr, "emu: no memory for a fiber's stack\n");
        std::abort();
      }
      stacks.push_back(static_cast<char*>(mapped) + page);
    }
    return stacks[t];
  }

  const std::function<void(int)>* body_ = nullptr;
  std::vector<Fiber> fibers_;
  ucontext_t scheduler_context_;
  int current_ = 0;
};

inline void FiberBarrier::arrive_and_wait() {
  FiberScheduler& scheduler = *FiberScheduler::running;
  if (++arrived_ < expected_) {
    waiting_.push_back(scheduler.current());
    scheduler.yield(/*wait=*/true);
    return;
  }
  // The last to arrive releases the others and lets the pass go on, so that the fibers leave
  // the barrier in thread order in the next pass.
  arrived_ = 0;
  for (int fiber : waiting_) scheduler.wake(fiber);
  waiting_.clear();
  scheduler.yield(/*wait=*/false);
}
#endif

inline int lane_id() { return linear_id % 32; }

inline Warp& this_warp() { return *block->warps[linear_id / 32]; }

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8 and receives in r[j] the elements (l / 4, 2 (l % 4) + {0, 1}) of matrix j (trans:
// (2 (l % 4) + {0, 1}, l / 4)), the lower-numbered one in the low 16 bits.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  check_aligned(row, 16, "an ldmatrix row");
  Warp& warp = this_warp();
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  warp.values[lane] = reinterpret_cast<std::uintptr_t>(row);
  warp.barrier.arrive_and_wait();
  auto element = [&](int matrix, int row_in, int column) {
    return reinterpret_cast<const uint16_t*>(warp.values[matrix * 8 + row_in])[column];
  };
  for (int j = 0; j < 4; ++j) {
    const uint32_t low = trans ? element(j, 2 * t, g) : element(j, g, 2 * t);
    const uint32_t high = trans ? element(j, 2 * t + 1, g) : element(j, g, 2 * t + 1);
    r[j] = low | high << 16;
  }
  warp.barrier.arrive_and_wait();
}

inline float half_bits_to_float(uint32_t bits, bool bfloat16) {
  const auto h = static_cast<uint16_t>(bits);
  return bfloat16 ? static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits()))
                  : static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// The tensor-core kernels' bodies are compiled for __CUDA_ARCH__ >= 800 only: in code built for
// an older virtual architecture (ptx_version, cuda_runtime.h) a GPU runs their device assert.
// Every one of them multiplies through mma_m16n8k16 or wmma::mma_sync, which check this.
inline void require_tensor_core_code() {
  if (ptx_version() < 80) {
    std::fprintf(stderr, "emu: a tensor-core kernel ran in code built for compute_%d, where its "
                 "body is the device assert\n", ptx_version());
    std::abort();
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d += a @ b: lane l (g = l / 4,
// t = l % 4) holds A's (g + 8 (i % 2), 2t + 8 (i / 2) + {0, 1}) in a[i], B's (2t + 8 i + {0, 1},
// g) in b_i, and C's (g + 8 (i / 2), 2t + i % 2) in d[i]. Each sum adds the products to C in
// increasing k, as the WMMA emulation does (mma.h).
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                         bool bfloat16) {
  require_tensor_core_code();
  Warp& warp = this_warp();
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  uint32_t* mine = warp.registers[lane];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  for (int i = 0; i < 4; ++i) std::memcpy(&mine[6 + i], &d[i], 4);
  warp.barrier.arrive_and_wait();
  auto half_of = [&](int owner, int word, int column) {
    return half_bits_to_float(warp.registers[owner][word] >> (16 * (column % 2)), bfloat16);
  };
  auto a_at = [&](int m, int k) {
    return half_of((m % 8) * 4 + (k % 8) / 2, m / 8 + 2 * (k / 8), k);
  };
  auto b_at = [&](int k, int n) { return half_of(n * 4 + (k % 8) / 2, 4 + k / 8, k); };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = g + 8 * (i / 2), n = 2 * t + i % 2;
    float sum;
    std::memcpy(&sum, &warp.registers[(m % 8) * 4 + n / 2][6 + (m / 8) * 2 + n % 2], 4);
    for (int k = 0; k < 16; ++k) sum += a_at(m, k) * b_at(k, n);
    out[i] = sum;
  }
  warp.barrier.arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

inline int block_reduce(int value, bool is_or) {
  block->barrier.arrive_and_wait();  // what every thread did before is visible after
  if (is_or) {
    block->reduction.fetch_or(value != 0 ? 1 : 0);
  } else {
    block->reduction.fetch_add(value != 0 ? 1 : 0);
  }
  block->barrier.arrive_and_wait();
  const int result = block->reduction.load();
  block->barrier.arrive_and_wait();
  // Thread 0 clears before it reaches the next reduction's first barrier, which every other
  // thread must pass before adding.
  if (linear_id == 0) block->reduction.store(0);
  return result;
}

// A kernel declared __launch_bounds__(n) does not launch with more than n threads a block
// (compiled for n, its registers may not suffice): a library bug, so it aborts.
inline void check_launch_bounds(unsigned int max_threads) {
  const unsigned int threads = block_dim.x * block_dim.y * block_dim.z;
  if (threads > max_threads) {
    std::fprintf(stderr, "emu: a kernel declared __launch_bounds__(%u) launched with %u threads\n",
                 max_threads, threads);
    std::abort();
  }
}

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid;
  dim3 threads;
  std::size_t shared_bytes;

  // Why a GPU would refuse this launch (error cudaSuccess: it would not), as the runtime
  // checks it: at least one block and at most 2^31 - 1 x 65535 x 65535 of them; 1 to 1024
  // threads a block, at most 1024 x 1024 x 64; the dynamic shared memory within 48 KB or the
  // kernel's opt-in.
  struct Refusal {
    cudaError_t error;
    const char* why;
  };
  Refusal refusal() const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
      return {cudaErrorInvalidConfiguration, "a grid without blocks"};
    }
    if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
      return {cudaErrorInvalidConfiguration, "too many blocks"};
    }
    const unsigned long long count =
        static_cast<unsigned long long>(threads.x) * threads.y * threads.z;
    if (count == 0 || count > 1024 || threads.x > 1024 || threads.y > 1024 || threads.z > 64) {
      return {cudaErrorInvalidConfiguration, "a block size beyond 1024 threads"};
    }
    if (shared_bytes > static_cast<std::size_t>(
                           shared_bytes_allowed(reinterpret_cast<const void*>(kernel)))) {
      return {cudaErrorInvalidValue,
              "more dynamic shared memory than the kernel's limit (48 KB without the opt-in)"};
    }
    return {cudaSuccess, nullptr};
  }

  template <typename... Args>
  void operator()(Args&&... args) const {
    if (const Refusal refused = refusal(); refused.error != cudaSuccess) {
      last_error = refused.error;  // the launch does not run; the error waits for a check
      std::snprintf(last_error_detail, sizeof(last_error_detail),
                    "%s: grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of shared memory",
                    refused.why, grid.x, grid.y, grid.z, threads.x, threads.y, threads.z,
                    shared_bytes);
      return;
    }
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    const int count = static_cast<int>(threads.x * threads.y * threads.z);
    if (count % 32 != 0) std::abort();  // the kernels use whole warps
    grid_dim = grid;
    block_dim = threads;
    const char* landing = std::getenv("SPCONV_LITE_EMU_CP_ASYNC");
    copies_land_early = landing != nullptr && std::strcmp(landing, "early") == 0;
    const char* order = std::getenv("SPCONV_LITE_EMU_BLOCK_ORDER");
    const bool blocks_reversed = order != nullptr && std::strcmp(order, "reverse") == 0;
    // One CUDA thread (fiber or std::thread) per thread of a block for the whole launch; the
    // blocks run one after another, separated by block barriers (so the function-local statics
    // act as shared memory), in blockIdx order or reversed (SPCONV_LITE_EMU_BLOCK_ORDER, see
    // the top of this file).
    Block state(count);
    running_kernel = reinterpret_cast<const void*>(kernel);
    struct alignas(128) Line {
      unsigned char bytes[128];
    };
    std::vector<Line> shared_lines((shared_bytes + 127) / 128 + 1);
    dynamic_shared = shared_lines.data()->bytes;
    const std::function<void(int)> cuda_thread = [&](int t) {
      block = &state;
      linear_id = t;
      thread_idx = dim3(t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y));
      const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
      for (unsigned long long i = 0; i < blocks; ++i) {
        const unsigned long long b = blocks_reversed ? blocks - 1 - i : i;
        if (t == 0) {
          block_idx = dim3(b % grid.x, b / grid.x % grid.y, b / (1ull * grid.x * grid.y));
          fill_shared_memory(shared_bytes, i);
        }
        state.barrier.arrive_and_wait();  // block_idx set, the previous block done
        std::apply(kernel, params);
        check_no_pending_copies();
        state.barrier.arrive_and_wait();
      }
    };
#if EMU_OS_THREADS
    std::vector<std::thread> pool;
    pool.reserve(count);
    for (int t = 0; t < count; ++t) pool.emplace_back(cuda_thread, t);
    for (std::thread& thread : pool) thread.join();
#else
    FiberScheduler().run(count, blocks_reversed, cuda_thread);
#endif
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 threads,
                         std::size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return {kernel, grid, threads, shared_bytes};
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { ::emu::block->barrier.arrive_and_wait(); }
inline int __syncthreads_or(int predicate) { return ::emu::block_reduce(predicate, true); }
inline int __syncthreads_count(int predicate) { return ::emu::block_reduce(predicate, false); }

inline unsigned int __ballot_sync(unsigned int, int predicate) {
  ::emu::Warp& warp = ::emu::this_warp();
  warp.bits[::emu::lane_id()] = predicate != 0;
  warp.barrier.arrive_and_wait();
  unsigned int result = 0;
  for (int lane = 0; lane < 32; ++lane) result |= warp.bits[lane] << lane;
  warp.barrier.arrive_and_wait();
  return result;
}

template <typename T>
T __shfl_sync(unsigned int, T value, int source) {
  static_assert(sizeof(T) <= sizeof(unsigned long long));
  ::emu::Warp& warp = ::emu::this_warp();
  std::memcpy(&warp.values[::emu::lane_id()], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, &warp.values[source], sizeof(T));
  warp.barrier.arrive_and_wait();
  return result;
}

inline int __popc(unsigned int x) { return __builtin_popcount(x); }

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return std::atomic_ref<unsigned long long>(*address).fetch_add(value);
}

inline unsigned long long atomicMax(unsigned long long* address, unsigned long long value) {
  std::atomic_ref<unsigned long long> target(*address);
  unsigned long long seen = target.load();
  while (seen < value && !target.compare_exchange_weak(seen, value)) {
  }
  return seen;
}
