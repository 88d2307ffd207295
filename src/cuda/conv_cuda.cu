// Sparse convolution compute on the GPU, driven by the neighbour tables of the kernel map.
//
// Two algorithms with the same results up to float rounding:
//
// * fused gather-GEMM-scatter ("implicit GEMM"): a block owns a tile of output rows x output
//   channels and loops over the kernel offsets and chunks of input channels. For each offset it
//   gathers the input rows named by nbr into shared memory (zeros where there is no
//   neighbour), multiplies them with that offset's weight slice and accumulates in registers:
//   float32 for float16 / bfloat16, on tensor cores (WMMA) on sm_80 and newer. A tile skips the
//   offsets where none of its rows has a neighbour. Each output element is written once: no
//   atomics, no host synchronisation, and the offsets are summed in order (deterministic).
//   Only real pairs contribute, as on the CPU: a step whose weight slice holds an inf or NaN
//   leaves out the rows without a neighbour (their zeros times inf would be NaN).
// * per-offset ATen GEMMs ("gemm"): the pairs of each offset (CSR over offsets, from one scan
//   of the table), then per offset a gather (index_select), a GEMM (at::mm, cuBLAS) and an add
//   into a float32 accumulator. An output row appears at most once per offset, so the add
//   needs no atomics. One host synchronisation per call: the pair counts size the GEMMs. The
//   GEMMs run in true float32 whatever torch's TF32 switches say, like the fused kernels, so
//   that the result does not depend on the algorithm.
//
// The input gradient is the forward op over nbr_t with transposed weights (ops.py). The weight
// gradient sums, per offset, in[i]^T grad_out[o] over its pairs: the fused kernel writes one
// partial sum per chunk of rows, which ATen adds up in a fixed order; the gemm path runs one
// GEMM per offset. There are no float atomics anywhere, so forward and backward are
// deterministic run to run without a special mode.
//
// SPCONV_LITE_CUDA_CONV_ALGO=fused|gemm forces an algorithm; auto picks per call (see
// use_fused).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "spconv_lite/checks.h"
#include "spconv_lite/cuda_utils.cuh"
#include "spconv_lite/row_order.h"

namespace spconv_lite {
namespace {

using cuda::blocks_for;
using cuda::current_stream;
using cuda::kThreads;
using cuda::table_entry;

// One pass of a fused conv kernel: the offsets [k_begin, k_end) over the output rows in `order`
// (a row of conv_row_order's result; null: in row order). The accumulator of each output row
// starts at acc_in (null: zero) and ends in acc_out (float / double, for the next pass) or, on
// the last pass, in out (scalar_t). A conv without a row order is one pass over every offset.
template <typename scalar_t>
struct ConvPass {
  using acc_t = at::opmath_type<scalar_t>;
  const int32_t* order;
  int k_begin;
  int k_end;
  const acc_t* acc_in;
  acc_t* acc_out;
  scalar_t* out;
};

// Output row of row t of the pass's order, or -1 past the end. An order entry outside the rows
// (an order that bypassed spconv_lite.ops' check) stops the kernel, as a bad table entry does.
template <typename scalar_t>
__device__ __forceinline__ int64_t pass_row(const ConvPass<scalar_t>& pass, int64_t t,
                                            int64_t rows) {
  if (t >= rows) return -1;
  if (pass.order == nullptr) return t;
  const int64_t row = pass.order[t];
  CUDA_KERNEL_ASSERT_MSG(row >= 0 && row < rows,
                         "spconv_lite: row order entry outside [0, rows of the table)");
  return row;
}

// Writes one accumulated value of output row o, column co (of c_out).
template <typename scalar_t>
__device__ __forceinline__ void pass_store(const ConvPass<scalar_t>& pass, int64_t o, int co,
                                           int c_out, at::opmath_type<scalar_t> value) {
  const int64_t at = o * c_out + co;
  if (pass.out != nullptr) {
    pass.out[at] = static_cast<scalar_t>(value);
  } else {
    pass.acc_out[at] = value;
  }
}

// ------------------------------------------------------------------------ SIMT fused kernels
// Any dtype, accumulating in at::opmath_type (float for half types, double for double).
// 256 threads, each computing a 4 x 4 sub-tile of a BM x BN tile with BM * BN = 4096; BN (16,
// 32 or 64) follows the number of output channels so that narrow layers waste little.

constexpr int kSimtBK = 16;  // reduction step: input channels (forward) or rows (weight grad)

// Whether v is inf or NaN (plain arithmetic: inf - inf and NaN - NaN are NaN, x - x is 0 for
// any finite x), so that the CPU emulation runs the same code.
template <typename T>
__device__ __forceinline__ bool non_finite(T v) {
  return !(v - v == T(0));
}

template <typename acc_t, int BM, int BN>
struct SimtTile {
  static constexpr int kTM = 4;
  static constexpr int kTN = 4;
  static constexpr int kThreadsN = BN / kTN;
  static_assert((BM / kTM) * (BN / kTN) == kThreads, "one 4x4 sub-tile per thread");

  // acc[i][j] += sum over kk of A[kk][ty*4 + i] * B[kk][tx*4 + j]; A is padded by one column
  // so that the transposed stores that fill it do not conflict on shared-memory banks. With
  // kMasked, only the rows i with row_valid[i] accumulate (row_valid is unused otherwise).
  template <bool kMasked>
  __device__ static void multiply(const acc_t (*A)[BM + 1], const acc_t (*B)[BN],
                                  acc_t (&acc)[kTM][kTN], int tx, int ty,
                                  const bool* row_valid) {
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      acc_t a[kTM];
      acc_t b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = A[kk][ty * kTM + i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) b[j] = B[kk][tx * kTN + j];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        if (kMasked && !row_valid[i]) continue;
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * b[j];
      }
    }
  }
};

// out[o] = sum_k in[nbr[o, k]] @ weight[k], weight [K, C_in, C_out], over one pass; grid
// (row tiles, channel tiles).
template <typename scalar_t, int BN>
__global__ void __launch_bounds__(kThreads)
    conv_simt_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight,
                     const int32_t* __restrict__ nbr, ConvPass<scalar_t> pass, int64_t rows,
                     int64_t in_rows, int volume, int c_in, int c_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int BM = 4096 / BN;
  using Tile = SimtTile<acc_t, BM, BN>;
  __shared__ acc_t A[kSimtBK][BM + 1];  // A[kk][m] = in[row of tile row m][c0 + kk]
  __shared__ acc_t B[kSimtBK][BN];      // B[kk][n] = weight[k][c0 + kk][col0 + n]
  __shared__ int32_t source[BM];        // input row of each tile row for the current offset
  __shared__ int64_t out_row[BM];       // output row of each tile row, -1 past the end
  const int tid = threadIdx.x;
  const int tx = tid % Tile::kThreadsN;
  const int ty = tid / Tile::kThreadsN;
  const int64_t row0 = int64_t{blockIdx.x} * BM;
  const int col0 = blockIdx.y * BN;
  for (int m = tid; m < BM; m += kThreads) out_row[m] = pass_row(pass, row0 + m, rows);
  __syncthreads();
  acc_t acc[Tile::kTM][Tile::kTN] = {};
  if (pass.acc_in != nullptr) {
#pragma unroll
    for (int i = 0; i < Tile::kTM; ++i) {
      const int64_t o = out_row[ty * Tile::kTM + i];
#pragma unroll
      for (int j = 0; j < Tile::kTN; ++j) {
        const int co = col0 + tx * Tile::kTN + j;
        if (o >= 0 && co < c_out) acc[i][j] = pass.acc_in[o * c_out + co];
      }
    }
  }
  for (int k = pass.k_begin; k < pass.k_end; ++k) {
    int any = 0;
    for (int m = tid; m < BM; m += kThreads) {
      const int64_t o = out_row[m];
      const int32_t i = o >= 0 ? table_entry(nbr, o * volume + k, in_rows) : -1;
      source[m] = i;
      any |= i >= 0;
    }
    if (!__syncthreads_or(any)) continue;  // no row of the tile has this neighbour
    const scalar_t* w = weight + int64_t{k} * c_in * c_out;
    for (int c0 = 0; c0 < c_in; c0 += kSimtBK) {
      for (int e = tid; e < BM * kSimtBK; e += kThreads) {
        const int m = e / kSimtBK, kk = e % kSimtBK, c = c0 + kk;
        const int32_t i = source[m];
        A[kk][m] = (i >= 0 && c < c_in) ? static_cast<acc_t>(in[int64_t{i} * c_in + c])
                                        : acc_t(0);
      }
      int weight_non_finite = 0;
      for (int e = tid; e < kSimtBK * BN; e += kThreads) {
        const int kk = e / BN, n = e % BN, c = c0 + kk, co = col0 + n;
        const acc_t value = (c < c_in && co < c_out)
                                ? static_cast<acc_t>(w[int64_t{c} * c_out + co])
                                : acc_t(0);
        B[kk][n] = value;
        weight_non_finite |= non_finite(value);
      }
      // Rows without a neighbour are zeros in A: times an inf / NaN weight they would add NaN
      // where the CPU adds nothing, so such a step leaves them out.
      if (__syncthreads_or(weight_non_finite)) {
        bool row_valid[Tile::kTM];
#pragma unroll
        for (int i = 0; i < Tile::kTM; ++i) row_valid[i] = source[ty * Tile::kTM + i] >= 0;
        Tile::template multiply<true>(A, B, acc, tx, ty, row_valid);
      } else {
        Tile::template multiply<false>(A, B, acc, tx, ty, nullptr);
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < Tile::kTM; ++i) {
    const int64_t o = out_row[ty * Tile::kTM + i];
    if (o < 0) continue;
#pragma unroll
    for (int j = 0; j < Tile::kTN; ++j) {
      const int co = col0 + tx * Tile::kTN + j;
      if (co < c_out) pass_store(pass, o, co, c_out, acc[i][j]);
    }
  }
}

// What one block of a fused weight-gradient kernel sums, grid (offsets, row chunks, C_in tiles
// x C_out tiles): over the rows [begin, end) of its chunk, offset k's products for the BM x BN
// tile at (ci0, co0) of partial[chunk, k] ([C_in, C_out], at partial_offset). The offsets go
// along x, the only grid dimension with more than 65535 blocks (rows_per_chunk makes at most
// 1024 chunks).
struct WeightGradBlock {
  int k, ci0, co0;
  int64_t begin, end, partial_offset;
  __device__ WeightGradBlock(int bm, int bn, int tiles_n, int64_t rows, int64_t rows_per_chunk,
                             int volume, int c_in, int c_out)
      : k(blockIdx.x),
        ci0(static_cast<int>(blockIdx.z) / tiles_n * bm),
        co0(static_cast<int>(blockIdx.z) % tiles_n * bn),
        begin(int64_t{blockIdx.y} * rows_per_chunk),
        end(std::min(rows, begin + rows_per_chunk)),
        partial_offset((int64_t{blockIdx.y} * volume + k) * c_in * c_out) {}
};

// Writes a SIMT thread's sums (its kTM x kTN sub-tile at tx, ty) into the block's tile of its
// partial sum, inside the channel counts.
template <typename Tile, typename acc_t>
__device__ __forceinline__ void store_simt_partial(const acc_t (&acc)[Tile::kTM][Tile::kTN],
                                                   const WeightGradBlock& block, acc_t* partial,
                                                   int tx, int ty, int c_in, int c_out) {
  acc_t* dst = partial + block.partial_offset;
#pragma unroll
  for (int i = 0; i < Tile::kTM; ++i) {
    const int ci = block.ci0 + ty * Tile::kTM + i;
    if (ci >= c_in) continue;
#pragma unroll
    for (int j = 0; j < Tile::kTN; ++j) {
      const int co = block.co0 + tx * Tile::kTN + j;
      if (co < c_out) dst[int64_t{ci} * c_out + co] = acc[i][j];
    }
  }
}

// partial[chunk, k] = sum over the chunk's rows o of in[nbr[o, k]]^T grad_out[o]
// ([C_in, C_out]); grid (offsets, row chunks, C_in tiles x C_out tiles).
template <typename scalar_t, int BN>
__global__ void __launch_bounds__(kThreads)
    weight_grad_simt_kernel(const scalar_t* __restrict__ in,
                            const scalar_t* __restrict__ grad_out,
                            const int32_t* __restrict__ nbr,
                            at::opmath_type<scalar_t>* __restrict__ partial, int64_t rows,
                            int64_t in_rows, int volume, int c_in, int c_out,
                            int64_t rows_per_chunk, int tiles_n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int BM = 4096 / BN;
  using Tile = SimtTile<acc_t, BM, BN>;
  __shared__ acc_t A[kSimtBK][BM + 1];  // A[kk][m] = in[row of step row kk][ci0 + m]
  __shared__ acc_t B[kSimtBK][BN];      // B[kk][n] = grad_out[step row kk][co0 + n]
  __shared__ int32_t source[kSimtBK];
  const int tid = threadIdx.x;
  const int tx = tid % Tile::kThreadsN;
  const int ty = tid / Tile::kThreadsN;
  const WeightGradBlock block(BM, BN, tiles_n, rows, rows_per_chunk, volume, c_in, c_out);
  acc_t acc[Tile::kTM][Tile::kTN] = {};
  for (int64_t r0 = block.begin; r0 < block.end; r0 += kSimtBK) {
    int any = 0;
    if (tid < kSimtBK) {
      const int64_t o = r0 + tid;
      const int32_t i = o < block.end ? table_entry(nbr, o * volume + block.k, in_rows) : -1;
      source[tid] = i;
      any = i >= 0;
    }
    if (!__syncthreads_or(any)) continue;
    for (int e = tid; e < kSimtBK * BM; e += kThreads) {
      const int kk = e / BM, m = e % BM, c = block.ci0 + m;
      const int32_t i = source[kk];
      A[kk][m] = (i >= 0 && c < c_in) ? static_cast<acc_t>(in[int64_t{i} * c_in + c]) : acc_t(0);
    }
    for (int e = tid; e < kSimtBK * BN; e += kThreads) {
      const int kk = e / BN, n = e % BN, co = block.co0 + n;
      B[kk][n] = (source[kk] >= 0 && co < c_out)
                     ? static_cast<acc_t>(grad_out[(r0 + kk) * c_out + co])
                     : acc_t(0);
    }
    __syncthreads();
    // Rows without a neighbour are zeros in both operands: no mask needed.
    Tile::template multiply<false>(A, B, acc, tx, ty, nullptr);
    __syncthreads();
  }
  store_simt_partial<Tile>(acc, block, partial, tx, ty, c_in, c_out);
}

// ------------------------------------------------------------------ tensor-core fused kernels
// float16 / bfloat16 on sm_80+: 64 x 64 tiles, 4 warps of 32 x 32 (2 x 2 WMMA 16x16x16
// fragments), reduction steps of 32, float32 accumulators. Shared-memory rows are padded by 8
// elements (16 bytes) against bank conflicts, keeping the 32-byte alignment WMMA needs.
// kVec: 16-byte loads, when the channel counts are multiples of 8 and the pointers aligned.

template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int kWmmaThreads = 128;
constexpr int kWmmaTile = 64;  // rows and columns of a block's tile
constexpr int kWmmaBK = 32;    // reduction step
constexpr int kWmmaPad = 8;

// 16 consecutive bytes (8 float16 / bfloat16 or 4 float32 elements) or zeros.
template <typename scalar_t>
__device__ __forceinline__ uint4 load16(const scalar_t* src, bool valid) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (valid) v = *reinterpret_cast<const uint4*>(src);
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ void copy16(scalar_t* dst, const scalar_t* src, bool valid) {
  *reinterpret_cast<uint4*>(dst) = load16(src, valid);
}

// Whether a float16 / bfloat16 / float32 value, given by its bits (the low 16 of `bits` for the
// half types), is inf or NaN: all its exponent bits are set.
template <typename scalar_t>
__device__ __forceinline__ bool non_finite_bits(uint32_t bits) {
  constexpr uint32_t exponent = std::is_same_v<scalar_t, c10::Half>       ? 0x7C00u
                                : std::is_same_v<scalar_t, c10::BFloat16> ? 0x7F80u
                                                                          : 0x7F800000u;
  return (bits & exponent) == exponent;
}

// The bits of the inf / NaN elements among those of a 32-bit word (two half-type elements or
// one float32).
template <typename scalar_t>
__device__ __forceinline__ uint32_t non_finite_mask(uint32_t word) {
  static_assert(sizeof(scalar_t) == 2 || sizeof(scalar_t) == 4, "16- or 32-bit elements");
  if constexpr (sizeof(scalar_t) == 4) {
    return non_finite_bits<scalar_t>(word) ? 0xFFFFFFFFu : 0u;
  } else {
    return (non_finite_bits<scalar_t>(word) ? 0x0000FFFFu : 0u) |
           (non_finite_bits<scalar_t>(word >> 16) ? 0xFFFF0000u : 0u);
  }
}

template <typename scalar_t>
__device__ __forceinline__ bool any_non_finite16(uint4 v) {
  return (non_finite_mask<scalar_t>(v.x) | non_finite_mask<scalar_t>(v.y) |
          non_finite_mask<scalar_t>(v.z) | non_finite_mask<scalar_t>(v.w)) != 0u;
}

// v with its inf / NaN elements replaced by zeros.
template <typename scalar_t>
__device__ __forceinline__ uint4 zero_non_finite16(uint4 v) {
  return make_uint4(v.x & ~non_finite_mask<scalar_t>(v.x), v.y & ~non_finite_mask<scalar_t>(v.y),
                    v.z & ~non_finite_mask<scalar_t>(v.z), v.w & ~non_finite_mask<scalar_t>(v.w));
}

using AccFragment = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// acc += A @ B for one warp's (16 FM) x (16 FN) part of a tile (32 x 32 by default) over a
// reduction step of BK: A is the warp's rows (row-major, leading dimension LDA), B the warp's
// columns (row-major, LDB).
template <typename T, int BK, int LDA, int LDB, int FM = 2, int FN = 2>
__device__ __forceinline__ void warp_mma(AccFragment (&acc)[FM][FN], const T* A, const T* B) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[FN];
#pragma unroll
    for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], A + i * 16 * LDA + kk, LDA);
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], B + kk * LDB + j * 16, LDB);
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
}

// acc += X^T @ G for one warp's (16 FM) x (16 FN) part (32 x 32 by default) of a
// weight-gradient tile over a reduction step of BK: X [BK, LDX] holds the gathered input rows
// (so X^T, the A operand, is column-major) from the warp's first column wm, G [BK, LDG] the
// output gradient rows from its first column wn.
template <typename T, int BK, int LDX, int LDG, int FM = 2, int FN = 2>
__device__ __forceinline__ void warp_mma_xt(AccFragment (&acc)[FM][FN], const T* X, const T* G) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[FM];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[FN];
#pragma unroll
    for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], X + kk * LDX + i * 16, LDX);
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], G + kk * LDG + j * 16, LDG);
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
}

// A warp's (16 FM) x (16 FN) float accumulators and its MMAs over a reduction step, in WMMA
// fragments (WarpWmma) or in mma.sync's registers (WarpMmaSync, variant mma=sync): the same
// interface, the same steps in the same order and, on the GPU, the same instructions
// (HMMA.16816.F32 / .F32.BF16 in sm_90's machine code), so the same sums. A is the warp's rows: element (m, k) at
// A[m * LDA + k], or with kColumnMajorA at A[k * LDA + m] (the weight gradient's X^T); B its
// columns, (k, n) at B[k * LDB + n]; C a float tile in shared memory from the warp's first
// element, LDC apart.
template <typename scalar_t, int FM, int FN>
struct WarpWmma {
  using T = typename WmmaType<scalar_t>::type;
  AccFragment acc[FM][FN];

  __device__ void clear() {
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
    }
  }
  template <int LDC>
  __device__ void load(const float* C) {
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        nvcuda::wmma::load_matrix_sync(acc[i][j], C + i * 16 * LDC + j * 16, LDC,
                                       nvcuda::wmma::mem_row_major);
      }
    }
  }
  // acc += C (conv_wmma_kernel's products with inf / NaN weights).
  template <int LDC>
  __device__ void add(const float* C) {
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        AccFragment products;
        nvcuda::wmma::load_matrix_sync(products, C + i * 16 * LDC + j * 16, LDC,
                                       nvcuda::wmma::mem_row_major);
        // Same fragment type, same element layout: element-wise addition is well defined.
        for (int t = 0; t < products.num_elements; ++t) acc[i][j].x[t] += products.x[t];
      }
    }
  }
  template <int LDC>
  __device__ void store(float* C) {
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        nvcuda::wmma::store_matrix_sync(C + i * 16 * LDC + j * 16, acc[i][j], LDC,
                                        nvcuda::wmma::mem_row_major);
      }
    }
  }
  template <int BK, int LDA, int LDB, bool kColumnMajorA>
  __device__ void multiply(const scalar_t* A, const scalar_t* B) {
    if constexpr (kColumnMajorA) {
      warp_mma_xt<T, BK, LDA, LDB, FM, FN>(acc, reinterpret_cast<const T*>(A),
                                           reinterpret_cast<const T*>(B));
    } else {
      warp_mma<T, BK, LDA, LDB, FM, FN>(acc, reinterpret_cast<const T*>(A),
                                        reinterpret_cast<const T*>(B));
    }
  }
};

// Lane l (g = l / 4, t = l % 4) holds element q of 16 x 8 tile (i, j) at row i * 16 + g +
// 8 (q / 2), column j * 8 + 2t + q % 2 (mma_m16n8k16). Operands come from shared memory by
// ldmatrix: A's 16 x 16 tiles as four 8 x 8 matrices (transposed when column-major), B's as two
// 16 x 8 tiles at a time, transposed (B is k-major, mma.sync wants its columns).
template <typename scalar_t, int FM, int FN>
struct WarpMmaSync {
  static constexpr bool kBFloat16 = std::is_same_v<scalar_t, c10::BFloat16>;
  static constexpr int FN8 = 2 * FN;  // 16 x 8 tiles across
  float acc[FM][FN8][4];

  __device__ static int lane() { return threadIdx.x % 32; }
  __device__ static int offset(int i, int j, int q, int ld) {  // of acc[i][j][q] in C
    const int l = lane();
    return (i * 16 + l / 4 + 8 * (q / 2)) * ld + j * 8 + 2 * (l % 4) + q % 2;
  }
  __device__ void clear() {
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN8; ++j) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
      }
    }
  }
  template <int LDC>
  __device__ void load(const float* C) {
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN8; ++j) {
#pragma unroll
        for (int q = 0; q < 4; q += 2) {  // two columns side by side: one 8-byte read
          const float2 v = *reinterpret_cast<const float2*>(C + offset(i, j, q, LDC));
          acc[i][j][q] = v.x;
          acc[i][j][q + 1] = v.y;
        }
      }
    }
  }
  template <int LDC>
  __device__ void store(float* C) const {
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
      for (int j = 0; j < FN8; ++j) {
#pragma unroll
        for (int q = 0; q < 4; q += 2) {
          *reinterpret_cast<float2*>(C + offset(i, j, q, LDC)) =
              make_float2(acc[i][j][q], acc[i][j][q + 1]);
        }
      }
    }
  }
  template <int BK, int LDA, int LDB, bool kColumnMajorA>
  __device__ void multiply(const scalar_t* A, const scalar_t* B) {
    const int l = lane();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[FM][4];
      uint32_t b[FN8][2];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        // Lane l gives a row of matrix l / 8: rows (m) 0-7, 8-15 at k 0-7, then at k 8-15; read
        // column-major, the k rows of matrices (m 0-7, k 0-7), (m 8-15, k 0-7), ...
        if constexpr (kColumnMajorA) {
          const int j = l / 8, r = l % 8;
          cuda::ldmatrix_x4<true>(a[i], A + (kk + r + (j / 2) * 8) * LDA + i * 16 + (j % 2) * 8);
        } else {
          cuda::ldmatrix_x4<false>(a[i], A + (i * 16 + l % 16) * LDA + kk + (l / 16) * 8);
        }
      }
#pragma unroll
      for (int j = 0; j < FN8; j += 2) {
        // Matrices (k 0-7, k 8-15) x (columns 0-7, 8-15) of the pair of tiles j, j + 1.
        uint32_t r[4];
        cuda::ldmatrix_x4<true>(r, B + (kk + l % 16) * LDB + j * 8 + (l / 16) * 8);
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN8; ++j) {
          cuda::mma_m16n8k16<kBFloat16>(acc[i][j], a[i], b[j][0], b[j][1]);
        }
      }
    }
  }
};

// Writes a weight-gradient block's accumulators (a WarpWmma or WarpMmaSync per warp), through
// the shared C [BM, LDC], to its C_in x C_out tile (from ci0, co0) of dst = partial[chunk, k]
// ([C_in, C_out]).
template <int BM, int BN, int LDC, typename Warp>
__device__ __forceinline__ void store_weight_grad_tile(Warp& acc, float* C, int wm, int wn,
                                                       int tid, float* dst, int ci0, int co0,
                                                       int c_in, int c_out) {
  acc.template store<LDC>(C + wm * LDC + wn);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += kWmmaThreads) {
    const int m = e / BN, n = e % BN, ci = ci0 + m, co = co0 + n;
    if (ci < c_in && co < c_out) dst[int64_t{ci} * c_out + co] = C[m * LDC + n];
  }
}

// The conv kernel's step for a weight tile B that holds an inf or NaN (rare): the products with
// those weights, for the rows that have a neighbour (source[m] >= 0) only, are added into C
// (zeroed first when clear_c), and the weights are then cleared in B, so that the MMA adds only
// finite products and the zero rows of A stay zero. Not inlined, so that it does not take
// registers from the kernel's main loop.
template <typename scalar_t, int BM, int BN, int BK, int LDA, int LDB, int LDC>
__device__ __noinline__ void add_non_finite_products(const scalar_t* A, scalar_t* B, float* C,
                                                     const int32_t* source, int tid,
                                                     bool clear_c) {
  if (clear_c) {
    for (int e = tid; e < BM * LDC; e += kWmmaThreads) C[e] = 0.0f;
    __syncthreads();
  }
  for (int e = tid; e < BM * BN; e += kWmmaThreads) {
    const int m = e / BN, n = e % BN;
    if (source[m] < 0) continue;
    float sum = 0.0f;
    for (int kk = 0; kk < BK; ++kk) {
      const scalar_t b = B[kk * LDB + n];
      if (non_finite_bits<scalar_t>(b.x)) {
        sum += static_cast<float>(A[m * LDA + kk]) * static_cast<float>(b);
      }
    }
    C[m * LDC + n] += sum;
  }
  __syncthreads();
  for (int e = tid; e < BK * BN; e += kWmmaThreads) {
    scalar_t& b = B[(e / BN) * LDB + e % BN];
    if (non_finite_bits<scalar_t>(b.x)) b = scalar_t(0.0f);
  }
  __syncthreads();
}

// out[o] = sum_k in[nbr[o, k]] @ weight[k] over one pass; grid (row tiles, channel tiles).
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kWmmaThreads)
    conv_wmma_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight,
                     const int32_t* __restrict__ nbr, ConvPass<scalar_t> pass, int64_t rows,
                     int64_t in_rows, int volume, int c_in, int c_out) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BM = kWmmaTile, BN = kWmmaTile, BK = kWmmaBK;
  constexpr int LDA = BK + kWmmaPad, LDB = BN + kWmmaPad, LDC = BN + 4;
  __shared__ __align__(32) scalar_t A[BM * LDA];  // A[m][kk]: gathered input rows
  __shared__ __align__(32) scalar_t B[BK * LDB];  // B[kk][n]: weight[k][c0 + kk][col0 + n]
  __shared__ __align__(32) float C[BM * LDC];
  __shared__ int32_t source[BM];
  __shared__ int64_t out_row[BM];  // output row of each tile row, -1 past the end
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t row0 = int64_t{blockIdx.x} * BM;
  const int col0 = blockIdx.y * BN;
  for (int m = tid; m < BM; m += kWmmaThreads) out_row[m] = pass_row(pass, row0 + m, rows);
  __syncthreads();
  WarpWmma<scalar_t, 2, 2> acc;
  if (pass.acc_in != nullptr) {  // the previous pass's sums, through C
    for (int e = tid; e < BM * BN; e += kWmmaThreads) {
      const int m = e / BN, n = e % BN, co = col0 + n;
      const int64_t o = out_row[m];
      C[m * LDC + n] = (o >= 0 && co < c_out) ? pass.acc_in[o * c_out + co] : 0.0f;
    }
    __syncthreads();
    acc.template load<LDC>(C + wm * LDC + wn);
    __syncthreads();  // every warp has read C before the corrections below may write it
  } else {
    acc.clear();
  }
  const scalar_t zero(0.0f);
  bool corrected = false;  // C holds products with inf / NaN weights (block-uniform)
  for (int k = pass.k_begin; k < pass.k_end; ++k) {
    int any = 0;
    if (tid < BM) {
      const int64_t o = out_row[tid];
      const int32_t i = o >= 0 ? table_entry(nbr, o * volume + k, in_rows) : -1;
      source[tid] = i;
      any = i >= 0;
    }
    if (!__syncthreads_or(any)) continue;
    const scalar_t* w = weight + int64_t{k} * c_in * c_out;
    for (int c0 = 0; c0 < c_in; c0 += BK) {
      int weight_non_finite = 0;
      if constexpr (kVec) {
        for (int e = tid; e < BM * (BK / 8); e += kWmmaThreads) {
          const int m = e / (BK / 8), c = c0 + (e % (BK / 8)) * 8;
          const int32_t i = source[m];
          copy16(A + m * LDA + (c - c0), in + int64_t{i} * c_in + c, i >= 0 && c < c_in);
        }
        for (int e = tid; e < BK * (BN / 8); e += kWmmaThreads) {
          const int kk = e / (BN / 8), n = (e % (BN / 8)) * 8, c = c0 + kk, co = col0 + n;
          const uint4 v = load16(w + int64_t{c} * c_out + co, c < c_in && co < c_out);
          *reinterpret_cast<uint4*>(B + kk * LDB + n) = v;
          weight_non_finite |= any_non_finite16<scalar_t>(v);
        }
      } else {
        for (int e = tid; e < BM * BK; e += kWmmaThreads) {
          const int m = e / BK, kk = e % BK, c = c0 + kk;
          const int32_t i = source[m];
          A[m * LDA + kk] = (i >= 0 && c < c_in) ? in[int64_t{i} * c_in + c] : zero;
        }
        for (int e = tid; e < BK * BN; e += kWmmaThreads) {
          const int kk = e / BN, n = e % BN, c = c0 + kk, co = col0 + n;
          const scalar_t value = (c < c_in && co < c_out) ? w[int64_t{c} * c_out + co] : zero;
          B[kk * LDB + n] = value;
          weight_non_finite |= non_finite_bits<scalar_t>(value.x);
        }
      }
      if (__syncthreads_or(weight_non_finite)) {
        // Rows without a neighbour are zeros in A: times an inf / NaN weight they would add NaN
        // where the CPU adds nothing.
        add_non_finite_products<scalar_t, BM, BN, BK, LDA, LDB, LDC>(A, B, C, source, tid,
                                                                    !corrected);
        corrected = true;
      }
      acc.template multiply<BK, LDA, LDB, false>(A + wm * LDA, B + wn);
      __syncthreads();
    }
  }
  if (corrected) {
    acc.template add<LDC>(C + wm * LDC + wn);
    __syncthreads();  // every warp has read C before it is overwritten
  }
  acc.template store<LDC>(C + wm * LDC + wn);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += kWmmaThreads) {
    const int m = e / BN, n = e % BN;
    const int64_t o = out_row[m];
    const int co = col0 + n;
    if (o >= 0 && co < c_out) pass_store(pass, o, co, c_out, C[m * LDC + n]);
  }
#else
  CUDA_KERNEL_ASSERT_MSG(false, "spconv_lite: tensor-core kernel launched below sm_80");
#endif
}

// ---------------------------------------------------------------- pipelined conv (variant)
// tiles=pipelined in SPCONV_LITE_CUDA_VARIANTS; not yet run on a GPU. A block owns 128 output
// rows (in the pass's row order; 64 where 128-row tiles would leave multiprocessors idle) x BN
// output channels, 4 warps. First it reads the tile's rows of
// the neighbour table (the pass's offsets, at most 32) into shared memory, once, which also
// tells which offsets have a neighbour in at least one of its rows; its reduction steps are only
// those offsets x the chunks of BK input channels. Each step's gathered input rows go global ->
// shared by cp.async (zero-filled where a row has no neighbour) in a 3-stage pipeline, so the
// gathers of the next two steps are in flight while the multiplications work on this one; the
// weight slice of a step is loaded into registers one step ahead and stored to shared memory
// after the multiplications, its inf / NaN entries replaced by zeros (their products with the
// rows that do have a neighbour are added in the epilogue, as the CPU adds them). BN and BK
// follow the channel counts (16, 32 or 64 columns; 16 or 32 input channels a step, float32 4 or
// 16), so that narrow layers do not multiply padding.
// The multiplications: float16 / bfloat16 on the tensor cores (PipelinedWmma, sm_80+), float32
// on the SIMT cores with up to 8 x 8 outputs a thread read from shared memory as float4
// (PipelinedSimt): one shared-memory load per 16 products, where the default SIMT kernel takes
// about 3.4 (its padded rows allow 16-byte loads only at some steps; counts from the machine
// code, scripts/cuda_compile_check.sh with CUDA_CHECK_SASS=1). Every output element's products
// are summed in the default kernels' order (offsets, then input channels, increasing;
// conv_wmma_kernel's 16-wide MMAs, conv_simt_kernel's one product at a time), so the results
// are the same. Needs channel counts that are multiples of 16 bytes' elements and
// 16-byte aligned rows (the launcher pads).

constexpr int kPipelinedMaxOffsets = 32;  // offsets of one pass (bits of a mask)

template <typename scalar_t, int BM_, int BN_, int BK_>
struct PipelinedTile {
  using Element = scalar_t;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kStages = 3, kThreads = 128;
  static constexpr int kVec = 16 / sizeof(scalar_t);  // elements of one 16-byte copy
  // Shared rows padded by 16 bytes against bank conflicts, keeping WMMA's 32-byte alignment.
  static constexpr int LDA = BK + kVec, LDB = BN + kVec, LDC = BN + 4;
  // Dynamic shared memory: the stages (A then B), with C over them after the main loop; the
  // output rows; each thread's mask of offsets with a neighbour; the tile's table rows, as many
  // offsets as the pass has (fewer bytes with row-order splits: more blocks per SM).
  static constexpr int kStageA = BM * LDA * sizeof(scalar_t);
  static constexpr int kStageB = BK * LDB * sizeof(scalar_t);
  static constexpr int kPipeline = kStages * (kStageA + kStageB);
  static constexpr int kC = BM * LDC * 4;
  static constexpr int kUnion = ((kPipeline > kC ? kPipeline : kC) + 15) / 16 * 16;
  static constexpr int kRows = BM * 8;
  static constexpr int kTableStart = kUnion + kRows + kThreads * 4;
  static constexpr int bytes(int offsets) { return kTableStart + BM * offsets * 4; }
  static constexpr int kBChunks = (BK * BN / kVec + kThreads - 1) / kThreads;  // per thread
  static_assert(BK % kVec == 0 && BN % kVec == 0, "whole 16-byte copies");
  static_assert(kStageA % 32 == 0 && kStageB % 32 == 0, "WMMA needs 32-byte aligned tiles");
};

// The tensor cores' part of a pipelined tile (float16 / bfloat16, sm_80+): each warp a WM x WN
// part of the tile, accumulating in float in a Warp (WarpWmma, or WarpMmaSync with mma=sync).
template <typename Tile, template <typename, int, int> class Warp>
struct PipelinedTensorCores {
  static constexpr int kWarpsN = Tile::BN >= 64 ? 2 : 1;
  static constexpr int kWarpsM = 4 / kWarpsN;
  static constexpr int WM = Tile::BM / kWarpsM, WN = Tile::BN / kWarpsN;
  Warp<typename Tile::Element, WM / 16, WN / 16> warp;
  int wm, wn;  // the warp's first row and column in the tile

  __device__ explicit PipelinedTensorCores(int tid)
      : wm((tid / 32 / kWarpsN) * WM), wn((tid / 32 % kWarpsN) * WN) {}
  __device__ void clear() { warp.clear(); }
  __device__ void load(const float* C) {  // C [BM, LDC]
    warp.template load<Tile::LDC>(C + wm * Tile::LDC + wn);
  }
  // acc += A @ B over one step: A [BM, LDA], B [BK, LDB].
  __device__ void multiply(const typename Tile::Element* A, const typename Tile::Element* B) {
    warp.template multiply<Tile::BK, Tile::LDA, Tile::LDB, false>(A + wm * Tile::LDA, B + wn);
  }
  __device__ void store(float* C) { warp.template store<Tile::LDC>(C + wm * Tile::LDC + wn); }
};

// The SIMT part of a pipelined tile (float32): thread (ty, tx) owns rows ty + i * kThreadsM and
// the groups of 4 columns tx + g * kThreadsN, so that a warp's float4 reads of A fall on
// consecutive rows (16-byte padded: distinct banks) and those of B on consecutive columns.
template <typename Tile>
struct PipelinedSimt {
  static_assert(std::is_same_v<typename Tile::Element, float>, "float32 tiles");
  static constexpr int kThreadsN = Tile::BN >= 32 ? 8 : 4;
  static constexpr int kThreadsM = Tile::kThreads / kThreadsN;
  static constexpr int TM = Tile::BM / kThreadsM, TN = Tile::BN / kThreadsN;
  static constexpr int kGroups = TN / 4;
  static_assert(Tile::BM % kThreadsM == 0 && TN % 4 == 0, "whole float4 groups");
  float acc[TM][TN];
  int ty, tx;

  __device__ explicit PipelinedSimt(int tid) : ty(tid / kThreadsN), tx(tid % kThreadsN) {}
  __device__ int row(int i) const { return ty + i * kThreadsM; }
  __device__ int group(int g) const { return (g * kThreadsN + tx) * 4; }  // its first column
  __device__ void clear() {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
    }
  }
  __device__ void load(const float* C) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(C + row(i) * Tile::LDC + group(g));
        acc[i][g * 4] = v.x;
        acc[i][g * 4 + 1] = v.y;
        acc[i][g * 4 + 2] = v.z;
        acc[i][g * 4 + 3] = v.w;
      }
    }
  }
  // acc += A @ B over one step, one product at a time in increasing input channel, as
  // conv_simt_kernel adds them.
  __device__ void multiply(const float* A, const float* B) {
#pragma unroll
    for (int k0 = 0; k0 < Tile::BK; k0 += 4) {
      float a[TM][4];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float4 v = *reinterpret_cast<const float4*>(A + row(i) * Tile::LDA + k0);
        a[i][0] = v.x;
        a[i][1] = v.y;
        a[i][2] = v.z;
        a[i][3] = v.w;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float b[TN];
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          const float4 v =
              *reinterpret_cast<const float4*>(B + (k0 + q) * Tile::LDB + group(g));
          b[g * 4] = v.x;
          b[g * 4 + 1] = v.y;
          b[g * 4 + 2] = v.z;
          b[g * 4 + 3] = v.w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += a[i][q] * b[j];
        }
      }
    }
  }
  __device__ void store(float* C) const {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        *reinterpret_cast<float4*>(C + row(i) * Tile::LDC + group(g)) =
            make_float4(acc[i][g * 4], acc[i][g * 4 + 1], acc[i][g * 4 + 2], acc[i][g * 4 + 3]);
      }
    }
  }
};

// Index of the lowest set bit, -1 when none.
__host__ __device__ __forceinline__ int lowest_bit(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __ffs(bits) - 1;
#else
  return __builtin_ffs(static_cast<int>(bits)) - 1;
#endif
}

// Walks the steps of a pass: the offsets with a neighbour (bits of a mask, in increasing order)
// x the chunks of input channels.
struct StepCursor {
  uint32_t remaining;  // offsets not finished, as bits relative to the pass's first offset
  int offset;          // the current one (-1 when done)
  int c0;              // first input channel of the current chunk
  __host__ __device__ explicit StepCursor(uint32_t offsets)
      : remaining(offsets), offset(lowest_bit(offsets)), c0(0) {}
  __host__ __device__ void next(int c_in, int bk) {
    c0 += bk;
    if (c0 < c_in) return;
    c0 = 0;
    remaining &= remaining - 1u;  // drop the lowest bit
    offset = lowest_bit(remaining);
  }
};

// One block of conv_pipelined_kernel, its multiplications done by Math (PipelinedWmma or
// PipelinedSimt).
template <typename Tile, typename Math, typename scalar_t = typename Tile::Element>
__device__ __forceinline__ void conv_pipelined_tile(const scalar_t* __restrict__ in,
                                                    const scalar_t* __restrict__ weight,
                                                    const int32_t* __restrict__ nbr,
                                                    const ConvPass<scalar_t>& pass, int64_t rows,
                                                    int64_t in_rows, int volume, int c_in,
                                                    int c_out) {
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, kStages = Tile::kStages;
  constexpr int LDA = Tile::LDA, LDB = Tile::LDB, LDC = Tile::LDC, kThreadsN = Tile::kThreads;
  constexpr int kVec = Tile::kVec;
  unsigned char* smem = cuda::dynamic_shared_memory();
  scalar_t* stage_a = reinterpret_cast<scalar_t*>(smem);  // [kStages][BM][LDA]
  scalar_t* stage_b = reinterpret_cast<scalar_t*>(smem + kStages * Tile::kStageA);
  float* C = reinterpret_cast<float*>(smem);  // [BM][LDC], once the stages are done
  int64_t* out_row = reinterpret_cast<int64_t*>(smem + Tile::kUnion);
  uint32_t* thread_offsets = reinterpret_cast<uint32_t*>(smem + Tile::kUnion + Tile::kRows);
  int32_t* tile_table = reinterpret_cast<int32_t*>(smem + Tile::kTableStart);  // [BM][offsets]
  const int tid = threadIdx.x;
  const int64_t row0 = int64_t{blockIdx.x} * BM;
  const int col0 = blockIdx.y * BN;
  const int k0 = pass.k_begin, offsets = pass.k_end - pass.k_begin;  // offsets <= 32

  for (int m = tid; m < BM; m += kThreadsN) out_row[m] = pass_row(pass, row0 + m, rows);
  __syncthreads();
  uint32_t mine = 0;  // offsets where a row this thread read has a neighbour
  for (int e = tid; e < BM * offsets; e += kThreadsN) {
    const int m = e / offsets, j = e % offsets;
    const int64_t o = out_row[m];
    const int32_t i = o >= 0 ? table_entry(nbr, o * volume + k0 + j, in_rows) : -1;
    tile_table[e] = i;
    if (i >= 0) mine |= 1u << j;
  }
  thread_offsets[tid] = mine;

  Math math(tid);
  if (pass.acc_in != nullptr) {  // the previous pass's sums, through C (before the stages)
    for (int e = tid; e < BM * BN; e += kThreadsN) {
      const int m = e / BN, n = e % BN, co = col0 + n;
      const int64_t o = out_row[m];
      C[m * LDC + n] = (o >= 0 && co < c_out) ? pass.acc_in[o * c_out + co] : 0.0f;
    }
    __syncthreads();
    math.load(C);
  } else {
    math.clear();
  }
  __syncthreads();  // the threads' offset masks are written, C is read
  uint32_t active = 0;  // block-uniform
  for (int t = 0; t < kThreadsN; ++t) active |= thread_offsets[t];
  const int chunks = (c_in + BK - 1) / BK;
  const int steps = __popc(active) * chunks;

  // The producer's side of a step: the gathered rows (cp.async) and the weights (registers).
  auto gather_rows = [&](int stage, const StepCursor& step) {
    scalar_t* A = stage_a + stage * (BM * LDA);
    for (int e = tid; e < BM * (BK / kVec); e += kThreadsN) {
      const int m = e / (BK / kVec), kk = (e % (BK / kVec)) * kVec, c = step.c0 + kk;
      const int32_t i = tile_table[m * offsets + step.offset];
      const bool valid = i >= 0 && c < c_in;
      cuda::cp_async16(A + m * LDA + kk, valid ? in + int64_t{i} * c_in + c : in, valid);
    }
  };
  uint4 b_regs[Tile::kBChunks];
  auto load_weights = [&](const StepCursor& step) {
    const scalar_t* w = weight + int64_t{k0 + step.offset} * c_in * c_out;
#pragma unroll
    for (int q = 0; q < Tile::kBChunks; ++q) {
      const int e = tid + q * kThreadsN;
      const int kk = e / (BN / kVec), n = (e % (BN / kVec)) * kVec, c = step.c0 + kk;
      const int co = col0 + n;
      b_regs[q] = load16(w + int64_t{c} * c_out + co,
                         e < BK * BN / kVec && c < c_in && co < c_out);
    }
  };
  auto store_weights = [&](int stage) {  // true when a weight was inf / NaN
    scalar_t* B = stage_b + stage * (BK * LDB);
    bool non_finite = false;
#pragma unroll
    for (int q = 0; q < Tile::kBChunks; ++q) {
      const int e = tid + q * kThreadsN;
      if (e >= BK * BN / kVec) continue;
      const int kk = e / (BN / kVec), n = (e % (BN / kVec)) * kVec;
      uint4 v = b_regs[q];
      if (any_non_finite16<scalar_t>(v)) {
        non_finite = true;
        v = zero_non_finite16<scalar_t>(v);
      }
      *reinterpret_cast<uint4*>(B + kk * LDB + n) = v;
    }
    return non_finite;
  };

  StepCursor producer(active), consumer(active);
  uint32_t stage_non_finite = 0;  // bit s: this thread stored an inf / NaN weight into stage s
  uint32_t non_finite_offsets = 0;  // block-uniform: offsets (bits) with an inf / NaN weight
  auto set_stage_bit = [&](int stage, bool value) {
    stage_non_finite = (stage_non_finite & ~(1u << stage)) | (uint32_t{value} << stage);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      gather_rows(s, producer);
      load_weights(producer);
      set_stage_bit(s, store_weights(s));
      producer.next(c_in, BK);
    }
    cuda::cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    const int stage = s % kStages;
    cuda::cp_async_wait<kStages - 2>();  // this thread's copies of step s have landed
    // Everyone's copies of step s have landed, everyone is done with step s - 1.
    if (__syncthreads_or((stage_non_finite >> stage) & 1u)) {
      non_finite_offsets |= 1u << consumer.offset;
    }
    const int ahead = s + kStages - 1, ahead_stage = ahead % kStages;
    if (ahead < steps) {  // into the stage of step s - 1
      gather_rows(ahead_stage, producer);
      load_weights(producer);
    }
    cuda::cp_async_commit();
    math.multiply(stage_a + stage * (BM * LDA), stage_b + stage * (BK * LDB));
    if (ahead < steps) {  // the weight loads had the multiplications' time to arrive
      set_stage_bit(ahead_stage, store_weights(ahead_stage));
      producer.next(c_in, BK);
    }
    consumer.next(c_in, BK);
  }
  cuda::cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages, which C overlays
  math.store(C);
  __syncthreads();
  if (non_finite_offsets != 0) {
    // The products with the inf / NaN weights left out of the multiplications, for the rows that
    // have a neighbour at their offset only (rare: not worth a fast path).
    for (int e = tid; e < BM * BN; e += kThreadsN) {
      const int m = e / BN, n = e % BN, co = col0 + n;
      if (out_row[m] < 0 || co >= c_out) continue;
      float sum = 0.0f;
      bool any = false;
      for (uint32_t bits = non_finite_offsets; bits != 0; bits &= bits - 1u) {
        const int j = lowest_bit(bits);
        const int32_t i = tile_table[m * offsets + j];
        if (i < 0) continue;
        const scalar_t* w = weight + int64_t{k0 + j} * c_in * c_out;
        for (int c = 0; c < c_in; ++c) {
          const float b = static_cast<float>(w[int64_t{c} * c_out + co]);
          if (non_finite(b)) {
            sum += static_cast<float>(in[int64_t{i} * c_in + c]) * b;
            any = true;
          }
        }
      }
      if (any) C[m * LDC + n] += sum;
    }
    __syncthreads();
  }
  for (int e = tid; e < BM * BN; e += kThreadsN) {
    const int m = e / BN, n = e % BN, co = col0 + n;
    const int64_t o = out_row[m];
    if (o >= 0 && co < c_out) pass_store(pass, o, co, c_out, C[m * LDC + n]);
  }
}

// kSyncMma: the tensor cores by ldmatrix + mma.sync instead of WMMA (float16 / bfloat16).
template <typename Tile, bool kSyncMma, typename scalar_t = typename Tile::Element>
__global__ void __launch_bounds__(Tile::kThreads)
    conv_pipelined_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight,
                          const int32_t* __restrict__ nbr, ConvPass<scalar_t> pass, int64_t rows,
                          int64_t in_rows, int volume, int c_in, int c_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    conv_pipelined_tile<Tile, PipelinedSimt<Tile>>(in, weight, nbr, pass, rows, in_rows, volume,
                                                   c_in, c_out);
  } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using Math = std::conditional_t<kSyncMma, PipelinedTensorCores<Tile, WarpMmaSync>,
                                    PipelinedTensorCores<Tile, WarpWmma>>;
    conv_pipelined_tile<Tile, Math>(in, weight, nbr, pass, rows, in_rows, volume, c_in, c_out);
#else
    CUDA_KERNEL_ASSERT_MSG(false, "spconv_lite: tensor-core kernel launched below sm_80");
#endif
  }
}

// partial[chunk, k] = sum over the chunk's rows o of in[nbr[o, k]]^T grad_out[o]; grid (row
// chunks, offsets, C_in tiles x C_out tiles). The gathered input rows X [rows, C_in] sit in
// shared memory row-major, which is X^T (the A operand) column-major.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kWmmaThreads)
    weight_grad_wmma_kernel(const scalar_t* __restrict__ in,
                            const scalar_t* __restrict__ grad_out,
                            const int32_t* __restrict__ nbr, float* __restrict__ partial,
                            int64_t rows, int64_t in_rows, int volume, int c_in, int c_out,
                            int64_t rows_per_chunk, int tiles_n) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int BM = kWmmaTile, BN = kWmmaTile, BK = kWmmaBK;
  constexpr int LDX = BM + kWmmaPad, LDG = BN + kWmmaPad, LDC = BN + 4;
  __shared__ __align__(32) scalar_t X[BK * LDX];  // X[kk][m] = in[row of step row kk][ci0 + m]
  __shared__ __align__(32) scalar_t G[BK * LDG];  // G[kk][n] = grad_out[step row kk][co0 + n]
  __shared__ __align__(32) float C[BM * LDC];
  __shared__ int32_t source[BK];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const WeightGradBlock block(BM, BN, tiles_n, rows, rows_per_chunk, volume, c_in, c_out);
  WarpWmma<scalar_t, 2, 2> acc;
  acc.clear();
  const scalar_t zero(0.0f);
  for (int64_t r0 = block.begin; r0 < block.end; r0 += BK) {
    int any = 0;
    if (tid < BK) {
      const int64_t o = r0 + tid;
      const int32_t i = o < block.end ? table_entry(nbr, o * volume + block.k, in_rows) : -1;
      source[tid] = i;
      any = i >= 0;
    }
    if (!__syncthreads_or(any)) continue;
    if constexpr (kVec) {
      for (int e = tid; e < BK * (BM / 8); e += kWmmaThreads) {
        const int kk = e / (BM / 8), m = (e % (BM / 8)) * 8, c = block.ci0 + m;
        const int32_t i = source[kk];
        copy16(X + kk * LDX + m, in + int64_t{i} * c_in + c, i >= 0 && c < c_in);
      }
      for (int e = tid; e < BK * (BN / 8); e += kWmmaThreads) {
        const int kk = e / (BN / 8), n = (e % (BN / 8)) * 8, co = block.co0 + n;
        copy16(G + kk * LDG + n, grad_out + (r0 + kk) * c_out + co, source[kk] >= 0 && co < c_out);
      }
    } else {
      for (int e = tid; e < BK * BM; e += kWmmaThreads) {
        const int kk = e / BM, m = e % BM, c = block.ci0 + m;
        const int32_t i = source[kk];
        X[kk * LDX + m] = (i >= 0 && c < c_in) ? in[int64_t{i} * c_in + c] : zero;
      }
      for (int e = tid; e < BK * BN; e += kWmmaThreads) {
        const int kk = e / BN, n = e % BN, co = block.co0 + n;
        G[kk * LDG + n] = (source[kk] >= 0 && co < c_out) ? grad_out[(r0 + kk) * c_out + co]
                                                           : zero;
      }
    }
    __syncthreads();
    acc.template multiply<BK, LDX, LDG, true>(X + wm, G + wn);
    __syncthreads();
  }
  store_weight_grad_tile<BM, BN, LDC>(acc, C, wm, wn, tid,
                                      partial + block.partial_offset,
                                      block.ci0, block.co0, c_in, c_out);
#else
  CUDA_KERNEL_ASSERT_MSG(false, "spconv_lite: tensor-core kernel launched below sm_80");
#endif
}

// ------------------------------------------------------- compacted weight gradient (variant)
// wgrad=compact in SPCONV_LITE_CUDA_VARIANTS; not yet run on a GPU. Same grid, chunks of rows
// and partial sums as the kernels above, but a block first queues the rows of its chunk that
// have a neighbour at its offset (kThreads rows scanned at a time, a block-wide prefix sum
// keeping them in row order), and each reduction step takes the next BK pairs of the queue: no
// multiplications of rows without a pair (only a chunk's last step is padded with zeros), no
// strided table reads inside the steps. Which pairs a step holds depends on the table and the
// chunking only, so the result is as deterministic as the chunked kernels'. The tensor-core
// kernel with 16-byte copies gathers each step by cp.async into one of two stages while the
// step before it is multiplied (for_each_pair_step_pipelined); the sums are the same.

// Appends the pair (in_row, out_row) of each thread that has one (in_row >= 0) to the queue, in
// thread order; returns the queue's new length (the same in every thread). `counts` has a slot
// per warp.
template <int kBlockThreads>
__device__ int queue_pairs(int32_t in_row, int64_t out_row, int32_t* queue_in,
                           int64_t* queue_out, int length, int* counts) {
  constexpr int kWarps = kBlockThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool valid = in_row >= 0;
  const unsigned ballot = __ballot_sync(0xffffffffu, valid);
  if (lane == 0) counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, total = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? counts[w] : 0;
    total += counts[w];
  }
  if (valid) {
    const int at = length + before + __popc(ballot & ((1u << lane) - 1u));
    queue_in[at] = in_row;
    queue_out[at] = out_row;
  }
  __syncthreads();  // the queue is complete and `counts` free again
  return length + total;
}

// Moves the queue's entries [used, used + left) to its front (left < the block's threads).
__device__ __forceinline__ void queue_drop(int32_t* queue_in, int64_t* queue_out, int used,
                                           int left) {
  const int tid = threadIdx.x;
  int32_t i = 0;
  int64_t o = 0;
  if (tid < left) {
    i = queue_in[used + tid];
    o = queue_out[used + tid];
  }
  __syncthreads();
  if (tid < left) {
    queue_in[tid] = i;
    queue_out[tid] = o;
  }
  __syncthreads();
}

// Runs step(first, count) over the pairs of offset k among the rows [begin, end), in row order,
// BK at a time (count < BK only for the last step).
template <int kBlockThreads, int BK, typename Step>
__device__ void for_each_pair_step(const int32_t* __restrict__ nbr, int64_t in_rows, int volume,
                                   int k, int64_t begin, int64_t end, int32_t* queue_in,
                                   int64_t* queue_out, int* counts, Step step) {
  int length = 0;
  for (int64_t r0 = begin; r0 < end; r0 += kBlockThreads) {
    const int64_t o = r0 + threadIdx.x;
    const int32_t i = o < end ? table_entry(nbr, o * volume + k, in_rows) : -1;
    length = queue_pairs<kBlockThreads>(i, o, queue_in, queue_out, length, counts);
    int used = 0;
    for (; length - used >= BK; used += BK) step(used, BK);
    if (used > 0) {
      queue_drop(queue_in, queue_out, used, length - used);
      length -= used;
    }
  }
  if (length > 0) step(0, length);
}

// Starts the cp.async copies of one step's gathered rows: dst[kk][m] = src[rows[first + kk]][c0 +
// m] for kk < count, zeros for the pairs past count; kWidth columns (whole 16-byte copies),
// dst's rows ld elements apart. Columns past the channels are left as they are: in a weight
// gradient they only reach outputs past the channels, which are never stored (a narrow first
// layer's 256-column tile then copies 4 columns, not 256).
template <int kBlockThreads, int BK, int kWidth, typename scalar_t, typename index_t>
__device__ __forceinline__ void gather_step_async(scalar_t* dst, int ld, const scalar_t* src,
                                                  int channels, int c0, const index_t* rows,
                                                  int first, int count) {
  constexpr int kVec = 16 / sizeof(scalar_t), kGroups = kWidth / kVec;
  static_assert(kWidth % kVec == 0, "whole 16-byte copies");
  for (int e = threadIdx.x; e < BK * kGroups; e += kBlockThreads) {
    const int kk = e / kGroups, m = (e % kGroups) * kVec, c = c0 + m;
    if (c >= channels) continue;
    const bool valid = kk < count;
    cuda::cp_async16(dst + kk * ld + m,
                     src + (valid ? int64_t{rows[first + kk]} * channels + c : 0), valid);
  }
}

// for_each_pair_step in a two-stage pipeline: issue(stage, first, count) starts a step's copies
// into one of two stages (cp.async), compute(stage) multiplies a stage whose copies have
// landed. A step's copies are in flight while the step before it is multiplied and the queue is
// refilled; the steps are multiplied in the same order as for_each_pair_step's.
template <int kBlockThreads, int BK, typename Issue, typename Compute>
__device__ void for_each_pair_step_pipelined(const int32_t* __restrict__ nbr, int64_t in_rows,
                                             int volume, int k, int64_t begin, int64_t end,
                                             int32_t* queue_in, int64_t* queue_out, int* counts,
                                             Issue issue, Compute compute) {
  int stage = 0;         // the stage of the next step
  bool pending = false;  // a step issued and not yet multiplied (in the other stage)
  auto finish_previous = [&](auto wait) {
    wait();           // this thread's copies of that step have landed
    __syncthreads();  // everyone's
    compute(stage ^ 1);
    __syncthreads();  // its stage is free to be refilled
  };
  for_each_pair_step<kBlockThreads, BK>(
      nbr, in_rows, volume, k, begin, end, queue_in, queue_out, counts,
      [&](int first, int count) {
        issue(stage, first, count);  // into the stage multiplied two steps ago
        cuda::cp_async_commit();
        if (pending) finish_previous([] { cuda::cp_async_wait<1>(); });
        pending = true;
        stage ^= 1;
      });
  if (pending) finish_previous([] { cuda::cp_async_wait<0>(); });
}

// partial[chunk, k] as weight_grad_simt_kernel computes it, over the queued pairs.
template <typename scalar_t, int BN>
__global__ void __launch_bounds__(kThreads)
    weight_grad_simt_compact_kernel(const scalar_t* __restrict__ in,
                                    const scalar_t* __restrict__ grad_out,
                                    const int32_t* __restrict__ nbr,
                                    at::opmath_type<scalar_t>* __restrict__ partial,
                                    int64_t rows, int64_t in_rows, int volume, int c_in,
                                    int c_out, int64_t rows_per_chunk, int tiles_n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int BM = 4096 / BN;
  using Tile = SimtTile<acc_t, BM, BN>;
  __shared__ acc_t A[kSimtBK][BM + 1];  // A[kk][m] = in[input row of pair kk][ci0 + m]
  __shared__ acc_t B[kSimtBK][BN];      // B[kk][n] = grad_out[output row of pair kk][co0 + n]
  __shared__ int32_t queue_in[kSimtBK + kThreads];
  __shared__ int64_t queue_out[kSimtBK + kThreads];
  __shared__ int counts[kThreads / 32];
  const int tid = threadIdx.x;
  const int tx = tid % Tile::kThreadsN;
  const int ty = tid / Tile::kThreadsN;
  const WeightGradBlock block(BM, BN, tiles_n, rows, rows_per_chunk, volume, c_in, c_out);
  acc_t acc[Tile::kTM][Tile::kTN] = {};
  for_each_pair_step<kThreads, kSimtBK>(
      nbr, in_rows, volume, block.k, block.begin, block.end, queue_in, queue_out, counts,
      [&](int first, int count) {
        for (int e = tid; e < kSimtBK * BM; e += kThreads) {
          const int kk = e / BM, m = e % BM, c = block.ci0 + m;
          A[kk][m] = (kk < count && c < c_in)
                         ? static_cast<acc_t>(in[int64_t{queue_in[first + kk]} * c_in + c])
                         : acc_t(0);
        }
        for (int e = tid; e < kSimtBK * BN; e += kThreads) {
          const int kk = e / BN, n = e % BN, co = block.co0 + n;
          B[kk][n] = (kk < count && co < c_out)
                         ? static_cast<acc_t>(grad_out[queue_out[first + kk] * c_out + co])
                         : acc_t(0);
        }
        __syncthreads();
        Tile::template multiply<false>(A, B, acc, tx, ty, nullptr);
        __syncthreads();
      });
  store_simt_partial<Tile>(acc, block, partial, tx, ty, c_in, c_out);
}

// The float32 weight gradient with 16-byte copies (`wgrad=compact`): the tile of
// weight_grad_simt_compact_kernel (BM x BN, so the same chunks) with half its threads, each
// owning 8 x 4 outputs read from shared memory as float4 (3 loads per 32 products, where the
// register-staged kernel's padded rows take about 3.6 loads of mixed widths per 16), and each
// step's pairs gathered by cp.async into one of two stages while the step before it is
// multiplied. Same pairs, same order, one product at a time: the same sums.
template <int BN_>
struct WeightGradSimtTile {
  static constexpr int BN = BN_, BM = 4096 / BN, BK = kSimtBK, kThreads = 128;
  static constexpr int TM = 8, TN = 4;  // a thread's input channels x output channels
  static constexpr int kThreadsN = BN / TN, kThreadsM = kThreads / kThreadsN;
  static constexpr int LDX = BM + 4, LDG = BN + 4;  // padded by 16 bytes against bank conflicts
  static_assert(kThreadsM * TM == BM, "two float4 groups of input channels a thread");
};

template <int BN>
__global__ void __launch_bounds__(WeightGradSimtTile<BN>::kThreads)
    weight_grad_simt_pipelined_kernel(const float* __restrict__ in,
                                      const float* __restrict__ grad_out,
                                      const int32_t* __restrict__ nbr, float* __restrict__ partial,
                                      int64_t rows, int64_t in_rows, int volume, int c_in,
                                      int c_out, int64_t rows_per_chunk, int tiles_n) {
  using Tile = WeightGradSimtTile<BN>;
  constexpr int BM = Tile::BM, BK = Tile::BK, TM = Tile::TM, TN = Tile::TN;
  constexpr int kThreadsM = Tile::kThreadsM, kBlockThreads = Tile::kThreads;
  // X[stage][kk][m] = in[input row of pair kk][ci0 + m], G[stage][kk][n] = grad_out[output row
  // of pair kk][co0 + n].
  __shared__ __align__(16) float X[2][BK][Tile::LDX];
  __shared__ __align__(16) float G[2][BK][Tile::LDG];
  __shared__ int32_t queue_in[BK + kBlockThreads];
  __shared__ int64_t queue_out[BK + kBlockThreads];
  __shared__ int counts[kBlockThreads / 32];
  const int tid = threadIdx.x;
  const int tx = tid % Tile::kThreadsN, ty = tid / Tile::kThreadsN;
  // The thread's input channels: two groups of 4, kThreadsM groups apart, so that a warp's
  // float4 reads of X fall on consecutive groups; its output channels: one group of 4.
  auto channel_in = [&](int i) { return ((i / 4) * kThreadsM + ty) * 4 + i % 4; };
  const WeightGradBlock block(BM, BN, tiles_n, rows, rows_per_chunk, volume, c_in, c_out);
  float acc[TM][TN] = {};
  for_each_pair_step_pipelined<kBlockThreads, BK>(
      nbr, in_rows, volume, block.k, block.begin, block.end, queue_in, queue_out, counts,
      [&](int stage, int first, int count) {
        gather_step_async<kBlockThreads, BK, BM>(&X[stage][0][0], Tile::LDX, in, c_in, block.ci0,
                                                 queue_in, first, count);
        gather_step_async<kBlockThreads, BK, Tile::BN>(&G[stage][0][0], Tile::LDG, grad_out,
                                                       c_out, block.co0, queue_out, first, count);
      },
      [&](int stage) {
        if (block.ci0 + channel_in(0) >= c_in) return;  // none of its outputs is stored
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          float a[TM];
          float b[TN];
#pragma unroll
          for (int g = 0; g < TM / 4; ++g) {
            const float4 v = *reinterpret_cast<const float4*>(&X[stage][kk][channel_in(g * 4)]);
            a[g * 4] = v.x;
            a[g * 4 + 1] = v.y;
            a[g * 4 + 2] = v.z;
            a[g * 4 + 3] = v.w;
          }
          const float4 v = *reinterpret_cast<const float4*>(&G[stage][kk][tx * TN]);
          b[0] = v.x;
          b[1] = v.y;
          b[2] = v.z;
          b[3] = v.w;
#pragma unroll
          for (int i = 0; i < TM; ++i) {
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
          }
        }
      });
  float* dst = partial + block.partial_offset;
  const int co = block.co0 + tx * TN;  // a whole group of 4 or none (c_out is a multiple of 4)
  if (co >= c_out) return;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int ci = block.ci0 + channel_in(i);
    if (ci < c_in) {
      *reinterpret_cast<float4*>(dst + int64_t{ci} * c_out + co) =
          make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    }
  }
}

// partial[chunk, k] as weight_grad_wmma_kernel computes it, over the queued pairs; kSyncMma:
// by ldmatrix + mma.sync instead of WMMA. BM: the input channels of a tile, 64 (4 warps of 32 x
// 32) or, for layers of at most 16 inputs, 16 (4 warps of 16 x 16 side by side): a 3- or
// 16-input layer then multiplies 16 input channels a pair instead of 64. Both tile a layer of
// at most 16 inputs once, so the chunks and the sums are the same.
template <typename scalar_t, int BM, bool kVec, bool kSyncMma>
__global__ void __launch_bounds__(kWmmaThreads)
    weight_grad_wmma_compact_kernel(const scalar_t* __restrict__ in,
                                    const scalar_t* __restrict__ grad_out,
                                    const int32_t* __restrict__ nbr, float* __restrict__ partial,
                                    int64_t rows, int64_t in_rows, int volume, int c_in,
                                    int c_out, int64_t rows_per_chunk, int tiles_n) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(BM == 16 || BM == kWmmaTile, "tiles of 16 or 64 input channels");
  constexpr int BN = kWmmaTile, BK = kWmmaBK;
  constexpr int kWarpsN = BM == 16 ? 4 : 2, WM = BM / (4 / kWarpsN), WN = BN / kWarpsN;
  constexpr int LDX = BM + kWmmaPad, LDG = BN + kWmmaPad, LDC = BN + 4;
  // With 16-byte copies two stages (cp.async), each X[kk][m] = in[input row of pair kk][ci0 + m]
  // then G[kk][n] = grad_out[output row of pair kk][co0 + n]; C over them at the end.
  constexpr int kStages = kVec ? 2 : 1;
  constexpr int kStageBytes = BK * (LDX + LDG) * sizeof(scalar_t);
  constexpr int kCBytes = BM * LDC * sizeof(float);
  __shared__ __align__(32) unsigned char tiles[kStages * kStageBytes > kCBytes
                                                   ? kStages * kStageBytes
                                                   : kCBytes];
  auto X = [&](int stage) { return reinterpret_cast<scalar_t*>(tiles + stage * kStageBytes); };
  auto G = [&](int stage) { return X(stage) + BK * LDX; };
  float* C = reinterpret_cast<float*>(tiles);
  __shared__ int32_t queue_in[BK + kWmmaThreads];
  __shared__ int64_t queue_out[BK + kWmmaThreads];
  __shared__ int counts[kWmmaThreads / 32];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = (warp / kWarpsN) * WM, wn = (warp % kWarpsN) * WN;
  const WeightGradBlock block(BM, BN, tiles_n, rows, rows_per_chunk, volume, c_in, c_out);
  std::conditional_t<kSyncMma, WarpMmaSync<scalar_t, WM / 16, WN / 16>,
                     WarpWmma<scalar_t, WM / 16, WN / 16>>
      acc;
  acc.clear();
  auto multiply = [&](int stage) {
    acc.template multiply<BK, LDX, LDG, true>(X(stage) + wm, G(stage) + wn);
  };
  if constexpr (kVec) {
    for_each_pair_step_pipelined<kWmmaThreads, BK>(
        nbr, in_rows, volume, block.k, block.begin, block.end, queue_in, queue_out, counts,
        [&](int stage, int first, int count) {
          gather_step_async<kWmmaThreads, BK, BM>(X(stage), LDX, in, c_in, block.ci0, queue_in,
                                                  first, count);
          gather_step_async<kWmmaThreads, BK, BN>(G(stage), LDG, grad_out, c_out, block.co0,
                                                  queue_out, first, count);
        },
        multiply);
  } else {
    const scalar_t zero(0.0f);
    for_each_pair_step<kWmmaThreads, BK>(
        nbr, in_rows, volume, block.k, block.begin, block.end, queue_in, queue_out, counts,
        [&](int first, int count) {
          for (int e = tid; e < BK * BM; e += kWmmaThreads) {
            const int kk = e / BM, m = e % BM, c = block.ci0 + m;
            X(0)[kk * LDX + m] = (kk < count && c < c_in)
                                     ? in[int64_t{queue_in[first + kk]} * c_in + c]
                                     : zero;
          }
          for (int e = tid; e < BK * BN; e += kWmmaThreads) {
            const int kk = e / BN, n = e % BN, co = block.co0 + n;
            G(0)[kk * LDG + n] = (kk < count && co < c_out)
                                     ? grad_out[queue_out[first + kk] * c_out + co]
                                     : zero;
          }
          __syncthreads();
          multiply(0);
          __syncthreads();
        });
  }
  store_weight_grad_tile<BM, BN, LDC>(acc, C, wm, wn, tid,
                                      partial + block.partial_offset,
                                      block.ci0, block.co0, c_in, c_out);
#else
  CUDA_KERNEL_ASSERT_MSG(false, "spconv_lite: tensor-core kernel launched below sm_80");
#endif
}

// ------------------------------------------------------------------------ per-offset GEMMs

// The pairs of a neighbour table grouped by offset (CSR over offsets), each group in row order:
// for offset k, entries offsets[k] .. offsets[k+1] of (source, row) with table[row, k] = source.
struct PairLists {
  at::Tensor source;  // int32: the table's entries
  at::Tensor row;     // int32: the table's rows
  std::vector<int64_t> offsets;
};

// flags[k * rows + o] = 1 when table[o, k] is a pair (offset-major, so a running sum numbers
// the pairs by offset, then row). index_t: int32 where the table's entries number fewer than
// 2^31, which halves the scratch (flags and running sums: 8 bytes an entry instead of 16).
template <typename index_t>
__global__ void pair_flags_kernel(const int32_t* __restrict__ table, int64_t rows,
                                  int64_t volume, int64_t limit, index_t* __restrict__ flags) {
  const int64_t total = rows * volume;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t k = e / rows;
    const int64_t o = e - k * rows;
    flags[e] = table_entry(table, o * volume + k, limit) >= 0 ? 1 : 0;
  }
}

template <typename index_t>
__global__ void pair_fill_kernel(const int32_t* __restrict__ table,
                                 const index_t* __restrict__ position, int64_t rows,
                                 int64_t volume, int32_t* __restrict__ source,
                                 int32_t* __restrict__ row) {
  const int64_t total = rows * volume;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t k = e / rows;
    const int64_t o = e - k * rows;
    const int32_t value = table[o * volume + k];
    if (value >= 0) {
      const int64_t p = int64_t{position[e]} - 1;  // inclusive running sum
      source[p] = value;
      row[p] = static_cast<int32_t>(o);
    }
  }
}

PairLists pair_lists(const at::Tensor& table, int64_t limit) {
  const int64_t rows = table.size(0), volume = table.size(1);
  PairLists pairs;
  pairs.offsets.assign(volume + 1, 0);
  const auto options = table.options();
  if (rows == 0) {
    pairs.source = at::empty({0}, options);
    pairs.row = at::empty({0}, options);
    return pairs;
  }
  const cudaStream_t stream = current_stream();
  auto fill = [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const auto index_type = c10::CppTypeToScalarType<index_t>::value;
    const at::Tensor flags = at::empty({rows * volume}, options.dtype(index_type));
    pair_flags_kernel<index_t><<<blocks_for(rows * volume), kThreads, 0, stream>>>(
        table.data_ptr<int32_t>(), rows, volume, limit, flags.data_ptr<index_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor position = at::cumsum(flags, 0, index_type);
    // Host sync: the running sum at the end of each offset's run gives the pair counts, which
    // size the per-offset GEMMs.
    const at::Tensor ends =
        position.view({volume, rows}).select(1, rows - 1).to(at::kLong).cpu().contiguous();
    const int64_t* end_data = ends.data_ptr<int64_t>();
    for (int64_t k = 0; k < volume; ++k) pairs.offsets[k + 1] = end_data[k];
    const int64_t total = pairs.offsets[volume];
    pairs.source = at::empty({total}, options);
    pairs.row = at::empty({total}, options);
    if (total > 0) {
      pair_fill_kernel<index_t><<<blocks_for(rows * volume), kThreads, 0, stream>>>(
          table.data_ptr<int32_t>(), position.data_ptr<index_t>(), rows, volume,
          pairs.source.data_ptr<int32_t>(), pairs.row.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (rows * volume <= std::numeric_limits<int32_t>::max()) {
    fill(int32_t{});
  } else {
    fill(int64_t{});
  }
  return pairs;
}

// dst[rows[j]] += src[j] for rows distinct within one call (one kernel offset): no atomics.
template <typename scalar_t, typename acc_t>
__global__ void add_rows_kernel(const scalar_t* __restrict__ src,
                                const int32_t* __restrict__ rows, int64_t count,
                                int64_t channels, acc_t* __restrict__ dst) {
  const int64_t total = count * channels;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = e / channels;
    const int64_t c = e - j * channels;
    dst[int64_t{rows[j]} * channels + c] += static_cast<acc_t>(src[e]);
  }
}

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor conv_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& table,
                     at::Tensor out) {
  const at::NoTF32Guard exact_float32;  // as the fused kernels (see the top of the file)
  const PairLists pairs = pair_lists(table, x.size(0));
  const int64_t c_out = w.size(2);
  // float32 / float64 add up in the output itself (no second [rows, C_out] buffer and copy);
  // float16 / bfloat16 in a float buffer.
  const bool in_place = x.scalar_type() == accumulate_type(x.scalar_type());
  at::Tensor acc = in_place ? out.zero_()
                            : at::zeros({table.size(0), c_out},
                                        x.options().dtype(accumulate_type(x.scalar_type())));
  for (int64_t k = 0; k < table.size(1); ++k) {
    const int64_t begin = pairs.offsets[k], count = pairs.offsets[k + 1] - begin;
    if (count == 0) continue;
    const at::Tensor gathered = at::index_select(x, 0, pairs.source.narrow(0, begin, count));
    const at::Tensor product = at::mm(gathered, w.select(0, k));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_gemm", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      add_rows_kernel<scalar_t, acc_t>
          <<<blocks_for(count * c_out), kThreads, 0, current_stream()>>>(
              product.data_ptr<scalar_t>(), pairs.row.data_ptr<int32_t>() + begin, count,
              c_out, acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!in_place) out.copy_(acc);
  return out;
}

at::Tensor weight_grad_gemm(const at::Tensor& x, const at::Tensor& g, const at::Tensor& table) {
  const at::NoTF32Guard exact_float32;
  const PairLists pairs = pair_lists(table, x.size(0));
  const int64_t volume = table.size(1);
  at::Tensor grad_weight = at::zeros({volume, x.size(1), g.size(1)}, x.options());
  for (int64_t k = 0; k < volume; ++k) {
    const int64_t begin = pairs.offsets[k], count = pairs.offsets[k + 1] - begin;
    if (count == 0) continue;
    const at::Tensor xs = at::index_select(x, 0, pairs.source.narrow(0, begin, count));
    const at::Tensor gs = at::index_select(g, 0, pairs.row.narrow(0, begin, count));
    at::Tensor slice = grad_weight.select(0, k);
    at::mm_out(slice, xs.t(), gs);
  }
  return grad_weight;
}

// ------------------------------------------------------------------------ dispatch

bool is_half_type(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// Whether the current device's code holds the tensor-core kernels. Their bodies are compiled
// for __CUDA_ARCH__ >= 800 only, and a build for older architectures alone
// (TORCH_CUDA_ARCH_LIST="7.5+PTX") runs on an sm_80+ GPU from PTX JIT-compiled for compute_75,
// where they are just their device assert: the PTX version the device's code came from tells
// (below 80 on every device older than sm_80 too).
bool tensor_core_code() {
  const auto ask = [] {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, conv_wmma_kernel<c10::Half, false>));
    return attributes.ptxVersion >= 80;
  };
#ifdef SPCONV_LITE_CUDA_EMULATION
  return ask();  // the emulator's tests change the emulated code's version between calls
#else
  // The query takes the driver's lock: asked once per device (0: not yet, 1: no, 2: yes).
  static std::array<std::atomic<int8_t>, 64> known{};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= static_cast<int>(known.size())) return ask();
  if (known[device].load() == 0) known[device].store(ask() ? 2 : 1);
  return known[device].load() == 2;
#endif
}

bool tensor_cores(at::ScalarType dtype) { return is_half_type(dtype) && tensor_core_code(); }

// The fused kernels put their output-channel tiles (forward) or weight tiles (weight gradient)
// on a grid's y or z, which hold at most 65535 blocks; a tile is at least 64 channels wide past
// 32 output channels (and the weight gradient's BM x BN tiles cover at least 64 x 64 of C_in x
// C_out), so these bounds keep every launch inside. Wider layers take the per-offset GEMMs,
// whatever SPCONV_LITE_CUDA_CONV_ALGO asks.
bool fits_fused_forward(int64_t c_out) { return (c_out + 63) / 64 <= 65535; }
bool fits_fused_weight_grad(int64_t c_in, int64_t c_out) {
  return (c_in + 63) / 64 * ((c_out + 63) / 64) <= 65535;
}

// Whether the fused kernel runs. auto: always for float16 / bfloat16 (tensor cores, float32
// accumulation) and float64; for float32 while the channel product is small, where cuBLAS GEMMs
// per offset pay more for their gathers, scatters and launches than they gain, or with a
// variant meant to beat the GEMMs on wide layers too (`wide_variant`: the pipelined conv tiles,
// the compacted weight gradient).
bool use_fused(at::ScalarType dtype, int64_t c_in, int64_t c_out, bool wide_variant = false) {
  switch (cuda::conv_algo_from_env()) {
    case cuda::ConvAlgo::kFused:
      return true;
    case cuda::ConvAlgo::kGemm:
      return false;
    case cuda::ConvAlgo::kAuto:
      break;
  }
  if (dtype != at::kFloat) return true;
  return wide_variant || c_in * c_out <= 32 * 64;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether rows of a (c_a elements each) and of b (c_b) can be copied 16 bytes at a time.
template <typename scalar_t>
bool rows_of_16_bytes(const scalar_t* a, int c_a, const scalar_t* b, int c_b) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  return c_a % kVec == 0 && c_b % kVec == 0 && aligned16(a) && aligned16(b);
}

template <typename Tile, typename scalar_t = typename Tile::Element>
void launch_pipelined_tile(const scalar_t* in, const scalar_t* weight, const int32_t* nbr,
                           const ConvPass<scalar_t>& pass, int64_t rows, int64_t in_rows,
                           int volume, int c_in, int c_out, bool sync_mma) {
  auto* kernel = conv_pipelined_kernel<Tile, false>;
  if constexpr (!std::is_same_v<scalar_t, float>) {  // float32's tiles are SIMT: one kernel
    if (sync_mma) kernel = conv_pipelined_kernel<Tile, true>;
  }
  const int bytes = Tile::bytes(pass.k_end - pass.k_begin);
  // The limit is the kernel's, shared by every host thread: always the largest pass's, so that
  // another thread's call cannot lower it below this launch's size.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Tile::bytes(kPipelinedMaxOffsets)));
  const dim3 grid((rows + Tile::BM - 1) / Tile::BM, (c_out + Tile::BN - 1) / Tile::BN);
  kernel<<<grid, Tile::kThreads, bytes, current_stream()>>>(in, weight, nbr, pass, rows, in_rows,
                                                            volume, c_in, c_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The pipelined tiles (tiles=pipelined) for one pass, picked by the channel counts (whole
// 16-byte copies here): BN the output channels' tile, BK the input channels of a step (float32:
// 16, whose 128 x 16 tiles are as many bytes as the half types' 128 x 32, or 4 for 4 inputs);
// and by the rows: 64-row tiles where 128-row ones would give the GPU fewer than two blocks per
// multiprocessor (the small layers of a KITTI-sized cloud). The tile does not change any sum.
template <typename scalar_t>
void launch_conv_pipelined(const scalar_t* in, const scalar_t* weight, const int32_t* nbr,
                           const ConvPass<scalar_t>& pass, int64_t rows, int64_t in_rows,
                           int volume, int c_in, int c_out, int device, bool sync_mma) {
  const int64_t min_blocks = 2 * int64_t{cuda::multiprocessor_count(device)};
  auto launch = [&](auto bn, auto bk) {
    constexpr int BN = decltype(bn)::value, BK = decltype(bk)::value;
    using Tall = PipelinedTile<scalar_t, 128, BN, BK>;
    const int64_t tall_blocks = (rows + Tall::BM - 1) / Tall::BM * ((c_out + BN - 1) / BN);
    if (tall_blocks >= min_blocks) {
      launch_pipelined_tile<Tall>(in, weight, nbr, pass, rows, in_rows, volume, c_in, c_out,
                                  sync_mma);
    } else {
      launch_pipelined_tile<PipelinedTile<scalar_t, 64, BN, BK>>(
          in, weight, nbr, pass, rows, in_rows, volume, c_in, c_out, sync_mma);
    }
  };
  using I16 = std::integral_constant<int, 16>;
  using I32 = std::integral_constant<int, 32>;
  using I64 = std::integral_constant<int, 64>;
  auto launch_bk = [&](auto bn) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      // 4-channel steps for the first layer's 3-4 point features (padded to 4).
      c_in <= 4 ? launch(bn, std::integral_constant<int, 4>{}) : launch(bn, I16{});
    } else {
      c_in <= 16 ? launch(bn, I16{}) : launch(bn, I32{});
    }
  };
  if (c_out <= 16) {
    launch_bk(I16{});
  } else if (c_out <= 32) {
    launch_bk(I32{});
  } else {
    launch_bk(I64{});
  }
}

// One pass with the default kernels: 64 x 64 WMMA tiles for float16 / bfloat16 on sm_80+, else
// the SIMT tiles with BN following the output channels.
template <typename scalar_t>
void launch_conv_pass(const at::Tensor& x, const at::Tensor& w, const at::Tensor& table,
                      const ConvPass<scalar_t>& pass, int c_out) {
  const int64_t rows = table.size(0);
  const int volume = static_cast<int>(table.size(1));
  const int c_in = static_cast<int>(w.size(1));
  const scalar_t* in = x.data_ptr<scalar_t>();
  const scalar_t* weight = w.data_ptr<scalar_t>();
  const int32_t* nbr = table.data_ptr<int32_t>();
  const cudaStream_t stream = current_stream();
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (tensor_cores(x.scalar_type())) {
      const dim3 grid((rows + kWmmaTile - 1) / kWmmaTile, (c_out + kWmmaTile - 1) / kWmmaTile);
      if (rows_of_16_bytes(in, c_in, weight, c_out)) {
        conv_wmma_kernel<scalar_t, true><<<grid, kWmmaThreads, 0, stream>>>(
            in, weight, nbr, pass, rows, x.size(0), volume, c_in, c_out);
      } else {
        conv_wmma_kernel<scalar_t, false><<<grid, kWmmaThreads, 0, stream>>>(
            in, weight, nbr, pass, rows, x.size(0), volume, c_in, c_out);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto launch = [&](auto bn) {
    constexpr int BN = decltype(bn)::value;
    constexpr int BM = 4096 / BN;
    const dim3 grid((rows + BM - 1) / BM, (c_out + BN - 1) / BN);
    conv_simt_kernel<scalar_t, BN><<<grid, kThreads, 0, stream>>>(in, weight, nbr, pass, rows,
                                                                  x.size(0), volume, c_in, c_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (c_out <= 16) {
    launch(std::integral_constant<int, 16>{});
  } else if (c_out <= 32) {
    launch(std::integral_constant<int, 32>{});
  } else {
    launch(std::integral_constant<int, 64>{});
  }
}

// Most offsets in one pass of a conv over `volume` offsets cut into `splits`.
int64_t most_offsets_per_pass(int64_t volume, int64_t splits) {
  int64_t most = 0;
  for (int64_t s = 0; s < splits; ++s) {
    most = std::max(most, split_begin(s + 1, splits, volume) - split_begin(s, splits, volume));
  }
  return most;
}

// Whether tiles=pipelined is on and fits a conv of `volume` offsets in `splits` passes (the
// tiles track at most kPipelinedMaxOffsets offsets a pass); the dtype decides the rest.
bool pipelined_tiles_fit(const cuda::Variants& variants, int64_t volume, int64_t splits) {
  return variants.pipelined_tiles && most_offsets_per_pass(volume, splits) <= kPipelinedMaxOffsets;
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Whether the pipelined tiles exist for a dtype: float16 / bfloat16 (tensor cores) and float32.
template <typename scalar_t>
constexpr bool kHasPipelinedTiles = std::is_same_v<scalar_t, c10::Half> ||
                                    std::is_same_v<scalar_t, c10::BFloat16> ||
                                    std::is_same_v<scalar_t, float>;

// x @ w over the table into out: one pass per split of the row order (one pass over every offset
// without it), the sums carried between passes in acc_t (in `out` itself when that is acc_t).
// With tiles=pipelined (float16 / bfloat16 on sm_80+ and float32, at most 32 offsets a pass),
// channel counts that are not whole 16-byte copies are padded with zeros first (the first
// layer's 3-5 inputs).
template <typename scalar_t>
void launch_conv_fused(const at::Tensor& features, const at::Tensor& weight,
                       const at::Tensor& table, const at::Tensor& order,
                       const cuda::Variants& variants, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = table.size(0);
  const int volume = static_cast<int>(table.size(1));
  const int64_t splits = order.defined() ? order.size(0) : 1;
  bool pipelined = false;
  if constexpr (kHasPipelinedTiles<scalar_t>) {
    pipelined = pipelined_tiles_fit(variants, volume, splits) &&
                (std::is_same_v<scalar_t, float> || tensor_cores(features.scalar_type()));
  }
  at::Tensor x = features, w = weight, dst = out;
  if (pipelined) {
    const int64_t c_in = w.size(1), c_out = w.size(2), copy = 16 / sizeof(scalar_t);
    const int64_t pad_in = round_up(c_in, copy) - c_in, pad_out = round_up(c_out, copy) - c_out;
    if (pad_in > 0) {
      x = at::constant_pad_nd(x, {0, pad_in});
    } else if (!aligned16(x.data_ptr())) {
      x = x.clone();  // a view starting mid-row of its storage: 16-byte rows need a copy
    }
    if (pad_in > 0 || pad_out > 0) {
      w = at::constant_pad_nd(w, {0, pad_out, 0, pad_in});
    } else if (!aligned16(w.data_ptr())) {
      w = w.clone();
    }
    if (pad_out > 0) dst = at::empty({rows, c_out + pad_out}, out.options());
  }
  const int c_out = static_cast<int>(dst.size(1));
  at::Tensor scratch;
  acc_t* acc = nullptr;
  if (splits > 1) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      acc = dst.data_ptr<acc_t>();
    } else {
      scratch = at::empty({rows, c_out}, dst.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc = scratch.data_ptr<acc_t>();
    }
  }
  for (int64_t s = 0; s < splits; ++s) {
    ConvPass<scalar_t> pass;
    pass.order = order.defined() ? order.data_ptr<int32_t>() + s * rows : nullptr;
    pass.k_begin = static_cast<int>(split_begin(s, splits, volume));
    pass.k_end = static_cast<int>(split_begin(s + 1, splits, volume));
    const bool last = s + 1 == splits;
    pass.acc_in = s > 0 ? acc : nullptr;
    pass.acc_out = last ? nullptr : acc;
    pass.out = last ? dst.data_ptr<scalar_t>() : nullptr;
    if constexpr (kHasPipelinedTiles<scalar_t>) {
      if (pipelined) {
        launch_conv_pipelined<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                        table.data_ptr<int32_t>(), pass, rows, x.size(0), volume,
                                        static_cast<int>(x.size(1)), c_out, x.get_device(),
                                        variants.sync_mma);
        continue;
      }
    }
    launch_conv_pass<scalar_t>(x, w, table, pass, c_out);
  }
  if (dst.data_ptr() != out.data_ptr()) out.copy_(dst.narrow(1, 0, out.size(1)));
}

// Chunks of rows for the fused weight gradient: about 1024 blocks in all whatever the GPU, so
// that the partial sums (and the rounding of their total) do not depend on the device.
int64_t rows_per_chunk(int64_t rows, int64_t blocks_per_chunk) {
  constexpr int64_t kStep = 32;  // a multiple of both kernels' reduction steps
  const int64_t steps = (rows + kStep - 1) / kStep;
  const int64_t chunks =
      std::clamp<int64_t>((1024 + blocks_per_chunk - 1) / blocks_per_chunk, 1, steps);
  return (steps + chunks - 1) / chunks * kStep;
}

template <typename scalar_t>
at::Tensor weight_grad_fused(const at::Tensor& x, const at::Tensor& g, const at::Tensor& table,
                             const cuda::Variants& variants) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = table.size(0);
  const int volume = static_cast<int>(table.size(1));
  const int c_in = static_cast<int>(x.size(1)), c_out = static_cast<int>(g.size(1));
  const scalar_t* in = x.data_ptr<scalar_t>();
  const scalar_t* grad = g.data_ptr<scalar_t>();
  const int32_t* nbr = table.data_ptr<int32_t>();
  const cudaStream_t stream = current_stream();
  const bool compact = variants.compact_weight_grad;
  // partial[chunk, k] ([C_in, C_out], C_in counting padded input channels).
  auto partial_for = [&](int64_t tiles, int64_t channels_in, int64_t* chunk_rows) {
    // The grid is (offsets, chunks, weight tiles): a grid's z holds at most 65535.
    TORCH_CHECK_VALUE(tiles <= 65535, "sparse_conv_weight_grad: C_in ", c_in, " x C_out ",
                      c_out, " takes ", tiles, " weight tiles, more than the 65535 supported");
    *chunk_rows = rows_per_chunk(rows, volume * tiles);
    const int64_t chunks = (rows + *chunk_rows - 1) / *chunk_rows;
    return at::empty({chunks, volume, channels_in, c_out},
                     x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  };
  at::Tensor partial;
  bool launched = false;
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (tensor_cores(x.scalar_type())) {
      // wgrad=compact: layers of at most 16 inputs take the 16-input tiles, their inputs padded
      // to whole 16-byte rows (the first layer's 3-5 point features) so that the pairs are
      // gathered by cp.async; the padded channels' sums are dropped.
      const bool narrow = compact && c_in <= 16;
      at::Tensor x_tiled = x;
      if (narrow && c_in % 8 != 0 && c_out % 8 == 0 && aligned16(grad)) {
        x_tiled = at::constant_pad_nd(x, {0, round_up(c_in, 8) - c_in});
      }
      const scalar_t* in_tiled = x_tiled.data_ptr<scalar_t>();
      const int c_in_tiled = static_cast<int>(x_tiled.size(1));
      const int bm = narrow ? 16 : kWmmaTile;
      const int tiles_m = (c_in_tiled + bm - 1) / bm;
      const int tiles_n = (c_out + kWmmaTile - 1) / kWmmaTile;
      int64_t chunk_rows;
      partial = partial_for(int64_t{tiles_m} * tiles_n, c_in_tiled, &chunk_rows);
      const dim3 grid(volume, partial.size(0), tiles_m * tiles_n);
      const bool vec = rows_of_16_bytes(in_tiled, c_in_tiled, grad, c_out);
      auto* kernel = vec ? weight_grad_wmma_kernel<scalar_t, true>
                         : weight_grad_wmma_kernel<scalar_t, false>;
      if (compact) {
        auto pick = [&](auto tile) {
          constexpr int BM = decltype(tile)::value;
          return variants.sync_mma
                     ? (vec ? weight_grad_wmma_compact_kernel<scalar_t, BM, true, true>
                            : weight_grad_wmma_compact_kernel<scalar_t, BM, false, true>)
                     : (vec ? weight_grad_wmma_compact_kernel<scalar_t, BM, true, false>
                            : weight_grad_wmma_compact_kernel<scalar_t, BM, false, false>);
        };
        kernel = narrow ? pick(std::integral_constant<int, 16>{})
                        : pick(std::integral_constant<int, kWmmaTile>{});
      }
      kernel<<<grid, kWmmaThreads, 0, stream>>>(in_tiled, grad, nbr, partial.data_ptr<float>(),
                                                rows, x.size(0), volume, c_in_tiled, c_out,
                                                chunk_rows, tiles_n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launched = true;
    }
  }
  if (!launched) {
    auto launch = [&](auto bn) {
      constexpr int BN = decltype(bn)::value;
      constexpr int BM = 4096 / BN;
      const int tiles_m = (c_in + BM - 1) / BM;
      const int tiles_n = (c_out + BN - 1) / BN;
      int64_t chunk_rows;
      partial = partial_for(int64_t{tiles_m} * tiles_n, c_in, &chunk_rows);
      const dim3 grid(volume, partial.size(0), tiles_m * tiles_n);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (compact && rows_of_16_bytes(in, c_in, grad, c_out)) {
          weight_grad_simt_pipelined_kernel<BN>
              <<<grid, WeightGradSimtTile<BN>::kThreads, 0, stream>>>(
                  in, grad, nbr, partial.data_ptr<float>(), rows, x.size(0), volume, c_in,
                  c_out, chunk_rows, tiles_n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      auto* kernel = compact ? weight_grad_simt_compact_kernel<scalar_t, BN>
                             : weight_grad_simt_kernel<scalar_t, BN>;
      kernel<<<grid, kThreads, 0, stream>>>(in, grad, nbr, partial.data_ptr<acc_t>(), rows,
                                            x.size(0), volume, c_in, c_out, chunk_rows, tiles_n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (c_out <= 16) {
      launch(std::integral_constant<int, 16>{});
    } else if (c_out <= 32) {
      launch(std::integral_constant<int, 32>{});
    } else {
      launch(std::integral_constant<int, 64>{});
    }
  }
  // Partial sums added in a fixed order (ATen's reduction): deterministic.
  at::Tensor total = partial.size(0) == 1 ? partial.select(0, 0) : partial.sum(0);
  if (total.size(1) != c_in) total = total.narrow(1, 0, c_in);  // padded input channels
  return total.to(x.scalar_type()).contiguous();
}

// ------------------------------------------------------------------------ ops

at::Tensor sparse_conv_cuda(const at::Tensor& features, const at::Tensor& weight,
                            const at::Tensor& nbr, const at::Tensor& nbr_t,
                            const std::optional<at::Tensor>& order,
                            const std::optional<at::Tensor>& order_t) {
  check_features(features, "features");
  check_device(weight, "weight", features.device());
  check_device(nbr, "nbr", features.device());
  check_device(nbr_t, "nbr_t", features.device());
  TORCH_CHECK_VALUE(weight.dim() == 3, "weight must be [K, C_in, C_out], got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == features.scalar_type(), "weight dtype ",
                   weight.scalar_type(), " must match features dtype ", features.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == features.size(1), "weight expects ", weight.size(1),
                    " input channels but features has ", features.size(1));
  const int64_t volume = weight.size(0);
  check_neighbor_table(nbr, "nbr", -1, volume);
  check_neighbor_table(nbr_t, "nbr_t", features.size(0), volume);
  TORCH_CHECK_VALUE(volume <= std::numeric_limits<int32_t>::max() &&
                        weight.size(1) <= std::numeric_limits<int32_t>::max() &&
                        weight.size(2) <= std::numeric_limits<int32_t>::max(),
                    "weight ", weight.sizes(), " is too large for the CUDA kernels");
  if (order.has_value()) {
    check_device(*order, "order", features.device());
    check_row_order(*order, "order", nbr.size(0), volume);
  }
  if (order_t.has_value()) {
    check_device(*order_t, "order_t", features.device());
    check_row_order(*order_t, "order_t", nbr_t.size(0), volume);
  }
  const cuda::Variants variants = cuda::variants_from_env();
  cuda::check_neighbor_entries_cuda(nbr, "nbr", features.size(0));
  if (order.has_value() && cuda::env_enabled("SPCONV_LITE_CUDA_CHECK_TABLES")) {
    check_row_order_entries_cpu(order->cpu(), "order");  // host sync (opt-in)
  }
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = features.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor table = nbr.contiguous();
  at::Tensor out = at::empty({nbr.size(0), weight.size(2)}, features.options());
  if (out.numel() == 0) return out;
  // No input rows or channels: every output is an empty sum. (The kernels would get a null
  // feature pointer, which cp.async must not be given even for its zero-byte copies.)
  if (x.numel() == 0) return out.zero_();
  const at::Tensor rows_order = order.has_value() ? order->contiguous() : at::Tensor();
  const bool pipelined_conv =
      pipelined_tiles_fit(variants, volume, order.has_value() ? order->size(0) : 1);
  if (!fits_fused_forward(w.size(2)) ||
      !use_fused(x.scalar_type(), w.size(1), w.size(2), pipelined_conv)) {
    return conv_gemm(x, w, table, out);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "sparse_conv_cuda",
      [&] { launch_conv_fused<scalar_t>(x, w, table, rows_order, variants, out); });
  return out;
}

at::Tensor sparse_conv_weight_grad_cuda(const at::Tensor& features, const at::Tensor& grad_out,
                                        const at::Tensor& nbr) {
  check_features(features, "features");
  check_features(grad_out, "grad_out");
  check_device(grad_out, "grad_out", features.device());
  check_device(nbr, "nbr", features.device());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == features.scalar_type(), "grad_out dtype ",
                   grad_out.scalar_type(), " must match features dtype ",
                   features.scalar_type());
  check_neighbor_table(nbr, "nbr", grad_out.size(0), -1);
  const cuda::Variants variants = cuda::variants_from_env();
  cuda::check_neighbor_entries_cuda(nbr, "nbr", features.size(0));
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = features.contiguous();
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor table = nbr.contiguous();
  const int64_t volume = nbr.size(1);
  // Nothing to sum (the fused path could not even split zero offsets into chunks).
  if (table.size(0) == 0 || volume == 0 || x.size(1) == 0 || g.size(1) == 0) {
    return at::zeros({volume, x.size(1), g.size(1)}, x.options());
  }
  // As the forward with the pipelined tiles: the compacted weight gradient is meant to beat the
  // per-offset GEMMs on float32's wide layers too.
  if (!fits_fused_weight_grad(x.size(1), g.size(1)) ||
      !use_fused(x.scalar_type(), x.size(1), g.size(1), variants.compact_weight_grad)) {
    return weight_grad_gemm(x, g, table);
  }
  at::Tensor grad_weight;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "sparse_conv_weight_grad_cuda",
                                  [&] {
                                    grad_weight = weight_grad_fused<scalar_t>(x, g, table, variants);
                                  });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CUDA, m) {
  m.impl("sparse_conv", &sparse_conv_cuda);
  m.impl("sparse_conv_weight_grad", &sparse_conv_weight_grad_cuda);
}

}  // namespace spconv_lite
