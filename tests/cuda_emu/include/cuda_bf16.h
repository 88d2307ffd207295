// Stub for the CPU emulation of src/cuda: storage type only (the kernels reinterpret
// c10::BFloat16).
#pragma once
struct __nv_bfloat16 {
  unsigned short x;
};
