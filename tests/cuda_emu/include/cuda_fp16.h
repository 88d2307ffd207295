// Stub for the CPU emulation of src/cuda: storage type only (the kernels reinterpret c10::Half).
#pragma once
struct __half {
  unsigned short x;
};
