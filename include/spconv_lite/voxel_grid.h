// The voxel grid of the voxelize ops, shared by the CPU (src/cpu/voxelize_cpu.cpp) and CUDA
// (src/cuda/voxelize_cuda.cu) implementations: the argument checks, and the exact quantization
// of a point (C10_HOST_DEVICE).
//
// A point's voxel along axis d is floor((p[d] - low[d]) / size[d]) with a subtraction then a
// division (no FMA can fuse them) in the points' precision, as spconv: float32 for float32
// points, float64 for float64 points (whose coordinates may be too large for float32, e.g. in a
// UTM frame), with the float32 size and low either way. The point is dropped when any of its
// values is not finite or that voxel lies outside [0, cells[d]). Keys are row-major over
// (x, y, z).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "spconv_lite/checks.h"
#include "spconv_lite/coords.h"

namespace spconv_lite {

// Checked grid, in x, y, z (, w) order; passed by value into kernels. Axes past ndim hold
// size 1, low 0, limit 1, cells 1 and key stride 0, so a zero value there quantizes to
// coordinate 0.
struct VoxelGrid {
  int ndim;
  float size[kMaxDims];    // voxel size (float32)
  float low[kMaxDims];     // range_min (float32)
  float limit[kMaxDims];   // smallest float >= grid_size[d]: q is inside the grid iff q < limit
  int64_t cells[kMaxDims];   // grid_size[d] (1 past ndim), the same test for float64 points
  int64_t stride[kMaxDims];  // key stride (z fastest; 0 past ndim)
};

inline VoxelGrid make_voxel_grid(c10::ArrayRef<double> voxel_size,
                                 c10::ArrayRef<double> range_min, c10::IntArrayRef grid_size) {
  VoxelGrid g{};
  g.ndim = static_cast<int>(voxel_size.size());
  TORCH_CHECK_VALUE(g.ndim >= 1 && g.ndim <= kMaxDims, "voxel_size must have 1 to ", kMaxDims,
                    " entries, got ", voxel_size);
  TORCH_CHECK_VALUE(static_cast<int>(range_min.size()) == g.ndim &&
                        static_cast<int>(grid_size.size()) == g.ndim,
                    "voxel_size ", voxel_size, ", range_min ", range_min, " and grid_size ",
                    grid_size, " must have the same length");
  for (const int64_t cells : grid_size) {
    TORCH_CHECK_VALUE(cells >= 1, "grid_size must be positive, got ", grid_size);
  }
  // make_grid checks that keys of the volume fit (< 2^62).
  const std::vector<int64_t> shape_zyx(grid_size.rbegin(), grid_size.rend());
  make_grid(shape_zyx, 1, "grid_size (z, y, x)");
  int64_t stride = 1;
  for (int d = 0; d < kMaxDims; ++d) {
    const bool axis = d < g.ndim;
    const float size = axis ? static_cast<float>(voxel_size[d]) : 1.f;
    const float low = axis ? static_cast<float>(range_min[d]) : 0.f;
    TORCH_CHECK_VALUE(std::isfinite(size) && size > 0.f,
                      "voxel_size must be finite and positive in float32, got ", voxel_size);
    TORCH_CHECK_VALUE(std::isfinite(low), "range_min must be finite, got ", range_min);
    const int64_t cells = axis ? grid_size[d] : 1;
    TORCH_CHECK_VALUE(cells <= std::numeric_limits<int32_t>::max(), "grid_size ", grid_size,
                      " does not fit the int32 output coordinates");
    g.size[d] = size;
    g.low[d] = low;
    // floor(q) < cells <=> q < cells <=> q < the smallest float >= cells (exact for any size).
    float limit = static_cast<float>(cells);
    if (static_cast<double>(limit) < static_cast<double>(cells)) {
      limit = std::nextafter(limit, std::numeric_limits<float>::infinity());
    }
    g.limit[d] = limit;
    g.cells[d] = cells;
  }
  // Row-major key strides over (x, y, z): z fastest.
  for (int d = g.ndim - 1; d >= 0; --d) {
    g.stride[d] = stride;
    stride *= grid_size[d];
  }
  return g;
}

inline void check_points(const at::Tensor& points, int64_t ndim) {
  TORCH_CHECK_TYPE(points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble,
                   "points must be float32 or float64, got ", points.scalar_type());
  TORCH_CHECK_VALUE(points.dim() == 2 && points.size(1) >= ndim,
                    "points must be [N, C] with C >= ", ndim, " (coordinates first), got ",
                    points.sizes());
  TORCH_CHECK_VALUE(points.size(0) < std::numeric_limits<int32_t>::max(), "points has ",
                    points.size(0), " rows; at most 2^31 - 2 are supported");
}

// Every check of voxelize (max_points_per_voxel given) and voxelize_mean (nullopt), in the
// order both devices run them; returns the grid.
inline VoxelGrid check_voxelize_args(const at::Tensor& points, c10::ArrayRef<double> voxel_size,
                                     c10::ArrayRef<double> range_min,
                                     c10::IntArrayRef grid_size,
                                     std::optional<int64_t> max_points_per_voxel,
                                     int64_t max_voxels) {
  const VoxelGrid grid = make_voxel_grid(voxel_size, range_min, grid_size);
  check_points(points, grid.ndim);
  if (max_points_per_voxel.has_value()) {
    // Below 2^31, so that a slot number (voxel * max_points_per_voxel + rank) fits int64.
    TORCH_CHECK_VALUE(*max_points_per_voxel >= 1 &&
                          *max_points_per_voxel <= std::numeric_limits<int32_t>::max(),
                      "max_points_per_voxel must be in [1, 2^31 - 1], got ",
                      *max_points_per_voxel);
  }
  TORCH_CHECK_VALUE(max_voxels >= 0, "max_voxels must be >= 0, got ", max_voxels);
  return grid;
}

// Calls f with the points' data as const float* or const double* (the two types check_points
// accepts) and returns what it returns.
template <typename F>
auto with_point_data(const at::Tensor& points, const F& f) {
  if (points.scalar_type() == at::kDouble) return f(points.data_ptr<double>());
  return f(points.data_ptr<float>());
}

template <typename T>
C10_HOST_DEVICE inline bool is_finite(T x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// (p - low) / size rounded to the points' precision once per operation. On the device the
// intrinsics keep it so even under --use_fast_math (which would approximate the division).
C10_HOST_DEVICE inline float quantize_axis(float p, float low, float size) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(__fsub_rn(p, low), size);
#else
  return (p - low) / size;
#endif
}

C10_HOST_DEVICE inline double quantize_axis(double p, float low, float size) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(__dsub_rn(p, low), size);
#else
  return (p - static_cast<double>(low)) / static_cast<double>(size);
#endif
}

// Whether a quantized value q >= 0 lies in the grid along axis d: q < cells, tested against
// the smallest float32 >= cells for float32 q, against cells itself for float64 q.
C10_HOST_DEVICE inline bool below_cells(float q, const VoxelGrid& g, int d) {
  return q < g.limit[d];
}

C10_HOST_DEVICE inline bool below_cells(double q, const VoxelGrid& g, int d) {
  return q < static_cast<double>(g.cells[d]);
}

// Voxel coordinates (x, y, z, ... order; entries past ndim set to 0) of the point of `columns`
// values at p; false when the point is dropped. floor(q) is in [0, cells) exactly when q is,
// so q is tested, then truncated (equal to floor for q >= 0); NaN fails the test. T is float
// or double, the points' type. For float32 points the CPU op computes the same operations four
// lanes at a time (PointQuantizer in voxelize_cpu.cpp); the emulated CUDA tests check that both
// agree bitwise.
template <typename T>
C10_HOST_DEVICE inline bool quantize_point(const VoxelGrid& g, const T* p, int64_t columns,
                                           int32_t* coord) {
  bool keep = true;
  for (int64_t j = 0; j < columns; ++j) keep = keep && is_finite(p[j]);
  for (int d = 0; d < kMaxDims; ++d) {
    const T q = d < g.ndim ? quantize_axis(p[d], g.low[d], g.size[d]) : T(0);
    keep = keep && q >= T(0) && below_cells(q, g, d);
    coord[d] = keep ? static_cast<int32_t>(q) : 0;
  }
  return keep;
}

C10_HOST_DEVICE inline int64_t voxel_key(const VoxelGrid& g, const int32_t* coord) {
  int64_t key = 0;
  for (int d = 0; d < kMaxDims; ++d) key += coord[d] * g.stride[d];
  return key;
}

}  // namespace spconv_lite
