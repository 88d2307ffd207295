// Two kernels with the bugs that the emulator's checks must show (tests/cuda_emu/
// test_emulator_checks.py): compiled with emu.h like the rewritten sources of src/cuda.
//   order_and_races race      a block reads a neighbour's shared-memory slot with no barrier
//                             between its write and the read (ThreadSanitizer must report it)
//   order_and_races barrier   the same with the barrier (no report)
//   order_and_races chain     each block adds one to what the block before it wrote: the
//                             result depends on the order in which blocks run
#include <cstdio>
#include <cstring>

__global__ void read_other_warp(const float* in, float* out, bool barrier) {
  __shared__ float tile[64];
  tile[threadIdx.x] = in[threadIdx.x];
  if (barrier) __syncthreads();
  out[threadIdx.x] = tile[(threadIdx.x + 32) % 64];  // written by the other warp
}

__global__ void chain(int* values) {
  if (threadIdx.x == 0) values[blockIdx.x + 1] = values[blockIdx.x] + 1;
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
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
