// Sparse convolution compute on the CPU: fused gather-GEMM-scatter driven by neighbour tables.
//
// Forward and input gradient are the same kernel (the input gradient runs it with the
// transposed table and transposed weights). Each thread owns a block of output rows and sums
// the kernel offsets in a fixed order, so there are no atomics and results are bitwise
// independent of the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "gemm_x86.h"
#include "huge_pages.h"
#include "spconv_lite/checks.h"

namespace spconv_lite {
namespace {

// The float32 tiles a call runs (gemm_x86.h); null functions: the portable loops below.
struct FloatTiles {
  void (*rows_times_matrix)(const float* const* x_rows, float* const* acc_rows, int64_t count,
                            const float* w, int64_t c_in, int64_t c_out) = nullptr;
  void (*pairs_outer_product)(const float* const* x_rows, int64_t c_in,
                              const float* const* g_rows, int64_t count, float* dw,
                              int64_t c_out) = nullptr;
};

// The tiles for products with c_out output columns, or the set SPCONV_LITE_CPU_TILES names:
// avx512, avx2, or none (the portable loops). By default AVX2, and AVX-512 for the conv
// products whose output columns fill whole strips of 32: on our AMD Zen 4, which runs AVX-512
// at AVX2's FMA rate, those were 0-20% faster (2-4% over spconv's benchmark net), while
// lane-masked edges (24 -> 24 layers) were 1.6-1.9x slower and the weight-gradient tiles 6-8%
// slower at kernel 3. AVX2 and AVX-512 give the same bits; the switch lets tests and
// benchmarks compare them on one machine. Read at each call, as torch's own switches are.
FloatTiles float_tiles(int64_t c_out) {
  const char* env = std::getenv("SPCONV_LITE_CPU_TILES");
  const std::string choice = env == nullptr ? "" : env;
  TORCH_CHECK_VALUE(choice.empty() || choice == "avx512" || choice == "avx2" || choice == "none",
                    "SPCONV_LITE_CPU_TILES must be avx512, avx2 or none, got '", choice, "'");
  if (choice == "none") return {};
#ifdef SPCONV_LITE_HAS_AVX2_KERNELS
  const FloatTiles avx2_tiles{avx2::rows_times_matrix_all, avx2::pairs_outer_product_all};
  if (choice == "avx512") {
    TORCH_CHECK_VALUE(avx512::supported(),
                      "SPCONV_LITE_CPU_TILES=avx512, but this CPU has no AVX-512");
    return {avx512::rows_times_matrix_all, avx512::pairs_outer_product_all};
  }
  if (choice == "avx2") {
    TORCH_CHECK_VALUE(avx2::supported(),
                      "SPCONV_LITE_CPU_TILES=avx2, but this CPU has no AVX2 and FMA");
    return avx2_tiles;
  }
  if (!avx2::supported()) return {};
  if (avx512::supported() && c_out % 32 == 0) {
    return {avx512::rows_times_matrix_all, avx2::pairs_outer_product_all};
  }
  return avx2_tiles;
#else
  TORCH_CHECK_VALUE(choice.empty(), "SPCONV_LITE_CPU_TILES=", choice,
                    ", but this build has only the portable loops (not an x86-64 CPU)");
  return {};
#endif
}

// Portable loops of FloatTiles::rows_times_matrix: acc_rows[p] += x_rows[p] @ w for each pair.
template <typename scalar_t, typename acc_t>
void rows_times_matrix_generic(const scalar_t* const* x_rows, acc_t* const* acc_rows,
                               int64_t count, const scalar_t* w, int64_t c_in, int64_t c_out) {
  for (int64_t p = 0; p < count; ++p) {
    const scalar_t* x = x_rows[p];
    acc_t* acc = acc_rows[p];
    for (int64_t ci = 0; ci < c_in; ++ci) {
      const acc_t xv = static_cast<acc_t>(x[ci]);
      const scalar_t* w_row = w + ci * c_out;
      for (int64_t co = 0; co < c_out; ++co) acc[co] += xv * static_cast<acc_t>(w_row[co]);
    }
  }
}

// Sets bit j % 64 of present[j / 64] where row[j] >= 0, for j in [0, n); adds those entries to
// count[j]. No branch depends on the entries, and SSE2 (every x86-64 CPU) tests four at once.
inline void mark_neighbours(const int32_t* row, int64_t n, uint64_t* present, int32_t* count) {
  for (int64_t word = 0; word * 64 < n; ++word) {
    const int64_t begin = word * 64, end = std::min<int64_t>(n, begin + 64);
    uint64_t bits = 0;
    int64_t j = begin;
#ifdef __SSE2__
    for (; j + 4 <= end; j += 4) {
      const __m128i entries = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
      const __m128i found = _mm_cmpgt_epi32(entries, _mm_set1_epi32(-1));  // -1 where found
      bits |= static_cast<uint64_t>(_mm_movemask_ps(_mm_castsi128_ps(found))) << (j - begin);
      __m128i* counts = reinterpret_cast<__m128i*>(count + j);
      _mm_storeu_si128(counts, _mm_sub_epi32(_mm_loadu_si128(counts), found));
    }
#endif
    for (; j < end; ++j) {
      bits |= static_cast<uint64_t>(row[j] >= 0) << (j - begin);
      count[j] += row[j] >= 0;
    }
    present[word] = bits;
  }
}

// The pairs of the output rows [o_begin, o_end) by kernel offset, for the offsets
// [k_begin, k_end): for each row o with a neighbour i at offset k, in row order,
// x_rows(k)[p] = in + i * c_in and o_rows(k)[p] = o_first + (o - o_begin) * o_stride.
// The block's table is read once, in memory order, into bit masks of the present entries, and
// only those are visited: on sparse sites most entries of a large kernel are -1, and reading
// one strided column per offset (343 offsets of 1.4 KB rows) missed the cache on nearly each.
template <typename scalar_t, typename row_t>
class PairBuckets {
 public:
  void fill(const int32_t* nbr, int64_t volume, int64_t k_begin, int64_t k_end, int64_t o_begin,
            int64_t o_end, const scalar_t* in, int64_t c_in, row_t* o_first, int64_t o_stride) {
    k_begin_ = k_begin;
    const int64_t offsets = k_end - k_begin, words = (offsets + 63) / 64;
    if (offsets == 1) {  // one entry a row (a 1x1 layer): no masks to build
      fill_one_offset(nbr + k_begin, volume, o_begin, o_end, in, c_in, o_first, o_stride);
      return;
    }
    counts_.assign(offsets, 0);
    present_.resize((o_end - o_begin) * words);
    for (int64_t o = o_begin; o < o_end; ++o) {
      mark_neighbours(nbr + o * volume + k_begin, offsets,
                      present_.data() + (o - o_begin) * words, counts_.data());
    }
    start_.assign(offsets + 1, 0);
    for (int64_t j = 0; j < offsets; ++j) start_[j + 1] = start_[j] + counts_[j];
    make_room(start_[offsets]);
    end_.assign(start_.begin(), start_.end() - 1);
    for (int64_t o = o_begin; o < o_end; ++o) {
      const int32_t* row = nbr + o * volume + k_begin;
      row_t* o_row = o_first + (o - o_begin) * o_stride;
      for (int64_t word = 0; word < words; ++word) {
        for (uint64_t bits = present_[(o - o_begin) * words + word]; bits != 0;
             bits &= bits - 1) {
          const int64_t j = word * 64 + __builtin_ctzll(bits);
          const int64_t p = end_[j]++;
          x_rows_[p] = in + static_cast<int64_t>(row[j]) * c_in;
          o_rows_[p] = o_row;
        }
      }
    }
  }
  int64_t count(int64_t k) const { return end_[k - k_begin_] - start_[k - k_begin_]; }
  const scalar_t* const* x_rows(int64_t k) const { return x_rows_.data() + start_[k - k_begin_]; }
  row_t* const* o_rows(int64_t k) const { return o_rows_.data() + start_[k - k_begin_]; }

 private:
  // fill() for one offset: a branch a row, where masks would cost more than the pairs.
  void fill_one_offset(const int32_t* column, int64_t volume, int64_t o_begin, int64_t o_end,
                       const scalar_t* in, int64_t c_in, row_t* o_first, int64_t o_stride) {
    make_room(o_end - o_begin);
    int64_t p = 0;
    for (int64_t o = o_begin; o < o_end; ++o) {
      const int32_t i = column[o * volume];
      if (i < 0) continue;
      x_rows_[p] = in + static_cast<int64_t>(i) * c_in;
      o_rows_[p++] = o_first + (o - o_begin) * o_stride;
    }
    start_.assign({0, p});
    end_.assign({p});
  }

  // Grows the pair arrays to hold `pairs` pairs (they keep their size across blocks).
  void make_room(int64_t pairs) {
    if (static_cast<int64_t>(x_rows_.size()) < pairs) {
      x_rows_.resize(pairs);
      o_rows_.resize(pairs);
    }
  }

  int64_t k_begin_ = 0;
  std::vector<int32_t> counts_;
  std::vector<uint64_t> present_;
  std::vector<int64_t> start_, end_;
  std::vector<const scalar_t*> x_rows_;
  std::vector<row_t*> o_rows_;
};

// out[o] = sum_k in[nbr[o, k]] @ weight[k]  with weight [K, C_in, C_out].
// Threads own blocks of output rows; within a block the rows that have a neighbour at offset k
// form one gathered tile product with weight[k], accumulated in the output rows (float,
// double) or in a float buffer (half types without vector tiles).
template <typename scalar_t>
void gather_gemm_scatter(const scalar_t* in, const scalar_t* weight, const int32_t* nbr,
                         scalar_t* out, int64_t rows, int64_t volume, int64_t c_in,
                         int64_t c_out, const FloatTiles& tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  // Rows a thread takes at a time: an offset's weights are read once per block, so larger
  // blocks give its pairs more reuse (512 rows: 5-10% faster than 32-256 from 64 channels up,
  // and at kernel 5 and 7). The results do not depend on it (every output element is one FMA
  // chain per offset, added in offset order), so it may follow the thread count: 4 blocks a
  // thread at least, to share out the work.
  const int64_t block =
      std::clamp<int64_t>(rows / (4 * static_cast<int64_t>(at::get_num_threads())), 16, 512);
  const int64_t num_blocks = (rows + block - 1) / block;
  // float and double accumulate in the output rows themselves, half types in a float buffer.
  constexpr bool in_output = std::is_same_v<acc_t, scalar_t>;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> buffer(in_output ? 0 : block * c_out);
    PairBuckets<scalar_t, acc_t> pairs;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t o_begin = b * block, o_end = std::min(rows, o_begin + block);
      acc_t* acc = in_output ? reinterpret_cast<acc_t*>(out + o_begin * c_out) : buffer.data();
      const size_t bytes = (o_end - o_begin) * c_out * sizeof(acc_t);
      if (bytes > 0) std::memset(acc, 0, bytes);  // +0.0 in every type (acc may be null at 0)
      pairs.fill(nbr, volume, 0, volume, o_begin, o_end, in, c_in, acc, c_out);
      for (int64_t k = 0; k < volume; ++k) {
        const scalar_t* w = weight + k * c_in * c_out;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (tiles.rows_times_matrix != nullptr) {
            tiles.rows_times_matrix(pairs.x_rows(k), pairs.o_rows(k), pairs.count(k), w, c_in,
                                    c_out);
            continue;
          }
        }
        rows_times_matrix_generic(pairs.x_rows(k), pairs.o_rows(k), pairs.count(k), w, c_in,
                                  c_out);
      }
      if constexpr (!in_output) {
        std::transform(acc, acc + (o_end - o_begin) * c_out, out + o_begin * c_out,
                       [](acc_t a) { return static_cast<scalar_t>(a); });
      }
    }
  });
}

// The dtype the kernels compute in. float16 / bfloat16 run the float kernels on float copies
// where those have vector tiles: every half value is exact in float and the scalar loop summed
// in float too, so only the order of the sums changes (the tiles'), and the result is still
// rounded to the half type once. 5-30x faster than the scalar loop on a KITTI frame.
at::ScalarType compute_type(at::ScalarType dtype, const FloatTiles& tiles) {
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  return half && tiles.rows_times_matrix != nullptr ? at::kFloat : dtype;
}

at::Tensor sparse_conv_cpu(const at::Tensor& features, const at::Tensor& weight,
                           const at::Tensor& nbr, const at::Tensor& nbr_t,
                           const std::optional<at::Tensor>& order,
                           const std::optional<at::Tensor>& order_t) {
  check_features(features, "features");
  TORCH_CHECK_VALUE(weight.dim() == 3, "weight must be [K, C_in, C_out], got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == features.scalar_type(), "weight dtype ",
                   weight.scalar_type(), " must match features dtype ", features.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == features.size(1), "weight expects ", weight.size(1),
                    " input channels but features has ", features.size(1));
  const int64_t volume = weight.size(0);
  check_neighbor_table(nbr, "nbr", -1, volume);
  check_neighbor_table(nbr_t, "nbr_t", features.size(0), volume);
  check_neighbor_entries_cpu(nbr, "nbr", features.size(0));
  // Row orders only steer the CUDA kernels; checked here so that both devices accept the same.
  if (order.has_value()) {
    check_row_order(*order, "order", nbr.size(0), volume);
    check_row_order_entries_cpu(*order, "order");
  }
  if (order_t.has_value()) check_row_order(*order_t, "order_t", nbr_t.size(0), volume);
  const FloatTiles tiles = float_tiles(weight.size(2));
  const at::ScalarType compute = compute_type(features.scalar_type(), tiles);
  const at::Tensor x = features.to(compute).contiguous();
  const at::Tensor w = weight.to(compute).contiguous();
  const at::Tensor table = nbr.contiguous();
  at::Tensor out = empty_for_writing({nbr.size(0), weight.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, compute, "sparse_conv_cpu", [&] {
    gather_gemm_scatter<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                  table.data_ptr<int32_t>(), out.data_ptr<scalar_t>(),
                                  out.size(0), volume, w.size(1), w.size(2), tiles);
  });
  return out.to(features.scalar_type());
}

// acc[k - k_begin] += sum over the pairs (i, o) of offset k with o in [o_first, o_last) of
// in[i]^T grad_out[o], for k in [k_begin, k_end). Walks the rows in blocks, gathers a block's
// pairs of its offsets (the grad_out rows of a block stay in cache across its offsets) and adds
// their outer products, in row order and in fixed chunks.
template <typename scalar_t>
void add_weight_grad(const scalar_t* in, const scalar_t* grad_out, const int32_t* nbr,
                     at::opmath_type<scalar_t>* acc, int64_t o_first, int64_t o_last,
                     int64_t volume, int64_t k_begin, int64_t k_end, int64_t c_in, int64_t c_out,
                     const FloatTiles& tiles, PairBuckets<scalar_t, const scalar_t>* pairs) {
  using acc_t = at::opmath_type<scalar_t>;
  // Blocks of 1024 rows give a sparse offset enough pairs to share each update of its dw[k]
  // (each tile pass reads and writes all of it); its pairs are then taken 64 at a time, whose
  // rows stay in L1 across the channel tiles. Both are fixed: they group the sums.
  constexpr int64_t block = 1024, chunk = 64;
  for (int64_t o_begin = o_first; o_begin < o_last; o_begin += block) {
    const int64_t o_end = std::min(o_last, o_begin + block);
    pairs->fill(nbr, volume, k_begin, k_end, o_begin, o_end, in, c_in,
                grad_out + o_begin * c_out, c_out);
    for (int64_t k = k_begin; k < k_end; ++k) {
      const int64_t count = pairs->count(k);
      if (count == 0) continue;  // the tiles would still read and write all of dw[k]
      const scalar_t* const* x_rows = pairs->x_rows(k);
      const scalar_t* const* g_rows = pairs->o_rows(k);
      acc_t* dw = acc + (k - k_begin) * c_in * c_out;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (tiles.pairs_outer_product != nullptr) {
          for (int64_t first = 0; first < count; first += chunk) {
            tiles.pairs_outer_product(x_rows + first, c_in, g_rows + first,
                                      std::min(chunk, count - first), dw, c_out);
          }
          continue;
        }
      }
      for (int64_t p = 0; p < count; ++p) {
        for (int64_t c = 0; c < c_in; ++c) {
          const acc_t xv = static_cast<acc_t>(x_rows[p][c]);
          acc_t* a = dw + c * c_out;
          for (int64_t co = 0; co < c_out; ++co) a[co] += xv * static_cast<acc_t>(g_rows[p][co]);
        }
      }
    }
  }
}

// Row segments of a weight gradient: kernels of few offsets (a 1x1 layer has one) split their
// rows too, so that at least kWeightGradTasks (offset, segment) tasks share out the work. Set
// by the shapes alone, never by the thread count: each segment sums its rows apart, and the
// segments are added up in order, so the grouping of the sums stays fixed.
constexpr int64_t kWeightGradTasks = 16, kMinSegmentRows = 4096;
int64_t weight_grad_segments(int64_t rows, int64_t volume) {
  if (volume == 0) return 1;  // a [N, 0] table: nothing to sum
  const int64_t wanted = (kWeightGradTasks + volume - 1) / volume;
  return std::clamp<int64_t>(rows / kMinSegmentRows, 1, wanted);
}

// grad_weight[k] = sum over the pairs (i, o) of offset k of in[i]^T grad_out[o]. Threads own
// (row segment, offset) tasks; the result does not depend on the thread count.
template <typename scalar_t>
void weight_grad_kernel(const scalar_t* in, const scalar_t* grad_out, const int32_t* nbr,
                        scalar_t* grad_weight, int64_t rows, int64_t volume, int64_t c_in,
                        int64_t c_out, const FloatTiles& tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t segments = weight_grad_segments(rows, volume);
  const int64_t segment_rows = (rows + segments - 1) / segments;
  const int64_t matrix = c_in * c_out;
  std::vector<acc_t> partial(segments * volume * matrix, acc_t(0));  // [segment][k][c_in][c_out]
  at::parallel_for(0, segments * volume, 1, [&](int64_t t_begin, int64_t t_end) {
    PairBuckets<scalar_t, const scalar_t> pairs;
    for (int64_t s = t_begin / volume; s * volume < t_end; ++s) {
      const int64_t k_begin = std::max(t_begin, s * volume) - s * volume;
      const int64_t k_end = std::min(t_end, (s + 1) * volume) - s * volume;
      add_weight_grad(in, grad_out, nbr, partial.data() + (s * volume + k_begin) * matrix,
                      s * segment_rows, std::min(rows, (s + 1) * segment_rows), volume, k_begin,
                      k_end, c_in, c_out, tiles, &pairs);
    }
  });
  at::parallel_for(0, volume * matrix, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t sum = partial[j];
      for (int64_t s = 1; s < segments; ++s) sum += partial[s * volume * matrix + j];
      grad_weight[j] = static_cast<scalar_t>(sum);
    }
  });
}

at::Tensor sparse_conv_weight_grad_cpu(const at::Tensor& features, const at::Tensor& grad_out,
                                       const at::Tensor& nbr) {
  check_features(features, "features");
  check_features(grad_out, "grad_out");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == features.scalar_type(), "grad_out dtype ",
                   grad_out.scalar_type(), " must match features dtype ",
                   features.scalar_type());
  check_neighbor_table(nbr, "nbr", grad_out.size(0), -1);
  check_neighbor_entries_cpu(nbr, "nbr", features.size(0));
  const FloatTiles tiles = float_tiles(grad_out.size(1));
  const at::ScalarType compute = compute_type(features.scalar_type(), tiles);
  const at::Tensor x = features.to(compute).contiguous();
  const at::Tensor g = grad_out.to(compute).contiguous();
  const at::Tensor table = nbr.contiguous();
  const int64_t volume = nbr.size(1);
  at::Tensor grad_weight = at::empty({volume, features.size(1), grad_out.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, compute,
                                  "sparse_conv_weight_grad_cpu", [&] {
                                    weight_grad_kernel<scalar_t>(
                                        x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                        table.data_ptr<int32_t>(),
                                        grad_weight.data_ptr<scalar_t>(), g.size(0), volume,
                                        x.size(1), g.size(1), tiles);
                                  });
  return grad_weight.to(features.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CPU, m) {
  m.impl("sparse_conv", &sparse_conv_cpu);
  m.impl("sparse_conv_weight_grad", &sparse_conv_weight_grad_cpu);
}

}  // namespace spconv_lite
