// Voxelization (points -> voxels) on the GPU: bitwise the outputs of the CPU op
// (src/cpu/voxelize_cpu.cpp, whose header gives the semantics), with the same checked grid and
// quantization in the points' precision, float32 or float64 (include/spconv_lite/voxel_grid.h).
// The kernels that read points take their type T; the outputs are float32 either way.
//
// Deterministic by construction, no atomics:
//   1. quantize: one thread per point writes its voxel key, or -1 when the point is dropped;
//   2. a stable sort of the keys gives runs of equal keys, one per voxel, whose points stay in
//      input order: a run's first element is the voxel's first point, and a point's position
//      in its run is its rank among the voxel's points;
//   3. voxel numbers in order of first points: flag each run's first point in input order and
//      take a prefix sum of the flags (no second sort needed); run starts are spread over the
//      run with a prefix max;
//   4. one host synchronisation reads the number of voxels, which sizes the outputs;
//   5. each point gets its voxel number (or -1 past max_voxels), each voxel its run;
//   6. one thread per (voxel, column) copies the stored points / sums in double in input order,
//      as the CPU does, and writes the coordinates (re-quantized from the first point).
// A voxel holding many points is summed by C threads serially: slow only for degenerate grids.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cummax.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "spconv_lite/coords.h"
#include "spconv_lite/cuda_utils.cuh"
#include "spconv_lite/voxel_grid.h"

namespace spconv_lite {
namespace {

using cuda::blocks_for;
using cuda::current_stream;
using cuda::kThreads;

constexpr int64_t kDropped = -1;  // key of a dropped point (sorts before every voxel key)

template <typename T>
__global__ void quantize_kernel(const T* __restrict__ points, int64_t n, int64_t columns,
                                VoxelGrid grid, int64_t* __restrict__ keys) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    int32_t coord[kMaxDims];
    keys[i] = quantize_point(grid, points + i * columns, columns, coord) ? voxel_key(grid, coord)
                                                                          : kDropped;
  }
}

// Over the sorted keys: run_start[j] = j where a voxel's run starts (else -1), and its first
// point, order[j], is flagged in input order.
__global__ void mark_runs_kernel(const int64_t* __restrict__ sorted,
                                 const int64_t* __restrict__ order, int64_t n,
                                 int64_t* __restrict__ run_start, int64_t* __restrict__ first) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < n;
       j += int64_t{gridDim.x} * blockDim.x) {
    const int64_t key = sorted[j];
    const bool starts = key != kDropped && (j == 0 || sorted[j - 1] != key);
    run_start[j] = starts ? j : -1;
    if (starts) first[order[j]] = 1;
  }
}

// For sorted position j of a kept point: its run starts at run_start[j] (a prefix max), and
// the voxel's number is the count of first points up to and including the run's first point,
// minus one. Voxels numbered max_voxels or more are dropped (their points keep the id -1).
// Each voxel's run start and length are written by its first and last position.
__global__ void assign_kernel(const int64_t* __restrict__ sorted,
                              const int64_t* __restrict__ order,
                              const int64_t* __restrict__ run_start,
                              const int64_t* __restrict__ firsts_up_to, int64_t n,
                              int64_t max_voxels, int64_t* __restrict__ point_voxel_id,
                              int64_t* __restrict__ voxel_start,
                              int32_t* __restrict__ voxel_count) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < n;
       j += int64_t{gridDim.x} * blockDim.x) {
    const int64_t key = sorted[j];
    if (key == kDropped) continue;
    const int64_t start = run_start[j];
    const int64_t v = firsts_up_to[order[start]] - 1;
    if (v >= max_voxels) continue;
    point_voxel_id[order[j]] = v;
    if (j == start) voxel_start[v] = start;
    if (j + 1 == n || sorted[j + 1] != key) voxel_count[v] = static_cast<int32_t>(j + 1 - start);
  }
}

// Coordinates (z, y, x: the lanes reversed) of the voxel of the point at p.
template <typename T>
__device__ __forceinline__ void write_coordinates(const VoxelGrid& grid, const T* p,
                                                  int64_t columns, int32_t* out) {
  int32_t coord[kMaxDims];
  quantize_point(grid, p, columns, coord);
  for (int d = 0; d < grid.ndim; ++d) out[d] = coord[grid.ndim - 1 - d];
}

// voxelize: thread (v, c) fills column c of voxel v's slots: the first min(count, slots) of its
// points (members, in input order), then zeros or, with empty_mean, their mean summed in
// double in slot order (as the CPU op). Column 0's thread also writes coordinates and count.
template <typename T>
__global__ void fill_voxels_kernel(const T* __restrict__ points,
                                   const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ voxel_start,
                                   const int32_t* __restrict__ voxel_count, int64_t m,
                                   int64_t columns, int64_t slots, bool empty_mean,
                                   VoxelGrid grid, float* __restrict__ voxels,
                                   int32_t* __restrict__ coords, int32_t* __restrict__ num) {
  const int64_t total = m * columns;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t v = e / columns;
    const int64_t c = e - v * columns;
    const int64_t* members = order + voxel_start[v];
    const int64_t stored = voxel_count[v] < slots ? voxel_count[v] : slots;
    float* voxel = voxels + v * slots * columns;
    double sum = 0.0;
    for (int64_t s = 0; s < stored; ++s) {
      const float value = static_cast<float>(points[members[s] * columns + c]);
      voxel[s * columns + c] = value;
      sum += value;
    }
    const float fill = empty_mean ? static_cast<float>(sum / static_cast<double>(stored)) : 0.f;
    for (int64_t s = stored; s < slots; ++s) voxel[s * columns + c] = fill;
    if (c == 0) {
      num[v] = static_cast<int32_t>(stored);
      write_coordinates(grid, points + members[0] * columns, columns, coords + v * grid.ndim);
    }
  }
}

// voxelize_mean: thread (v, c) writes the mean of column c over all of voxel v's points,
// summed in double in input order (as the CPU op); column 0's thread the coordinates.
template <typename T>
__global__ void mean_voxels_kernel(const T* __restrict__ points,
                                   const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ voxel_start,
                                   const int32_t* __restrict__ voxel_count, int64_t m,
                                   int64_t columns, VoxelGrid grid, float* __restrict__ features,
                                   int32_t* __restrict__ coords) {
  const int64_t total = m * columns;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t v = e / columns;
    const int64_t c = e - v * columns;
    const int64_t* members = order + voxel_start[v];
    const int64_t count = voxel_count[v];
    double sum = 0.0;
    for (int64_t s = 0; s < count; ++s) sum += points[members[s] * columns + c];
    features[e] = static_cast<float>(sum / static_cast<double>(count));
    if (c == 0) {
      write_coordinates(grid, points + members[0] * columns, columns, coords + v * grid.ndim);
    }
  }
}

// ------------------------------------------------------------------------------------- host

// Which voxel every point falls in (steps 1-5 of the header).
struct VoxelAssignment {
  at::Tensor point_voxel_id;  // int64 [N], voxel number or -1
  at::Tensor order;           // int64 [N], point indices sorted by voxel key, stably
  at::Tensor voxel_start;     // int64 [M], where each voxel's points start in `order`
  at::Tensor voxel_count;     // int32 [M], number of points of each voxel
  int64_t num_voxels = 0;     // M
};

VoxelAssignment assign_voxels(const at::Tensor& points, const VoxelGrid& grid,
                              int64_t max_voxels) {
  const int64_t n = points.size(0), columns = points.size(1);
  const auto long_options = points.options().dtype(at::kLong);
  const cudaStream_t stream = current_stream();
  VoxelAssignment a;
  a.point_voxel_id = at::full({n}, -1, long_options);
  if (n == 0) {
    a.order = at::empty({0}, long_options);
    a.voxel_start = at::empty({0}, long_options);
    a.voxel_count = at::empty({0}, points.options().dtype(at::kInt));
    return a;
  }
  at::Tensor keys = at::empty({n}, long_options);
  with_point_data(points, [&](const auto* data) {
    using T = std::decay_t<decltype(*data)>;
    quantize_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(data, n, columns, grid,
                                                            keys.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Stable: within a voxel's run the points stay in input order.
  auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  a.order = order;
  at::Tensor run_start = at::empty({n}, long_options);
  at::Tensor first = at::zeros({n}, long_options);
  mark_runs_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(), n, run_start.data_ptr<int64_t>(),
      first.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  run_start = std::get<0>(at::cummax(run_start, 0));
  const at::Tensor firsts_up_to = at::cumsum(first, 0);
  // Host sync: the number of distinct voxels sizes every output.
  const int64_t distinct = firsts_up_to[n - 1].item<int64_t>();
  a.num_voxels = std::min(distinct, max_voxels);
  a.voxel_start = at::empty({a.num_voxels}, long_options);
  a.voxel_count = at::empty({a.num_voxels}, points.options().dtype(at::kInt));
  assign_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(), run_start.data_ptr<int64_t>(),
      firsts_up_to.data_ptr<int64_t>(), n, max_voxels, a.point_voxel_id.data_ptr<int64_t>(),
      a.voxel_start.data_ptr<int64_t>(), a.voxel_count.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_cuda(
    const at::Tensor& points, c10::ArrayRef<double> voxel_size, c10::ArrayRef<double> range_min,
    c10::IntArrayRef grid_size, int64_t max_points_per_voxel, int64_t max_voxels,
    bool empty_mean) {
  const VoxelGrid grid = check_voxelize_args(points, voxel_size, range_min, grid_size,
                                             max_points_per_voxel, max_voxels);
  const c10::cuda::CUDAGuard guard(points.device());
  const at::Tensor input = points.contiguous();
  const int64_t columns = input.size(1), slots = max_points_per_voxel;
  const VoxelAssignment a = assign_voxels(input, grid, max_voxels);
  const int64_t m = a.num_voxels;
  at::Tensor voxels = at::empty({m, slots, columns}, input.options().dtype(at::kFloat));
  at::Tensor coordinates = at::empty({m, grid.ndim}, input.options().dtype(at::kInt));
  at::Tensor counts = at::empty({m}, input.options().dtype(at::kInt));
  if (m > 0) {
    with_point_data(input, [&](const auto* data) {
      using T = std::decay_t<decltype(*data)>;
      fill_voxels_kernel<T><<<blocks_for(m * columns), kThreads, 0, current_stream()>>>(
          data, a.order.data_ptr<int64_t>(), a.voxel_start.data_ptr<int64_t>(),
          a.voxel_count.data_ptr<int32_t>(), m, columns, slots, empty_mean, grid,
          voxels.data_ptr<float>(), coordinates.data_ptr<int32_t>(), counts.data_ptr<int32_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {voxels, coordinates, counts, a.point_voxel_id};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize_mean_cuda(
    const at::Tensor& points, c10::ArrayRef<double> voxel_size, c10::ArrayRef<double> range_min,
    c10::IntArrayRef grid_size, int64_t max_voxels) {
  const VoxelGrid grid = check_voxelize_args(points, voxel_size, range_min, grid_size,
                                             std::nullopt, max_voxels);
  const c10::cuda::CUDAGuard guard(points.device());
  const at::Tensor input = points.contiguous();
  const int64_t columns = input.size(1);
  const VoxelAssignment a = assign_voxels(input, grid, max_voxels);
  const int64_t m = a.num_voxels;
  at::Tensor features = at::empty({m, columns}, input.options().dtype(at::kFloat));
  at::Tensor coordinates = at::empty({m, grid.ndim}, input.options().dtype(at::kInt));
  if (m > 0) {
    with_point_data(input, [&](const auto* data) {
      using T = std::decay_t<decltype(*data)>;
      mean_voxels_kernel<T><<<blocks_for(m * columns), kThreads, 0, current_stream()>>>(
          data, a.order.data_ptr<int64_t>(), a.voxel_start.data_ptr<int64_t>(),
          a.voxel_count.data_ptr<int32_t>(), m, columns, grid, features.data_ptr<float>(),
          coordinates.data_ptr<int32_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {features, coordinates, a.voxel_count, a.point_voxel_id};
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CUDA, m) {
  m.impl("voxelize", &voxelize_cuda);
  m.impl("voxelize_mean", &voxelize_mean_cuda);
}

}  // namespace spconv_lite
