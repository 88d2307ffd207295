// x86-64 vector instruction sets for the CPU kernels, chosen at run time.
//
// Functions that use AVX2 or AVX-512 are compiled for them through target attributes and are
// only called after a run-time CPU check, so the extension itself still builds and runs on any
// x86-64 CPU. Each set is described by a struct of the few operations the float32 tiles need
// (gemm_tiles.inc), so that one tile code serves both.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPCONV_LITE_HAS_AVX2_KERNELS 1
#define SPCONV_LITE_AVX2 __attribute__((target("avx2,fma")))
#define SPCONV_LITE_AVX512 __attribute__((target("avx512f,avx2,fma")))

namespace spconv_lite {
namespace avx2 {

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// 8 float lanes in 16 registers.
struct Simd {
  using vec = __m256;
  using mask = __m256i;
  static constexpr int kLanes = 8, kRegisters = 16, kTileRows = 6;
  SPCONV_LITE_AVX2 static vec zero() { return _mm256_setzero_ps(); }
  SPCONV_LITE_AVX2 static vec load(const float* p) { return _mm256_loadu_ps(p); }
  SPCONV_LITE_AVX2 static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  SPCONV_LITE_AVX2 static vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  SPCONV_LITE_AVX2 static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  SPCONV_LITE_AVX2 static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  // The first `count` (1 to 8) lanes.
  SPCONV_LITE_AVX2 static mask first(int64_t count) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
  }
  SPCONV_LITE_AVX2 static vec load(const float* p, mask m) { return _mm256_maskload_ps(p, m); }
  SPCONV_LITE_AVX2 static void store(float* p, mask m, vec v) { _mm256_maskstore_ps(p, m, v); }
};

}  // namespace avx2

namespace avx512 {

inline bool supported() {
  static const bool ok = avx2::supported() && __builtin_cpu_supports("avx512f");
  return ok;
}

// 16 float lanes in 32 registers.
struct Simd {
  using vec = __m512;
  using mask = __mmask16;
  static constexpr int kLanes = 16, kRegisters = 32, kTileRows = 12;
  SPCONV_LITE_AVX512 static vec zero() { return _mm512_setzero_ps(); }
  SPCONV_LITE_AVX512 static vec load(const float* p) { return _mm512_loadu_ps(p); }
  SPCONV_LITE_AVX512 static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  SPCONV_LITE_AVX512 static vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  SPCONV_LITE_AVX512 static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  SPCONV_LITE_AVX512 static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  // The first `count` (1 to 16) lanes.
  SPCONV_LITE_AVX512 static mask first(int64_t count) {
    return static_cast<mask>((1u << count) - 1u);
  }
  SPCONV_LITE_AVX512 static vec load(const float* p, mask m) {
    return _mm512_maskz_loadu_ps(m, p);
  }
  SPCONV_LITE_AVX512 static void store(float* p, mask m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
};

}  // namespace avx512
}  // namespace spconv_lite

#endif
