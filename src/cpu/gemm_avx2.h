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
// The register tiles are arrays indexed by loop counters: fully unrolled, they live in registers.
#define SPCONV_LITE_UNROLL _Pragma("GCC unroll 16")

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

// acc_rows[r][co + c] += sum_ci x_rows[r][ci] * w[ci * c_out + co + c] for R rows and the
// 8 * V columns c from co: each weight vector is loaded once and used R times. R * V
// accumulators are R * V independent FMA chains, which keep both FMA units busy from about 8.
template <int R, int V>
SPCONV_LITE_AVX2 void rows_times_columns(const float* const* x_rows, float* const* acc_rows,
                                         const float* w, int64_t c_in, int64_t c_out,
                                         int64_t co) {
  __m256 a[R][V];
  SPCONV_LITE_UNROLL
  for (int r = 0; r < R; ++r) {
    SPCONV_LITE_UNROLL
    for (int v = 0; v < V; ++v) a[r][v] = _mm256_setzero_ps();
  }
  for (int64_t ci = 0; ci < c_in; ++ci) {
    __m256 wv[V];
    SPCONV_LITE_UNROLL
    for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(w + ci * c_out + co + 8 * v);
    SPCONV_LITE_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x_rows[r] + ci);
      SPCONV_LITE_UNROLL
      for (int v = 0; v < V; ++v) a[r][v] = _mm256_fmadd_ps(xv, wv[v], a[r][v]);
    }
  }
  SPCONV_LITE_UNROLL
  for (int r = 0; r < R; ++r) {
    SPCONV_LITE_UNROLL
    for (int v = 0; v < V; ++v) {
      float* dst = acc_rows[r] + co + 8 * v;
      _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), a[r][v]));
    }
  }
}

// The same for the last c_out - co (< 8) columns, through lane masks.
template <int R>
SPCONV_LITE_AVX2 void rows_times_last_columns(const float* const* x_rows,
                                              float* const* acc_rows, const float* w,
                                              int64_t c_in, int64_t c_out, int64_t co) {
  const __m256i mask = tail_mask(c_out - co);
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
  for (int64_t ci = 0; ci < c_in; ++ci) {
    const __m256 wv = _mm256_maskload_ps(w + ci * c_out + co, mask);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x_rows[r] + ci), wv, a[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* dst = acc_rows[r] + co;
    _mm256_maskstore_ps(dst, mask, _mm256_add_ps(_mm256_maskload_ps(dst, mask), a[r]));
  }
}

// R rows times the columns [co, c_out): strips of 8 * V columns, then narrower ones.
template <int R, int V>
SPCONV_LITE_AVX2 void rows_times_columns_from(const float* const* x_rows,
                                              float* const* acc_rows, const float* w,
                                              int64_t c_in, int64_t c_out, int64_t co) {
  for (; co + 8 * V <= c_out; co += 8 * V) {
    rows_times_columns<R, V>(x_rows, acc_rows, w, c_in, c_out, co);
  }
  if constexpr (V > 1) {
    rows_times_columns_from<R, V / 2>(x_rows, acc_rows, w, c_in, c_out, co);
  } else if (co < c_out) {
    rows_times_last_columns<R>(x_rows, acc_rows, w, c_in, c_out, co);
  }
}

// acc_rows[p] += x_rows[p] @ w for `count` pairs of rows. Tiles of 6 rows go one strip of 16
// columns at a time, so that a strip's weights (c_in x 16 floats) stay in L1 while every tile
// uses them (a tile sweeping a wide layer's weights streamed them from L2 for each 6 rows).
// The last count % 6 rows, all the pairs a sparse offset has in a block, take wider strips
// (up to 64 columns for one row): as many FMA chains as the registers hold (8 or more for 1,
// 2, 4 and 5 rows, 6 for 3; fewer in the narrower strips left at the right edge). Every
// output element is one FMA chain over ci plus one add, whichever tile computes it.
SPCONV_LITE_AVX2 inline void rows_times_matrix_all(const float* const* x_rows,
                                                   float* const* acc_rows, int64_t count,
                                                   const float* w, int64_t c_in,
                                                   int64_t c_out) {
  constexpr int kTile = 6;
  const int64_t tiled = count - count % kTile;
  int64_t co = 0;
  for (; co + 16 <= c_out; co += 16) {
    for (int64_t p = 0; p < tiled; p += kTile) {
      rows_times_columns<kTile, 2>(x_rows + p, acc_rows + p, w, c_in, c_out, co);
    }
  }
  if (co < c_out) {
    for (int64_t p = 0; p < tiled; p += kTile) {
      rows_times_columns_from<kTile, 1>(x_rows + p, acc_rows + p, w, c_in, c_out, co);
    }
  }
  const float* const* x = x_rows + tiled;
  float* const* acc = acc_rows + tiled;
  switch (count - tiled) {
    case 5: rows_times_columns_from<5, 2>(x, acc, w, c_in, c_out, 0); break;
    case 4: rows_times_columns_from<4, 2>(x, acc, w, c_in, c_out, 0); break;
    case 3: rows_times_columns_from<3, 2>(x, acc, w, c_in, c_out, 0); break;
    case 2: rows_times_columns_from<2, 4>(x, acc, w, c_in, c_out, 0); break;
    case 1: rows_times_columns_from<1, 8>(x, acc, w, c_in, c_out, 0); break;
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
