// Kernels with the bugs that the emulator's checks must show (tests/cuda_emu/
// test_emulator_checks.py): rewritten by build.py and compiled with emu.h like src/cuda.
//   order_and_races race      a block reads a neighbour's shared-memory slot with no barrier
//                             between its write and the read (ThreadSanitizer must report it;
//                             without it, what thread 0 read depends on the order of the threads)
//   order_and_races barrier   the same with the barrier (no report, the same value in any order)
//   order_and_races hang      half a warp at a warp collective that the other half never reaches
//                             (a GPU hangs; the emulation must abort)
//   order_and_races chain     each block adds one to what the block before it wrote: the
//                             result depends on the order in which blocks run
//   order_and_races limits    launches a GPU refuses, and their neighbours within the limits:
//                             one line each, "<cudaGetLastError> <blocks that ran>"
//   order_and_races bounds N  a kernel declared __launch_bounds__(64) launched with N threads
//                             (more than 64 must abort)
//   order_and_races unwritten a kernel reads its static shared memory without writing it, in
//                             each of 3 blocks, in two launches: what block b read, one launch
//                             a line
#include <cstdio>
#include <cstdlib>
#include <cstring>

__global__ void read_other_warp(const float* in, float* out, bool barrier) {
  __shared__ float tile[64];
  tile[threadIdx.x] = in[threadIdx.x];
  if (barrier) __syncthreads();
  out[threadIdx.x] = tile[(threadIdx.x + 32) % 64];  // written by the other warp
}

__global__ void half_warp_shuffle(int* out) {
  int value = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) value = __shfl_sync(0xffffffffu, value, 0);
  out[threadIdx.x] = value;
}

__global__ void chain(int* values) {
  if (threadIdx.x == 0) values[blockIdx.x + 1] = values[blockIdx.x] + 1;
}

__global__ void count_blocks(int* count) {
  if (threadIdx.x == 0) ++*count;  // blocks run one after another in the emulation
}

__global__ void count_blocks_opted_in(int* count) {  // gets the shared-memory opt-in
  if (threadIdx.x == 0) ++*count;
}

__global__ void __launch_bounds__(64) bounded(int* count) {
  if (threadIdx.x == 0) ++*count;
}

__global__ void read_unwritten(int* out) {
  __shared__ int tile[32];
  out[blockIdx.x * 32 + threadIdx.x] = tile[threadIdx.x];
}

void report_launch(void (*kernel)(int*), dim3 grid, dim3 block, std::size_t shared_bytes = 0) {
  int count = 0;
  ::emu::launch(kernel, grid, block, shared_bytes)(&count);
  std::printf("%d %d\n", static_cast<int>(cudaGetLastError()), count);
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (std::strcmp(mode, "limits") == 0) {
    report_launch(count_blocks, dim3(0), dim3(32));            // no blocks: refused
    report_launch(count_blocks, dim3(3, 1, 0), dim3(32));      // no blocks: refused
    report_launch(count_blocks, dim3(1, 65536), dim3(32));     // too many along y: refused
    report_launch(count_blocks, dim3(1, 1, 65536), dim3(32));  // too many along z: refused
    report_launch(count_blocks, dim3(1, 3, 2), dim3(32));      // runs 6 blocks
    report_launch(count_blocks, dim3(1), dim3(1056));          // 33 warps: refused
    report_launch(count_blocks, dim3(2), dim3(1024));          // 32 warps: runs
    report_launch(count_blocks, dim3(1), dim3(32), 48 * 1024);       // 48 KB: runs
    report_launch(count_blocks, dim3(1), dim3(32), 48 * 1024 + 16);  // no opt-in: refused
    const auto opt_in = [](int bytes) {
      return static_cast<int>(cudaFuncSetAttribute(
          count_blocks_opted_in, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    };
    std::printf("%d\n", opt_in(64 * 1024));
    report_launch(count_blocks_opted_in, dim3(1), dim3(32), 64 * 1024);       // runs
    report_launch(count_blocks_opted_in, dim3(1), dim3(32), 64 * 1024 + 16);  // refused
    report_launch(count_blocks, dim3(1), dim3(32), 64 * 1024);  // another kernel: refused
    std::printf("%d\n", opt_in(::emu::max_shared_bytes_optin() + 1));  // beyond the device
    return 0;
  }
  if (std::strcmp(mode, "bounds") == 0 && argc > 2) {
    report_launch(bounded, dim3(1), dim3(std::atoi(argv[2])));
    return 0;
  }
  if (std::strcmp(mode, "unwritten") == 0) {
    for (int launch = 0; launch < 2; ++launch) {
      int out[3 * 32];
      ::emu::launch(read_unwritten, dim3(3), dim3(32))(out);
      std::printf("%d %d %d\n", out[0], out[32 + 5], out[64 + 31]);
    }
    return 0;
  }
  if (std::strcmp(mode, "hang") == 0) {
    int out[32];
    ::emu::launch(half_warp_shuffle, dim3(1), dim3(32))(out);
    std::printf("%d\n", out[0]);
    return 0;
  }
  if (std::strcmp(mode, "chain") == 0) {
    int values[9] = {};
    ::emu::launch(chain, dim3(8), dim3(32))(values);
    std::printf("%d\n", values[8]);
    return 0;
  }
  float in[64], out[64];
  for (int i = 0; i < 64; ++i) in[i] = static_cast<float>(i);
  ::emu::launch(read_other_warp, dim3(1), dim3(64))(in, out, std::strcmp(mode, "barrier") == 0);
  std::printf("%g\n", out[0]);
  return 0;
}
