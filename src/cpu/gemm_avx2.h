// Register-blocked float32 micro-kernels for the CPU gather-GEMM-scatter (AVX2 + FMA).
//
// The functions are compiled for AVX2/FMA through target attributes and are only called after
// a run-time CPU check, so the extension itself still builds and runs on any x86-64 CPU.
// Every output element is computed by one fixed sequence of operations (an FMA chain over the
// input channels, then one add into its accumulator), whatever tile it lands in, so results do
// not depend on how rows are split between threads.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPCONV_LITE_HAS_AVX2_KERNELS 1
#define SPCONV_LITE_AVX2 __attribute__((target("avx2,fma")))

namespace spconv_lite {
namespace avx2 {

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// Lane mask selecting the first `count` (< 8) floats of a vector.
SPCONV_LITE_AVX2 inline __m256i tail_mask(int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
}

// acc_rows[r][co] += sum_ci x_rows[r][ci] * w[ci * c_out + co] for R rows at once: each weight
// vector is loaded once and used R times (R * 2 accumulators + 2 weights + 1 broadcast <= 16
// registers for R = 6).
template <int R>
SPCONV_LITE_AVX2 void rows_times_matrix(const float* const* x_rows, float* const* acc_rows,
                                        const float* w, int64_t c_in, int64_t c_out) {
  int64_t co = 0;
  for (; co + 16 <= c_out; co += 16) {
    __m256 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t ci = 0; ci < c_in; ++ci) {
      const __m256 w0 = _mm256_loadu_ps(w + ci * c_out + co);
      const __m256 w1 = _mm256_loadu_ps(w + ci * c_out + co + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x_rows[r] + ci);
        a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]);
        a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float* dst = acc_rows[r] + co;
      _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), a0[r]));
      _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), a1[r]));
    }
  }
  for (; co < c_out; co += 8) {
    const __m256i mask = tail_mask(c_out - co < 8 ? c_out - co : 8);
    __m256 a0[R];
    for (int r = 0; r < R; ++r) a0[r] = _mm256_setzero_ps();
    for (int64_t ci = 0; ci < c_in; ++ci) {
      const __m256 w0 = _mm256_maskload_ps(w + ci * c_out + co, mask);
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x_rows[r] + ci), w0, a0[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float* dst = acc_rows[r] + co;
      _mm256_maskstore_ps(dst, mask, _mm256_add_ps(_mm256_maskload_ps(dst, mask), a0[r]));
    }
  }
}

// Runs rows_times_matrix over `count` rows in tiles of 6, the tail with a smaller tile.
SPCONV_LITE_AVX2 inline void rows_times_matrix_all(const float* const* x_rows,
                                                   float* const* acc_rows, int64_t count,
                                                   const float* w, int64_t c_in,
                                                   int64_t c_out) {
  constexpr int kTile = 6;
  int64_t p = 0;
  for (; p + kTile <= count; p += kTile) {
    rows_times_matrix<kTile>(x_rows + p, acc_rows + p, w, c_in, c_out);
  }
  switch (count - p) {
    case 5: rows_times_matrix<5>(x_rows + p, acc_rows + p, w, c_in, c_out); break;
    case 4: rows_times_matrix<4>(x_rows + p, acc_rows + p, w, c_in, c_out); break;
    case 3: rows_times_matrix<3>(x_rows + p, acc_rows + p, w, c_in, c_out); break;
    case 2: rows_times_matrix<2>(x_rows + p, acc_rows + p, w, c_in, c_out); break;
    case 1: rows_times_matrix<1>(x_rows + p, acc_rows + p, w, c_in, c_out); break;
    default: break;
  }
}

// dw[c][co] += sum_p x_rows[p][c0 + c] * g_rows[p][co] for CI consecutive channels c from c0
// over `count` pairs of rows: the sums stay in registers (CI * 2 accumulators), then are added
// to dw (already offset to channel c0) once.
template <int CI>
SPCONV_LITE_AVX2 void pairs_outer_product(const float* const* x_rows, int64_t c0,
                                          const float* const* g_rows, int64_t count, float* dw,
                                          int64_t c_out) {
  int64_t co = 0;
  for (; co + 16 <= c_out; co += 16) {
    __m256 a0[CI], a1[CI];
    for (int c = 0; c < CI; ++c) a0[c] = a1[c] = _mm256_setzero_ps();
    for (int64_t p = 0; p < count; ++p) {
      const __m256 g0 = _mm256_loadu_ps(g_rows[p] + co);
      const __m256 g1 = _mm256_loadu_ps(g_rows[p] + co + 8);
      const float* x = x_rows[p] + c0;
      for (int c = 0; c < CI; ++c) {
        const __m256 xv = _mm256_broadcast_ss(x + c);
        a0[c] = _mm256_fmadd_ps(xv, g0, a0[c]);
        a1[c] = _mm256_fmadd_ps(xv, g1, a1[c]);
      }
    }
    for (int c = 0; c < CI; ++c) {
      float* dst = dw + c * c_out + co;
      _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), a0[c]));
      _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), a1[c]));
    }
  }
  for (; co < c_out; co += 8) {
    const __m256i mask = tail_mask(c_out - co < 8 ? c_out - co : 8);
    __m256 a0[CI];
    for (int c = 0; c < CI; ++c) a0[c] = _mm256_setzero_ps();
    for (int64_t p = 0; p < count; ++p) {
      const __m256 g0 = _mm256_maskload_ps(g_rows[p] + co, mask);
      const float* x = x_rows[p] + c0;
      for (int c = 0; c < CI; ++c) {
        a0[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + c), g0, a0[c]);
      }
    }
    for (int c = 0; c < CI; ++c) {
      float* dst = dw + c * c_out + co;
      _mm256_maskstore_ps(dst, mask, _mm256_add_ps(_mm256_maskload_ps(dst, mask), a0[c]));
    }
  }
}

// pairs_outer_product over all c_in channels, in blocks of 6 (12 accumulators).
SPCONV_LITE_AVX2 inline void pairs_outer_product_all(const float* const* x_rows, int64_t c_in,
                                                     const float* const* g_rows, int64_t count,
                                                     float* dw, int64_t c_out) {
  int64_t c = 0;
  for (; c + 6 <= c_in; c += 6) {
    pairs_outer_product<6>(x_rows, c, g_rows, count, dw + c * c_out, c_out);
  }
  float* tail = dw + c * c_out;
  switch (c_in - c) {
    case 5: pairs_outer_product<5>(x_rows, c, g_rows, count, tail, c_out); break;
    case 4: pairs_outer_product<4>(x_rows, c, g_rows, count, tail, c_out); break;
    case 3: pairs_outer_product<3>(x_rows, c, g_rows, count, tail, c_out); break;
    case 2: pairs_outer_product<2>(x_rows, c, g_rows, count, tail, c_out); break;
    case 1: pairs_outer_product<1>(x_rows, c, g_rows, count, tail, c_out); break;
    default: break;
  }
}

}  // namespace avx2
}  // namespace spconv_lite

#endif
