// WMMA emulated for the CPU emulation of src/cuda (see ../emu.h). On the GPU a fragment is
// spread over the 32 threads of a warp; here every thread holds the whole 16 x 16 tile and
// does the warp's work redundantly (only lane 0 stores). Operands are widened to float and the
// products summed in float, as the tensor cores do (in another order).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "../emu.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// The whole tile, row-major in x (on the GPU, x holds a thread's share in an unspecified
// layout; element-wise arithmetic between fragments of one type is what kernels may do).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation knows 16x16x16 only");
  static constexpr int num_elements = 256;
  float x[256];
  float& v(int row, int col) { return x[row * 16 + col]; }
  const float& v(int row, int col) const { return x[row * 16 + col]; }
};

inline float to_float(const __half& h) {
  return static_cast<float>(c10::Half(h.x, c10::Half::from_bits()));
}
inline float to_float(const __nv_bfloat16& h) {
  return static_cast<float>(c10::BFloat16(h.x, c10::BFloat16::from_bits()));
}

// The CUDA programming guide's rules for every load and store: the tile starts 32-byte aligned
// and its rows (or columns) are a multiple of 16 bytes apart.
template <typename T>
void check_tile(const T* p, unsigned ldm, const char* what) {
  emu::check_aligned(p, 32, what);
  if (ldm * sizeof(T) % 16 != 0) {
    std::fprintf(stderr, "emu: %s with ldm %u: not a multiple of 16 bytes\n", what, ldm);
    std::abort();
  }
}

// A: element (m, k) at p[m * ldm + k] (row_major) or p[m + k * ldm] (col_major).
template <typename T, typename Layout>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_tile(p, ldm, "wmma::load_matrix_sync (matrix_a)");
  for (int m = 0; m < 16; ++m) {
    for (int k = 0; k < 16; ++k) {
      f.v(m, k) = to_float(std::is_same_v<Layout, row_major> ? p[m * ldm + k] : p[m + k * ldm]);
    }
  }
}

// B: element (k, n) at p[k * ldm + n] (row_major) or p[k + n * ldm] (col_major).
template <typename T, typename Layout>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_tile(p, ldm, "wmma::load_matrix_sync (matrix_b)");
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < 16; ++n) {
      f.v(k, n) = to_float(std::is_same_v<Layout, row_major> ? p[k * ldm + n] : p[k + n * ldm]);
    }
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (float& x : f.x) x = value;
}

template <typename A, typename B>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const A& a, const B& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  emu::require_tensor_core_code();
  // Each of out's sums starts at c and adds the products in increasing k; k outside n lets
  // the compiler work on a row's 16 sums at once, in the same order.
  fragment<accumulator, 16, 16, 16, float> out = c;
  for (int m = 0; m < 16; ++m) {
    for (int k = 0; k < 16; ++k) {
      const float a_mk = a.v(m, k);
      for (int n = 0; n < 16; ++n) out.v(m, n) += a_mk * b.v(k, n);
    }
  }
  d = out;
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  check_tile(p, ldm, "wmma::load_matrix_sync (accumulator)");
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 16; ++n) {
      f.v(m, n) = p[layout == mem_row_major ? m * ldm + n : m + n * ldm];
    }
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check_tile(p, ldm, "wmma::store_matrix_sync");
  if (emu::lane_id() != 0) return;
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 16; ++n) {
      p[layout == mem_row_major ? m * ldm + n : m + n * ldm] = f.v(m, n);
    }
  }
}

}  // namespace nvcuda::wmma
