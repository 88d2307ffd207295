// The float32 tiles of the CPU gather-GEMM-scatter (gemm_tiles.inc) for AVX2 and for AVX-512;
// conv_cpu.cpp picks one per call (float_tiles).
#pragma once

#include "simd_x86.h"

#ifdef SPCONV_LITE_HAS_AVX2_KERNELS

namespace spconv_lite {
namespace avx2 {
#define SPCONV_LITE_TILES SPCONV_LITE_AVX2
#include "gemm_tiles.inc"
#undef SPCONV_LITE_TILES
}  // namespace avx2

namespace avx512 {
#define SPCONV_LITE_TILES SPCONV_LITE_AVX512
#include "gemm_tiles.inc"
#undef SPCONV_LITE_TILES
}  // namespace avx512
}  // namespace spconv_lite

#endif
