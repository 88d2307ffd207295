// Voxelization (points -> voxels) on the CPU, spconv 2.x `PointToVoxel` semantics.
//
// A point's voxel along axis d is floor((p[d] - range_min[d]) / voxel_size[d]) computed in
// float32 (as spconv does; float64 puts ~1.5% of a KITTI frame's points in another voxel). The
// point is dropped when that lies outside [0, grid_size[d]) or when any of its values is not
// finite. Voxels are numbered in order of their first point; voxels past max_voxels are dropped.
//
// The grid and its checks are shared with the CUDA op (include/spconv_lite/voxel_grid.h).
//
// Memory follows the number of points, never the grid volume: the distinct voxels are found
// with the shared open-addressing hash table (include/spconv_lite/hash_table.h) instead of a
// dense grid. Passes:
//   1. quantize (parallel over blocks of points): each point's voxel key, or none;
//   2. number the voxels (serial, in input order): insert each key into the table, which
//      stores a new voxel's number, and give each point its position among its voxel's
//      points. Once max_voxels voxels exist, keys are only looked up, so the table holds at
//      most max_voxels keys. The insertions are serial because parallel ones were slower
//      here: threads contend for the same table lines (consecutive sweeps cover the same
//      space) and the numbering then needs a second pass over the table;
//   3. copy the points into their slots (parallel over points), then per voxel range the
//      coordinates (re-quantized from the voxel's first point) and the free slots.
// Clouds under kParallelPoints points run on one thread. Every value written depends only on
// the input order, so results are bitwise independent of the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "spconv_lite/checks.h"
#include "spconv_lite/coords.h"
#include "spconv_lite/hash_table.h"
#include "spconv_lite/voxel_grid.h"

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

// The exact float32 quantization of points on a checked grid (voxel_grid.h), four lanes at a
// time: the same operations as quantize_point there.
class PointQuantizer {
 public:
  explicit PointQuantizer(const VoxelGrid& g) : ndim_(g.ndim) {
    for (int d = 0; d < kMaxDims; ++d) {
      // Lanes past ndim quantize a zeroed value to coordinate 0 with key stride 0.
      size_[d] = g.size[d];
      low_[d] = g.low[d];
      limit_[d] = g.limit[d];
      lane_mask_[d] = d < ndim_ ? -1 : 0;
      stride_[d] = g.stride[d];
    }
  }

  int ndim() const { return ndim_; }

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

  int64_t key(const Int4& c) const {
    return c[0] * stride_[0] + c[1] * stride_[1] + c[2] * stride_[2] + c[3] * stride_[3];
  }

 private:
  int ndim_;
  Float4 size_, low_, limit_;
  Int4 lane_mask_;
  int64_t stride_[kMaxDims];
};

// Calls f.template operator()<kLoad>() with kLoad = min(columns, 4) as a compile-time constant.
template <typename F>
void with_load_width(int64_t columns, const F& f) {
  switch (std::min<int64_t>(columns, 4)) {
    case 1: return f.template operator()<1>();
    case 2: return f.template operator()<2>();
    case 3: return f.template operator()<3>();
    default: return f.template operator()<4>();
  }
}

// Per-thread buffers of the voxelizer, kept from call to call: fresh multi-megabyte buffers
// are often handed back to the system on free, and faulting their pages in again took up to
// half the time of a KITTI frame. Buffers for clouds over kKeepPoints points are released.
struct Scratch {
  std::vector<int64_t> keys;         // [N] voxel key of each point, or kEmptyKey
  std::vector<int32_t> rank;         // [N] position of a point among its voxel's points
  std::vector<int64_t> table_keys;   // hash table of the voxels
  std::vector<int32_t> table_values;
  std::vector<int32_t> first_point;  // [M + 1] first point of each voxel (+ a spare slot)
  std::vector<int32_t> count;        // [M + 1] number of points of each voxel (+ a spare slot)

  static constexpr int64_t kKeepPoints = int64_t{1} << 22;

  void release_if_large() {
    if (static_cast<int64_t>(keys.size()) > kKeepPoints) *this = Scratch();
  }
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// v.data() with room for n elements (growing only, so reused elements are not re-filled).
template <typename T>
T* room_for(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Which voxel every point falls in.
struct VoxelAssignment {
  at::Tensor point_voxel_id;   // int64 [N], voxel number or -1
  const int32_t* rank;         // [N] position of a point among its voxel's points
  const int32_t* first_point;  // [M] first point of each voxel
  const int32_t* count;        // [M] number of points of each voxel
  int64_t num_voxels = 0;      // M
  bool parallel = false;       // whether passes 1 and 3 use several threads
};

VoxelAssignment assign_voxels(const float* points, int64_t n, int64_t columns,
                              const PointQuantizer& quantizer, int64_t max_voxels,
                              Scratch* scratch) {
  // Pass 1: quantize. keys[i] is point i's voxel key, or kEmptyKey when it is dropped;
  // valid_in_block[b] counts the kept points of block b (of kPointGrain points).
  const int64_t blocks = (n + kPointGrain - 1) / kPointGrain;
  const bool parallel = at::get_num_threads() > 1 && n >= kParallelPoints;
  int64_t* keys = room_for(scratch->keys, n);
  std::vector<int64_t> valid_in_block(blocks);
  with_load_width(columns, [&]<int kLoad>() {
    for_range(parallel, blocks, 1, [&](int64_t b0, int64_t b1) {
      const PointQuantizer local = quantizer;  // stores below cannot alias a local copy
      Int4 coord = {0, 0, 0, 0};
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t begin = b * kPointGrain, end = std::min(n, begin + kPointGrain);
        int64_t valid = 0;
        for (int64_t i = begin; i < end; ++i) {
          const bool keep = local.template quantize<kLoad>(points + i * columns, columns, &coord);
          keys[i] = keep ? local.key(coord) : kEmptyKey;
          valid += keep;
        }
        valid_in_block[b] = valid;
      }
    });
  });
  int64_t valid = 0;
  for (int64_t b = 0; b < blocks; ++b) valid += valid_in_block[b];

  // Pass 2, serial in input order. Only kept voxels enter the table (once max_voxels exist,
  // points of other voxels are dropped), so it cannot fill up and stays small. The loop is
  // branch-free but for the probe and the skip of dropped points: whether a point opens a voxel
  // follows no pattern, and the mispredicted branches cost more than the table lookups. Dropped points write their rank
  // into the spare last slot of `count`, and first points of no voxel into that of
  // `first_point`.
  const int64_t expected = std::min(valid, max_voxels);
  const int64_t capacity = hash_capacity_for(expected);
  int64_t* table_keys = room_for(scratch->table_keys, capacity);
  std::fill_n(table_keys, capacity, kEmptyKey);
  const HashTableView table{table_keys, room_for(scratch->table_values, capacity), capacity};
  int32_t* first_point = room_for(scratch->first_point, expected + 1);
  int32_t* count = room_for(scratch->count, expected + 1);
  std::fill_n(count, expected + 1, 0);
  int32_t* rank = room_for(scratch->rank, n);  // read only for points with a voxel
  at::Tensor point_voxel_id = at::empty({n}, at::dtype(at::kLong));
  int64_t* ids = point_voxel_id.data_ptr<int64_t>();
  std::fill_n(ids, n, -1);
  int64_t voxels = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t key = keys[i];
    if (key == kEmptyKey) continue;  // dropped points come in runs: a predictable branch
    const int64_t slot = table.slot_for(key);  // the table always has an empty slot
    const bool found = table.keys[slot] == key;
    const bool open = !found && voxels < max_voxels;
    const int64_t v = found ? table.values[slot] : (open ? voxels : -1);
    table.keys[slot] = open ? key : table.keys[slot];
    table.values[slot] = open ? static_cast<int32_t>(voxels) : table.values[slot];
    first_point[open ? voxels : expected] = static_cast<int32_t>(i);
    rank[i] = count[v >= 0 ? v : expected]++;
    ids[i] = v;
    voxels += open;
  }
  return {point_voxel_id, rank, first_point, count, voxels, parallel};
}

// Coordinates (z, y, x: the lanes reversed) of voxels [begin, end), from their first points.
template <int kLoad>
void write_coordinates(const VoxelAssignment& a, const float* points, int64_t columns,
                       const PointQuantizer& quantizer, int64_t begin, int64_t end,
                       int32_t* coords) {
  const int ndim = quantizer.ndim();
  Int4 c;
  for (int64_t v = begin; v < end; ++v) {
    quantizer.template quantize<kLoad>(points + a.first_point[v] * columns, columns, &c);
    for (int d = 0; d < ndim; ++d) coords[v * ndim + d] = c[ndim - 1 - d];
  }
}

// Runs f(begin, end, coords) over ranges of the voxels in parallel after writing the
// coordinates of those voxels into coords [M, ndim].
template <typename F>
at::Tensor for_voxel_ranges(const VoxelAssignment& a, const float* points, int64_t columns,
                            const PointQuantizer& quantizer, const F& f) {
  at::Tensor coordinates = at::empty({a.num_voxels, quantizer.ndim()}, at::dtype(at::kInt));
  int32_t* coords = coordinates.data_ptr<int32_t>();
  with_load_width(columns, [&]<int kLoad>() {
    for_range(a.parallel, a.num_voxels, kVoxelGrain, [&](int64_t begin, int64_t end) {
      write_coordinates<kLoad>(a, points, columns, quantizer, begin, end, coords);
      f(begin, end);
    });
  });
  return coordinates;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_cpu(
    const at::Tensor& points, c10::ArrayRef<double> voxel_size, c10::ArrayRef<double> range_min,
    c10::IntArrayRef grid_size, int64_t max_points_per_voxel, int64_t max_voxels,
    bool empty_mean) {
  const PointQuantizer quantizer(check_voxelize_args(points, voxel_size, range_min, grid_size,
                                                     max_points_per_voxel, max_voxels));
  const at::Tensor input = points.contiguous();
  const float* data = input.data_ptr<float>();
  const int64_t n = input.size(0), columns = input.size(1), slots = max_points_per_voxel;
  Scratch& scratch = thread_scratch();
  const VoxelAssignment a = assign_voxels(data, n, columns, quantizer, max_voxels, &scratch);

  at::Tensor voxels = at::empty({a.num_voxels, slots, columns}, at::dtype(at::kFloat));
  at::Tensor counts = at::empty({a.num_voxels}, at::dtype(at::kInt));
  float* out = voxels.data_ptr<float>();
  int32_t* num = counts.data_ptr<int32_t>();
  const int64_t* ids = a.point_voxel_id.data_ptr<int64_t>();
  const int64_t row = slots * columns;
  // One memset beats a small one per voxel.
  if (!empty_mean && voxels.numel() > 0) std::memset(out, 0, voxels.numel() * sizeof(float));
  // Each (voxel, slot) is written by exactly one point, so the points can be split freely.
  for_range(a.parallel, n, kPointGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (ids[i] < 0 || a.rank[i] >= slots) continue;
      float* dst = out + ids[i] * row + a.rank[i] * columns;
      for (int64_t c = 0; c < columns; ++c) dst[c] = data[i * columns + c];
    }
  });
  // With empty_mean, free slots get the mean of the voxel's points (a voxel with a free slot
  // stores all its points), summed in double in slot order.
  at::Tensor coordinates = for_voxel_ranges(a, data, columns, quantizer, [&](int64_t begin,
                                                                             int64_t end) {
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
  return {voxels, coordinates, counts, a.point_voxel_id};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_mean_cpu(
    const at::Tensor& points, c10::ArrayRef<double> voxel_size, c10::ArrayRef<double> range_min,
    c10::IntArrayRef grid_size, int64_t max_voxels) {
  const PointQuantizer quantizer(check_voxelize_args(points, voxel_size, range_min, grid_size,
                                                     std::nullopt, max_voxels));
  const at::Tensor input = points.contiguous();
  const float* data = input.data_ptr<float>();
  const int64_t n = input.size(0), columns = input.size(1);
  Scratch& scratch = thread_scratch();
  const VoxelAssignment a = assign_voxels(data, n, columns, quantizer, max_voxels, &scratch);

  at::Tensor features = at::empty({a.num_voxels, columns}, at::dtype(at::kFloat));
  at::Tensor counts = at::empty({a.num_voxels}, at::dtype(at::kInt));
  float* out = features.data_ptr<float>();
  int32_t* num = counts.data_ptr<int32_t>();
  const int64_t* ids = a.point_voxel_id.data_ptr<int64_t>();
  // Sums in double, in input order. Each task owns a range of voxels and scans all points, so
  // every voxel is summed in the same order whatever the split.
  at::Tensor coordinates = for_voxel_ranges(a, data, columns, quantizer, [&](int64_t v0,
                                                                             int64_t v1) {
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
  return {features, coordinates, counts, a.point_voxel_id};
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CPU, m) {
  m.impl("voxelize", &voxelize_cpu);
  m.impl("voxelize_mean", &voxelize_mean_cpu);
}

}  // namespace spconv_lite
