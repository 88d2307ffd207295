// Voxelization (points -> voxels) on the CPU, spconv 2.x `PointToVoxel` semantics.
//
// A point's voxel along axis d is floor((p[d] - range_min[d]) / voxel_size[d]) computed in the
// points' precision, float32 or float64, as spconv does (for float32 points, float64 would put
// ~1.5% of a KITTI frame's points in another voxel than spconv's). The point is dropped when that lies outside [0, grid_size[d]) or when any of its values is not
// finite. Voxels are numbered in order of their first point; voxels past max_voxels are dropped.
//
// The grid and its checks are shared with the CUDA op (include/spconv_lite/voxel_grid.h).
//
// Memory follows the number of points, never the grid volume: the distinct voxels are found
// with an open-addressing hash table (voxel_hash below) instead of a dense grid. Passes:
//   1. quantize (parallel over blocks of points, eight points per AVX2 step where the CPU
//      has it): the list of kept points and their voxel keys;
//   2. number the voxels (serial, in input order): insert each key into the table, which
//      stores a new voxel's number; then count each voxel's points, which gives each point
//      its slot in its voxel. Once max_voxels voxels exist, keys are only looked up, so the
//      table holds at most max_voxels keys. The insertions are serial because parallel ones
//      were slower here: threads contend for the same table lines (consecutive sweeps cover
//      the same space) and the numbering then needs a second pass over the table;
//   3. copy the kept points into their slots (parallel over points), then per voxel range
//      the coordinates (decoded from the voxel's key) and the free slots.
// Clouds under kParallelPoints points run on one thread. Every value written depends only on
// the input order, so results are bitwise independent of the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#ifndef _WIN32
#include <pthread.h>
#endif

#include "spconv_lite/checks.h"
#include "spconv_lite/coords.h"
#include "spconv_lite/hash_table.h"
#include "spconv_lite/voxel_grid.h"
#include "simd_x86.h"

namespace spconv_lite {
namespace {

constexpr int64_t kPointGrain = 8192;  // points per task of the parallel point passes
constexpr int64_t kVoxelGrain = 4096;  // voxels per task of the parallel voxel passes
// Smaller clouds run on one thread. A LiDAR frame (35k-200k points) takes 1-3 ms on one core,
// and each parallel region waits until every thread has been scheduled: on the busy 2-core
// dev machine that wait cost more than the work saved, even for 4 frames (461k points).
constexpr int64_t kParallelPoints = int64_t{1} << 20;

// Runs f(begin, end) over [0, count): split over threads with at::parallel_for when `parallel`,
// else one call on this thread.
template <typename F>
void for_range(bool parallel, int64_t count, int64_t grain, const F& f) {
  if (parallel) {
    at::parallel_for(0, count, grain, f);
  } else if (count > 0) {
    f(0, count);
  }
}

// Four float or int32 lanes (GCC/Clang vector extensions: SSE on x86, NEON on ARM): one point's
// x, y, z (and a 4th axis) are quantized together with one vector division.
using Float4 = float __attribute__((vector_size(16)));
using Int4 = int32_t __attribute__((vector_size(16)));
static_assert(kMaxDims == 4, "one vector lane per axis");

// murmur3's 32-bit finaliser (AVX2 multiplies 32-bit lanes only); it maps 0 to 0.
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Hash of a voxel key for the voxelizer's table, computed with the key in pass 1 (eight
// at a time there), so the serial numbering pass only masks it. Unlike hash_key in
// hash_table.h, neighbouring keys are not kept together: the voxelizer looks up no
// neighbours, and z-neighbours sharing a run of slots lengthened the probes (~5% of the
// time). 32 bits address any table of this op (at most 2 * 2^31 entries). A key's high half
// (grids of more than 2^32 cells) is mixed before it is folded in: folded as it was, the keys
// whose halves XOR alike shared one slot (a 1/32 ramp on a 2^17 x 2^17 x 2^10 grid: ~1000
// voxels a slot, quadratic probing). For keys below 2^32 this is mix32 of the key, as the
// AVX2 pass computes it.
inline uint32_t voxel_hash(int64_t key) {
  const uint64_t bits = static_cast<uint64_t>(key);
  return mix32(static_cast<uint32_t>(bits) ^ mix32(static_cast<uint32_t>(bits >> 32)));
}

// The kept points of a cloud, in input order: point number, voxel key and its voxel_hash.
struct KeptList {
  int32_t* points;
  int64_t* keys;
  uint32_t* hashes;

  KeptList from(int64_t k) const { return {points + k, keys + k, hashes + k}; }
  void set(int64_t k, int64_t point, int64_t key) const {
    points[k] = static_cast<int32_t>(point);
    keys[k] = key;
    hashes[k] = voxel_hash(key);
  }
};

// The exact quantization of points on a checked grid (voxel_grid.h): for float32 points four
// lanes at a time, the same operations as quantize_point there; for float64 points that
// function itself.
class PointQuantizer {
 public:
  // Keys are row-major over the grid padded to a power of two cells along each axis, so that
  // a voxel's coordinates decode from its key with shifts. A grid whose padded keys would pass
  // 2^62 keeps the exact row-major keys (voxel_grid.h), decoded with divisions.
  PointQuantizer(const VoxelGrid& g, c10::IntArrayRef grid_size) : ndim_(g.ndim), grid_(g) {
    int bits = 0;  // of the padded keys; the last axis (z) in the lowest bits
    for (int d = ndim_ - 1; d >= 0; --d) {
      int axis_bits = 0;
      while ((int64_t{1} << axis_bits) < grid_size[d]) ++axis_bits;  // grid sizes are < 2^31
      shift_[d] = bits;
      mask_[d] = (int64_t{1} << axis_bits) - 1;
      bits += axis_bits;
    }
    padded_ = bits <= 62;
    for (int d = 0; d < kMaxDims; ++d) {
      // Lanes past ndim quantize a zeroed value to coordinate 0 with key stride 0.
      const bool axis = d < ndim_;
      size_[d] = g.size[d];
      low_[d] = g.low[d];
      limit_[d] = g.limit[d];
      lane_mask_[d] = axis ? -1 : 0;
      cells_[d] = axis ? grid_size[d] : 1;
      stride_[d] = axis && padded_ ? int64_t{1} << shift_[d] : g.stride[d];
    }
    keys_fit_int32_ = bits <= 31;  // (so only padded keys fit)
  }

  int ndim() const { return ndim_; }
  bool keys_fit_int32() const { return keys_fit_int32_; }

  // Coordinate along axis d of the voxel of `key`.
  int32_t coordinate(int64_t key, int d) const {
    return static_cast<int32_t>(padded_ ? key >> shift_[d] & mask_[d]
                                        : key / stride_[d] % cells_[d]);
  }

  // Voxel coordinates (x, y, z, ... lanes) of the point of `columns` values at p, whose first
  // kLoad = min(columns, 4) values are read as a vector. Returns false when the point is
  // dropped (*coord is then meaningless). floor(q) is in [0, cells) exactly when q is, so q
  // is tested, then truncated (equal to floor for q >= 0); NaN fails the test.
  template <int kLoad>
  bool quantize(const float* p, int64_t columns, Int4* coord) const {
    Float4 raw = {0.f, 0.f, 0.f, 0.f};
    std::memcpy(&raw, p, kLoad * sizeof(float));
    // Every loaded value must be finite (x - x is 0 only for finite x); then the axes.
    Int4 ok = (raw - raw) == Float4{0.f, 0.f, 0.f, 0.f};
    const Float4 value = reinterpret_cast<Float4>(reinterpret_cast<Int4>(raw) & lane_mask_);
    const Float4 q = (value - low_) / size_;
    ok &= (q >= Float4{0.f, 0.f, 0.f, 0.f}) & (q < limit_);
    bool keep = (ok[0] & ok[1] & ok[2] & ok[3]) != 0;
    for (int64_t j = kLoad; j < columns; ++j) keep = keep && std::isfinite(p[j]);
    // Converted whether kept or not (no branch); failing lanes are zeroed so that the
    // conversion stays in range.
    const Float4 in_range = reinterpret_cast<Float4>(reinterpret_cast<Int4>(q) & ok);
    *coord = __builtin_convertvector(in_range, Int4);
    return keep;
  }

  template <int kLoad>
  bool quantize(const double* p, int64_t columns, Int4* coord) const {
    int32_t c[kMaxDims];
    const bool keep = quantize_point(grid_, p, columns, c);
    *coord = Int4{c[0], c[1], c[2], c[3]};
    return keep;
  }

  int64_t key(const Int4& c) const {
    return c[0] * stride_[0] + c[1] * stride_[1] + c[2] * stride_[2] + c[3] * stride_[3];
  }

  // Lists the kept points of points [0, count), which are points [first, first + count) of
  // the cloud, in `out`; returns how many are kept.
  template <int kLoad, typename T>
  int64_t keep(const T* points, int64_t columns, int64_t first, int64_t count,
               const KeptList& out) const {
    int64_t kept = 0, i = 0;
#if defined(SPCONV_LITE_HAS_AVX2_KERNELS)
    if constexpr (std::is_same_v<T, float>) {
      if (keys_fit_int32_ && avx2::supported()) {
        i = count - count % 8;
        kept = keep_avx2<kLoad>(points, columns, first, i, out);
      }
    }
#endif
    for (; i < count; ++i) kept += keep_one<kLoad>(points, columns, first, i, out.from(kept));
    return kept;
  }

 private:
  // Lists point i first in `out` (which counts it only when it is kept).
  template <int kLoad, typename T>
  bool keep_one(const T* points, int64_t columns, int64_t first, int64_t i,
                const KeptList& out) const {
    Int4 coord;
    const bool kept = quantize<kLoad>(points + i * columns, columns, &coord);
    out.set(0, first + i, key(coord));
    return kept;
  }

#if defined(SPCONV_LITE_HAS_AVX2_KERNELS)
  // keep() for count (a multiple of 8) points, eight at a time with one point per lane: the
  // same float32 operations, with the key in int32 (so only for grids whose keys fit). A
  // group of eight holding any non-finite value goes through keep_one() instead.
  template <int kLoad>
  SPCONV_LITE_AVX2 int64_t keep_avx2(const float* points, int64_t columns, int64_t first,
                                     int64_t count, const KeptList& out) const {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i row_start =
        _mm256_mullo_epi32(lane, _mm256_set1_epi32(static_cast<int>(columns)));
    const __m256 zero = _mm256_setzero_ps();
    // Per-axis constants in registers: the stores below may alias this object's members, so
    // the compiler would reload them for every group.
    __m256 low[kMaxDims], size[kMaxDims], limit[kMaxDims];
    __m128i shift[kMaxDims];  // keys that fit int32 are padded: strides are powers of two
    for (int d = 0; d < ndim_; ++d) {
      low[d] = _mm256_set1_ps(low_[d]);
      size[d] = _mm256_set1_ps(size_[d]);
      limit[d] = _mm256_set1_ps(limit_[d]);
      shift[d] = _mm_cvtsi32_si128(shift_[d]);
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < count; i += 8) {
      const float* p = points + i * columns;
      __m256 not_finite = zero;  // x - x is +0 (all bits clear) only for finite x
      __m256 rows[4];            // with 4 columns: points (0, 1), (2, 3), (4, 5), (6, 7)
      for (int64_t j = 0; j < 8 * columns; j += 8) {
        const __m256 x = _mm256_loadu_ps(p + j);
        not_finite = _mm256_or_ps(not_finite, _mm256_sub_ps(x, x));
        if (columns == 4) rows[j / 8] = x;
      }
      if (!_mm256_testz_si256(_mm256_castps_si256(not_finite),
                              _mm256_castps_si256(not_finite))) {
        for (int64_t j = i; j < i + 8; ++j) {
          kept += keep_one<kLoad>(points, columns, first, j, out.from(kept));
        }
        continue;
      }
      // Axis values of the eight points, one point per lane; with 4 columns by a transpose
      // of the rows, in the lane order of points 0 2 4 6 1 3 5 7 (restored below).
      __m256 axis[4];
      if (columns == 4) {
        const __m256 xy02_13 = _mm256_unpacklo_ps(rows[0], rows[1]);
        const __m256 zw02_13 = _mm256_unpackhi_ps(rows[0], rows[1]);
        const __m256 xy46_57 = _mm256_unpacklo_ps(rows[2], rows[3]);
        const __m256 zw46_57 = _mm256_unpackhi_ps(rows[2], rows[3]);
        axis[0] = _mm256_shuffle_ps(xy02_13, xy46_57, 0x44);
        axis[1] = _mm256_shuffle_ps(xy02_13, xy46_57, 0xEE);
        axis[2] = _mm256_shuffle_ps(zw02_13, zw46_57, 0x44);
        axis[3] = _mm256_shuffle_ps(zw02_13, zw46_57, 0xEE);
      } else {
        for (int d = 0; d < ndim_; ++d) {
          axis[d] = _mm256_i32gather_ps(p + d, row_start, sizeof(float));
        }
      }
      __m256i inside = _mm256_set1_epi32(-1);
      __m256i key = _mm256_setzero_si256();
      for (int d = 0; d < ndim_; ++d) {
        const __m256 value = axis[d];
        const __m256 q = _mm256_div_ps(_mm256_sub_ps(value, low[d]), size[d]);
        const __m256 in_axis = _mm256_and_ps(_mm256_cmp_ps(q, zero, _CMP_GE_OQ),
                                             _mm256_cmp_ps(q, limit[d], _CMP_LT_OQ));
        inside = _mm256_and_si256(inside, _mm256_castps_si256(in_axis));
        // Lanes outside the grid convert to garbage; they are not kept.
        key = _mm256_or_si256(key, _mm256_sll_epi32(_mm256_cvttps_epi32(q), shift[d]));
      }
      if (columns == 4) {  // back to point order
        const __m256i point_lane = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        key = _mm256_permutevar8x32_epi32(key, point_lane);
        inside = _mm256_permutevar8x32_epi32(inside, point_lane);
      }
      // Left-pack the kept lanes (AVX2 has no compress instruction).
      const int lanes_kept = _mm256_movemask_ps(_mm256_castsi256_ps(inside));
      const __m256i order = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(kLeftPack.lanes[lanes_kept]));
      const __m256i packed_key = _mm256_permutevar8x32_epi32(key, order);
      const __m256i point =
          _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(first + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.points + kept),
                          _mm256_permutevar8x32_epi32(point, order));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.keys + kept),
                          _mm256_cvtepi32_epi64(_mm256_castsi256_si128(packed_key)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.keys + kept + 4),
                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(packed_key, 1)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.hashes + kept),
                          voxel_hash_avx2(packed_key));
      kept += __builtin_popcount(lanes_kept);
    }
    return kept;
  }

  // voxel_hash of eight keys in [0, 2^31).
  static SPCONV_LITE_AVX2 __m256i voxel_hash_avx2(__m256i key) {
    __m256i h = _mm256_xor_si256(key, _mm256_srli_epi32(key, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85ebca6bu)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xc2b2ae35u)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    return h;
  }

  // lanes[m]: the numbers of the set lanes of the 8-lane mask m, first to last, one per byte.
  struct LeftPackTable {
    uint64_t lanes[256];
    LeftPackTable() {
      for (int m = 0; m < 256; ++m) {
        uint64_t order = 0;
        for (int l = 0, k = 0; l < 8; ++l) {
          if (m >> l & 1) order |= static_cast<uint64_t>(l) << (8 * k++);
        }
        lanes[m] = order;
      }
    }
  };
  static inline const LeftPackTable kLeftPack{};
#endif

  int ndim_;
  VoxelGrid grid_;
  Float4 size_, low_, limit_;
  Int4 lane_mask_;
  int64_t stride_[kMaxDims];  // key strides (0 past ndim)
  int64_t cells_[kMaxDims];   // grid size (1 past ndim)
  int shift_[kMaxDims];       // with padded keys: bit offset and mask of each axis
  int64_t mask_[kMaxDims];
  bool padded_;
  bool keys_fit_int32_;
};

// Calls f.template operator()<kValue>() with kValue = value (1 to 4) as a compile-time
// constant.
template <typename F>
void with_constant_1_to_4(int64_t value, const F& f) {
  switch (value) {
    case 1: return f.template operator()<1>();
    case 2: return f.template operator()<2>();
    case 3: return f.template operator()<3>();
    default: return f.template operator()<4>();
  }
}

// Calls f.template operator()<kLoad>() with kLoad = min(columns, 4).
template <typename F>
void with_load_width(int64_t columns, const F& f) {
  with_constant_1_to_4(std::min<int64_t>(columns, 4), f);
}

// An entry of the voxelizer's hash table (open addressing, linear probing, voxel_hash): a
// voxel's key (kEmptyKey when free) and number. Keys are int32 where the grid's keys fit
// (8-byte entries, ~1 MB for 40k voxels), so the table spans half the cache lines: it is
// usually out of cache, and fetching its lines is most of the numbering's time.
template <typename Key>
struct VoxelEntry {
  Key key;
  int32_t voxel;
};

// Per-thread buffers of the voxelizer, kept from call to call: fresh multi-megabyte buffers
// are often handed back to the system on free, and faulting their pages in again took up to
// half the time of a KITTI frame. Buffers for clouds over kKeepPoints points are released.
struct Scratch {
  std::vector<int32_t> kept_points;  // [K] the KeptList
  std::vector<int64_t> kept_keys;
  std::vector<uint32_t> kept_hashes;
  std::vector<int64_t> slot;         // [K] voxel, then slot, of each kept point
  std::vector<VoxelEntry<int32_t>> table32;  // the table, with int32 or int64 keys
  std::vector<VoxelEntry<int64_t>> table64;
  std::vector<int64_t> voxel_key;    // [M] key of each voxel
  std::vector<int32_t> count;        // [M + 1] number of points of each voxel (+ a spare slot)

  static constexpr int64_t kKeepPoints = int64_t{1} << 22;

  void release_if_large() {
    if (static_cast<int64_t>(kept_keys.size()) > kKeepPoints) *this = Scratch();
  }
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// v.data() with room for n elements (growing only, so reused elements are not re-filled).
template <typename T>
T* room_for(std::vector<T>& v, int64_t n, const T& fill = T()) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n, fill);
  return v.data();
}

// The allocator of the op's outputs, which keeps freed blocks for later calls. Depending on
// what else a process holds, glibc may hand a freed multi-megabyte buffer back to the system
// and fault its pages in again on the next call: in such processes a KITTI frame took ~3 ms
// instead of ~1.1 ms. At most kKeptBytes are kept, and a block is reused only for a request
// of at least half its size. Outputs are ordinary (resizable) CPU tensors.
class OutputAllocator final : public c10::Allocator {
 public:
  // Never destroyed: tensors may free their storage after static destructors have run.
  static OutputAllocator* get() {
    static OutputAllocator* allocator = [] {
      auto* created = new OutputAllocator();
#ifndef _WIN32
      // A fork while another thread holds the lock (a DataLoader starting its workers while
      // a thread voxelizes) would leave it held forever in the child: hold it across fork.
      pthread_atfork([] { get()->mutex_.lock(); }, [] { get()->mutex_.unlock(); },
                     [] { get()->mutex_.unlock(); });
#endif
      return created;
    }();
    return allocator;
  }

  static at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype) {
    return at::detail::empty_generic(shape, get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     dtype, std::nullopt);
  }

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::kCPU)};
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto fit = free_.lower_bound(bytes);
      if (fit != free_.end() && fit->first / 2 <= bytes) {
        block = fit->second;
        kept_bytes_ -= block->capacity;
        free_.erase(fit);
      }
    }
    if (block == nullptr) block = new_block(bytes);
    return {block->data, block, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t capacity;  // bytes
  };
  static constexpr size_t kKeptBytes = size_t{64} << 20;

  // A block with room for a next cloud with more voxels, or exactly `bytes` where the
  // room is not to be had: the headroom must not turn a request that fits into an error.
  static Block* new_block(size_t bytes) {
    const size_t roomy = bytes + bytes / 4;
    try {
      return new Block{c10::alloc_cpu(roomy), roomy};
    } catch (const c10::Error&) {
      return new Block{c10::alloc_cpu(bytes), bytes};
    }
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    if (block == nullptr) return;
    OutputAllocator* self = get();
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      if (self->kept_bytes_ + block->capacity <= kKeptBytes) {
        self->free_.emplace(block->capacity, block);
        self->kept_bytes_ += block->capacity;
        return;
      }
    }
    c10::free_cpu(block->data);
    delete block;
  }

  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;  // by capacity
  size_t kept_bytes_ = 0;
};

// Which voxel every point falls in.
struct VoxelAssignment {
  at::Tensor point_voxel_id;   // int64 [N], voxel number or -1
  const int32_t* kept_points;  // [K] the points inside the grid, in input order
  // [K] v * P + r for a kept point that is the r-th point of voxel v, with r < P (the
  // `slots` of assign_voxels); else -1.
  const int64_t* slot;
  int64_t num_kept = 0;        // K
  const int64_t* voxel_key;    // [M] key of each voxel
  const int32_t* count;        // [M] number of points of each voxel
  int64_t num_voxels = 0;      // M
  bool parallel = false;       // whether passes 1 and 3 use several threads
};

// Numbers the voxels of the kept points [0, valid) in order of their first point, at most
// max_voxels of them: voxel[k] is kept point k's voxel number (-1 past max_voxels) and
// voxel_key[v] the key of voxel v. Returns the number of voxels.
template <typename Key>
int64_t number_voxels(const KeptList& kept, int64_t valid, int64_t max_voxels,
                      std::vector<VoxelEntry<Key>>* storage, int64_t* voxel, int64_t* voxel_key) {
  const int64_t capacity = hash_capacity_for(std::min(valid, max_voxels));
  const int64_t mask = capacity - 1;
  VoxelEntry<Key>* table = room_for(*storage, capacity);
  // All bits set: every key is kEmptyKey. Emptying the table each call also brings it into
  // cache in sequence, which costs less than the scattered misses it saves.
  std::memset(table, 0xff, capacity * sizeof(VoxelEntry<Key>));
  constexpr int64_t kPrefetchAhead = 16;  // kept points
  int64_t voxels = 0;
  for (int64_t k = 0; k < valid; ++k) {
    __builtin_prefetch(&table[kept.hashes[std::min(k + kPrefetchAhead, valid - 1)] & mask]);
    const Key key = static_cast<Key>(kept.keys[k]);
    int64_t slot = kept.hashes[k] & mask;
    // The probe ends at the key or at a free entry (the table always has one).
    while ((table[slot].key != kEmptyKey) & (table[slot].key != key)) slot = (slot + 1) & mask;
    VoxelEntry<Key>& entry = table[slot];
    const bool found = entry.key != kEmptyKey;
    const bool open = !found && voxels < max_voxels;
    if (open) {
      entry = {key, static_cast<int32_t>(voxels)};
      voxel_key[voxels] = key;
    }
    voxel[k] = found ? entry.voxel : (open ? voxels : -1);
    voxels += open;
  }
  return voxels;
}

// Passes 1 and 2, for voxels of `slots` points (0 when the slots are not wanted).
template <typename T>
VoxelAssignment assign_voxels(const T* points, int64_t n, int64_t columns,
                              const PointQuantizer& quantizer, int64_t max_voxels,
                              int64_t slots, Scratch* scratch) {
  // Pass 1: quantize. On several threads, the kept points of block b (of kPointGrain points)
  // are listed from entry b * kPointGrain on, then the lists are joined.
  const bool parallel = at::get_num_threads() > 1 && n >= kParallelPoints;
  const KeptList kept{room_for(scratch->kept_points, n), room_for(scratch->kept_keys, n),
                      room_for(scratch->kept_hashes, n)};
  int64_t valid = 0;
  with_load_width(columns, [&]<int kLoad>() {
    if (!parallel) {
      valid = quantizer.template keep<kLoad>(points, columns, 0, n, kept);
      return;
    }
    const int64_t blocks = (n + kPointGrain - 1) / kPointGrain;
    std::vector<int64_t> kept_in_block(blocks);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const PointQuantizer local = quantizer;  // stores below cannot alias a local copy
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * kPointGrain, end = std::min(n, begin + kPointGrain);
        kept_in_block[b] = local.template keep<kLoad>(points + begin * columns, columns, begin,
                                                      end - begin, kept.from(begin));
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t from = b * kPointGrain, count = kept_in_block[b];
      std::memmove(kept.points + valid, kept.points + from, count * sizeof(int32_t));
      std::memmove(kept.keys + valid, kept.keys + from, count * sizeof(int64_t));
      std::memmove(kept.hashes + valid, kept.hashes + from, count * sizeof(uint32_t));
      valid += count;
    }
  });

  // Pass 2, serial in input order. Only kept voxels enter the table (once max_voxels exist,
  // points of other voxels are dropped), so it cannot fill up and stays small. Points of no
  // voxel count themselves in the spare last slot.
  const int64_t expected = std::min(valid, max_voxels);
  int64_t* voxel_key = room_for(scratch->voxel_key, expected);
  int64_t* voxel_slot = room_for(scratch->slot, valid);
  const int64_t voxels =
      quantizer.keys_fit_int32()
          ? number_voxels(kept, valid, max_voxels, &scratch->table32, voxel_slot, voxel_key)
          : number_voxels(kept, valid, max_voxels, &scratch->table64, voxel_slot, voxel_key);
  // Each point's rank in its voxel gives its slot there.
  int32_t* count = room_for(scratch->count, expected + 1);
  std::fill_n(count, expected + 1, 0);
  at::Tensor point_voxel_id = OutputAllocator::empty({n}, at::kLong);
  int64_t* ids = point_voxel_id.data_ptr<int64_t>();
  std::fill_n(ids, n, -1);
  for (int64_t k = 0; k < valid; ++k) {
    const int64_t v = voxel_slot[k];
    const int32_t rank = count[v >= 0 ? v : expected]++;
    voxel_slot[k] = v >= 0 && rank < slots ? v * slots + rank : -1;
    ids[kept.points[k]] = v;
  }
  return {point_voxel_id, kept.points, voxel_slot, valid, voxel_key, count, voxels, parallel};
}

// Runs f(begin, end) over ranges of the voxels in parallel after writing the coordinates of
// those voxels, decoded from their keys, into coords [M, ndim] (z, y, x: the axes reversed).
template <typename F>
at::Tensor for_voxel_ranges(const VoxelAssignment& a, const PointQuantizer& quantizer,
                            const F& f) {
  const int ndim = quantizer.ndim();
  at::Tensor coordinates = OutputAllocator::empty({a.num_voxels, ndim}, at::kInt);
  int32_t* coords = coordinates.data_ptr<int32_t>();
  for_range(a.parallel, a.num_voxels, kVoxelGrain, [&](int64_t begin, int64_t end) {
    with_constant_1_to_4(ndim, [&]<int kDims>() {
      for (int64_t v = begin; v < end; ++v) {
        const int64_t key = a.voxel_key[v];
        for (int d = 0; d < kDims; ++d) {
          coords[v * kDims + d] = quantizer.coordinate(key, kDims - 1 - d);
        }
      }
    });
    f(begin, end);
  });
  return coordinates;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_cpu(
    const at::Tensor& points, c10::ArrayRef<double> voxel_size, c10::ArrayRef<double> range_min,
    c10::IntArrayRef grid_size, int64_t max_points_per_voxel, int64_t max_voxels,
    bool empty_mean) {
  const PointQuantizer quantizer(check_voxelize_args(points, voxel_size, range_min, grid_size,
                                                     max_points_per_voxel, max_voxels),
                                 grid_size);
  const at::Tensor input = points.contiguous();
  const int64_t n = input.size(0), columns = input.size(1), slots = max_points_per_voxel;
  Scratch& scratch = thread_scratch();
  return with_point_data(input, [&](const auto* data) {
    const VoxelAssignment a =
        assign_voxels(data, n, columns, quantizer, max_voxels, slots, &scratch);

    at::Tensor voxels = OutputAllocator::empty({a.num_voxels, slots, columns}, at::kFloat);
    at::Tensor counts = OutputAllocator::empty({a.num_voxels}, at::kInt);
    float* out = voxels.data_ptr<float>();
    int32_t* num = counts.data_ptr<int32_t>();
    const int64_t row = slots * columns;
    // One memset beats a small one per voxel.
    if (!empty_mean && voxels.numel() > 0) std::memset(out, 0, voxels.numel() * sizeof(float));
    // Each (voxel, slot) is written by exactly one point, so the points can be split freely.
    for_range(a.parallel, a.num_kept, kPointGrain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (a.slot[k] < 0) continue;
        const auto* src = data + int64_t{a.kept_points[k]} * columns;
        float* dst = out + a.slot[k] * columns;
        for (int64_t c = 0; c < columns; ++c) dst[c] = static_cast<float>(src[c]);
      }
    });
    // With empty_mean, free slots get the mean of the voxel's stored points (a voxel with a
    // free slot stores all its points), summed in double in slot order.
    at::Tensor coordinates = for_voxel_ranges(a, quantizer, [&](int64_t begin, int64_t end) {
      std::vector<double> mean(columns);
      for (int64_t v = begin; v < end; ++v) {
        num[v] = std::min<int32_t>(a.count[v], static_cast<int32_t>(slots));
        if (!empty_mean) continue;
        float* voxel = out + v * row;
        std::fill(mean.begin(), mean.end(), 0.0);
        for (int64_t s = 0; s < num[v]; ++s) {
          for (int64_t c = 0; c < columns; ++c) mean[c] += voxel[s * columns + c];
        }
        for (int64_t j = num[v] * columns; j < row; ++j) {
          voxel[j] = static_cast<float>(mean[j % columns] / num[v]);
        }
      }
    });
    scratch.release_if_large();
    return std::make_tuple(voxels, coordinates, counts, a.point_voxel_id);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_mean_cpu(
    const at::Tensor& points, c10::ArrayRef<double> voxel_size, c10::ArrayRef<double> range_min,
    c10::IntArrayRef grid_size, int64_t max_voxels) {
  const PointQuantizer quantizer(check_voxelize_args(points, voxel_size, range_min, grid_size,
                                                     std::nullopt, max_voxels),
                                 grid_size);
  const at::Tensor input = points.contiguous();
  const int64_t n = input.size(0), columns = input.size(1);
  Scratch& scratch = thread_scratch();
  return with_point_data(input, [&](const auto* data) {
    const VoxelAssignment a =
        assign_voxels(data, n, columns, quantizer, max_voxels, 0, &scratch);

    at::Tensor features = OutputAllocator::empty({a.num_voxels, columns}, at::kFloat);
    at::Tensor counts = OutputAllocator::empty({a.num_voxels}, at::kInt);
    float* out = features.data_ptr<float>();
    int32_t* num = counts.data_ptr<int32_t>();
    const int64_t* ids = a.point_voxel_id.data_ptr<int64_t>();
    // Sums in double, in input order. Each task owns a range of voxels and scans all points,
    // so every voxel is summed in the same order whatever the split.
    at::Tensor coordinates = for_voxel_ranges(a, quantizer, [&](int64_t v0, int64_t v1) {
      std::vector<double> sum((v1 - v0) * columns, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        if (ids[i] < v0 || ids[i] >= v1) continue;
        double* acc = sum.data() + (ids[i] - v0) * columns;
        for (int64_t c = 0; c < columns; ++c) acc[c] += data[i * columns + c];
      }
      for (int64_t v = v0; v < v1; ++v) {
        num[v] = a.count[v];
        for (int64_t c = 0; c < columns; ++c) {
          out[v * columns + c] = static_cast<float>(sum[(v - v0) * columns + c] / num[v]);
        }
      }
    });
    scratch.release_if_large();
    return std::make_tuple(features, coordinates, counts, a.point_voxel_id);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CPU, m) {
  m.impl("voxelize", &voxelize_cpu);
  m.impl("voxelize_mean", &voxelize_mean_cpu);
}

}  // namespace spconv_lite
