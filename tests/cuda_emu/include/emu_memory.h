// New tensors of the emulated CUDA sources (build.py turns their at::empty and at::empty_like
// into these, and force-includes this header): on a GPU, torch's caching allocator hands out
// memory that earlier tensors wrote; a CPU's fresh pages are zeros, which would hide a kernel
// that leaves part of its output or scratch unwritten where zero is the right value. The
// bytes are filled instead, as emu.h fills shared memory (fill_byte: 0xFF and 0x7F in turn).
// Force-included after emu.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <atomic>
#include <cstring>

namespace emu {

inline at::Tensor filled(at::Tensor tensor) {
  static std::atomic<unsigned> tensors{0};
  if (tensor.numel() > 0) {
    std::memset(tensor.data_ptr(), fill_byte(tensors++), tensor.nbytes());
  }
  return tensor;
}

inline at::Tensor empty(at::IntArrayRef size, at::TensorOptions options) {
  return filled(at::empty(size, options));
}

inline at::Tensor empty_like(const at::Tensor& other) { return filled(at::empty_like(other)); }

}  // namespace emu
