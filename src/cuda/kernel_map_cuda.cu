// Kernel-map (indice) generation on the GPU: the same tables as src/cpu/kernel_map_cpu.cpp,
//   nbr   [N_out, K]: for output row o and kernel offset k, the input row feeding it, or -1;
//   nbr_t [N_in,  K]: for input row i and kernel offset k, the output row it feeds, or -1,
// built with the shared open-addressing hash table (hash_table.h, insertion by atomicCAS) and
// the shared coordinate rules (coords.h), one thread per (site, kernel offset).
//
// Regular and transposed convs collect their output sites in a hash set, compact them and sort
// them by packed key, so the output rows come in the CPU op's order and the result does not
// depend on thread scheduling. Every table entry is a plain lookup: deterministic.
//
// Host synchronisations: one per op. build_subm_map reads the input-check status (indices
// outside the grid, duplicate sites) so that bad input raises like on the CPU, unless the caller
// vouches for the sites (check_sites=False: the layers pass it for a conv map's output sites);
// build_conv_map reads the same status together with the number of output sites, which sizes
// its outputs (and once more where the output sites outgrow the set sized for their expected
// number: inputs that lie far apart).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cub/device/device_radix_sort.cuh>
#include <limits>
#include <tuple>

#include "spconv_lite/checks.h"
#include "spconv_lite/coords.h"
#include "spconv_lite/cuda_utils.cuh"
#include "spconv_lite/hash_table.h"

namespace spconv_lite {
namespace {

using cuda::blocks_for;
using cuda::current_stream;
using cuda::kThreads;

// Status words written by the kernels and read by the host in the op's one synchronisation.
enum StatusSlot : int {
  kBadRow = 0,     // n - r for the first row r outside the batch and grid (0: none)
  kDuplicate = 1,  // 1 when a site appears twice
  kTableFull = 2,  // 1 when an insertion found no free slot (possible only in a set sized for
                   // the expected output count: see build_conv_map_cuda)
  kCount = 3,      // number of distinct output sites (build_conv_map)
  kCompacted = 4,  // write cursor of the compaction
  kOverflow = 5,   // 1 when the output sites outgrew a set sized from their expected count
  kStatusSize = 6,
};

__device__ __forceinline__ unsigned long long* as_ull(int64_t* p) {
  return reinterpret_cast<unsigned long long*>(p);
}

struct DeviceTable {
  at::Tensor keys;
  at::Tensor values;  // undefined for a key set
  HashTableView view() const {
    return {keys.data_ptr<int64_t>(), values.defined() ? values.data_ptr<int32_t>() : nullptr,
            keys.numel()};
  }
};

DeviceTable make_table(int64_t capacity, const at::TensorOptions& options, bool with_values) {
  DeviceTable table;
  table.keys = at::full({capacity}, kEmptyKey, options.dtype(at::kLong));
  if (with_values) table.values = at::empty({capacity}, options.dtype(at::kInt));
  return table;
}

// Batch index and coordinates of row r; false when the site lies outside the batch and grid.
__device__ __forceinline__ bool read_site(const int32_t* __restrict__ indices, int64_t r,
                                          const Grid& grid, int64_t batch_size, int64_t* batch,
                                          int64_t* coord) {
  const int32_t* row = indices + r * (grid.ndim + 1);
  *batch = row[0];
  bool inside = *batch >= 0 && *batch < batch_size;
  for (int d = 0; d < grid.ndim; ++d) {
    coord[d] = row[d + 1];
    inside = inside && coord[d] >= 0 && coord[d] < grid.shape[d];
  }
  return inside;
}

// Inserts key(site r) -> r for every input row and records bad rows, repeated sites and a
// full table in `status`.
__global__ void insert_sites_kernel(const int32_t* __restrict__ indices, int64_t n, Grid grid,
                                    int64_t batch_size, HashTableView table, int64_t* status) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < n;
       r += int64_t{gridDim.x} * blockDim.x) {
    int64_t batch;
    int64_t coord[kMaxDims];
    if (!read_site(indices, r, grid, batch_size, &batch, coord)) {
      atomicMax(as_ull(status + kBadRow), static_cast<unsigned long long>(n - r));
      continue;
    }
    int64_t slot;
    const InsertResult result =
        table.insert(pack_key(batch, coord, grid), static_cast<int32_t>(r), &slot);
    if (result == InsertResult::kExisting) status[kDuplicate] = 1;
    if (result == InsertResult::kFull) status[kTableFull] = 1;
  }
}

// out[r, k] = row of the target table reached from row site r (coordinates in `coords`)
// through offset k, or -1. `reversed`, when given, gets the same value at [r, K - 1 - k]: the
// transposed table of a centred (submanifold) kernel.
__global__ void neighbor_table_kernel(const int32_t* __restrict__ coords, int64_t rows,
                                      int ndim, ConvGeometry geometry, bool direct,
                                      Grid target_grid, HashTableView target,
                                      int32_t* __restrict__ out, int32_t* __restrict__ reversed) {
  const int64_t volume = geometry.volume;
  const int64_t total = rows * volume;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = e / volume;
    const int64_t k = e - r * volume;
    const int32_t* row = coords + r * (ndim + 1);
    int64_t base[kMaxDims];
    for (int d = 0; d < ndim; ++d) base[d] = row[d + 1];
    const int64_t key = neighbor_key(row[0], base, k, geometry, direct, target_grid);
    const int32_t value = key < 0 ? -1 : target.find(key);
    out[e] = value;
    if (reversed != nullptr) reversed[r * volume + (volume - 1 - k)] = value;
  }
}

// Inserts every output site reached by an input site (one thread per (input row, offset)) into
// the key set and counts the new ones. A block stops once the set holds more than `limit` keys
// (kOverflow): the host then collects again into a larger set. The loop's trip count is uniform
// over the block so that every thread reaches the block-wide reductions.
__global__ void collect_output_keys_kernel(const int32_t* __restrict__ indices, int64_t n,
                                           Grid in_grid, int64_t batch_size,
                                           ConvGeometry geometry, bool direct, Grid out_grid,
                                           HashTableView set, int64_t limit, int64_t* status) {
  const int64_t volume = geometry.volume;
  const int64_t total = n * volume;
  for (int64_t block_start = blockIdx.x * int64_t{blockDim.x}; block_start < total;
       block_start += int64_t{gridDim.x} * blockDim.x) {
    const bool full_enough = __syncthreads_or(
        threadIdx.x == 0 && *reinterpret_cast<const volatile int64_t*>(status + kCount) > limit);
    if (full_enough) {
      if (threadIdx.x == 0) status[kOverflow] = 1;
      return;
    }
    const int64_t e = block_start + threadIdx.x;
    int inserted = 0;
    if (e < total) {
      const int64_t r = e / volume;
      const int64_t k = e - r * volume;
      int64_t batch;
      int64_t coord[kMaxDims];
      // Rows outside the grid are reported by insert_sites_kernel.
      if (read_site(indices, r, in_grid, batch_size, &batch, coord)) {
        const int64_t key = neighbor_key(batch, coord, k, geometry, direct, out_grid);
        if (key >= 0) {
          int64_t slot;
          const InsertResult result = set.insert(key, 0, &slot);
          inserted = result == InsertResult::kInserted;
          if (result == InsertResult::kFull) status[kTableFull] = 1;
        }
      }
    }
    const int block_inserted = __syncthreads_count(inserted);
    if (threadIdx.x == 0 && block_inserted > 0) {
      atomicAdd(as_ull(status + kCount), static_cast<unsigned long long>(block_inserted));
    }
  }
}

// Copies the occupied slots of a key set to `out` (in no particular order: sorted afterwards),
// one atomicAdd per warp.
__global__ void compact_keys_kernel(const int64_t* __restrict__ set_keys, int64_t capacity,
                                    int64_t* __restrict__ out, int64_t* status) {
  const unsigned lane = threadIdx.x & 31u;
  for (int64_t block_start = blockIdx.x * int64_t{blockDim.x}; block_start < capacity;
       block_start += int64_t{gridDim.x} * blockDim.x) {
    const int64_t s = block_start + threadIdx.x;
    const int64_t key = s < capacity ? set_keys[s] : kEmptyKey;
    const bool keep = key != kEmptyKey;
    const unsigned mask = __ballot_sync(0xffffffffu, keep);
    if (mask == 0) continue;  // the whole warp
    unsigned long long first = 0;
    if (lane == 0) first = atomicAdd(as_ull(status + kCompacted), __popc(mask));
    first = __shfl_sync(0xffffffffu, first, 0);
    if (keep) out[first + __popc(mask & ((1u << lane) - 1u))] = key;
  }
}

__global__ void keys_to_indices_kernel(const int64_t* __restrict__ keys, int64_t n, Grid grid,
                                       int32_t* __restrict__ out) {
  const int width = grid.ndim + 1;
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < n;
       r += int64_t{gridDim.x} * blockDim.x) {
    int64_t coord[kMaxDims];
    out[r * width] = static_cast<int32_t>(unpack_key(keys[r], coord, grid));
    for (int d = 0; d < grid.ndim; ++d) out[r * width + d + 1] = static_cast<int32_t>(coord[d]);
  }
}

// Inserts keys[r] -> r for distinct keys into a table of capacity >= 2n, which cannot fill.
__global__ void insert_keys_kernel(const int64_t* __restrict__ keys, int64_t n,
                                   HashTableView table) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < n;
       r += int64_t{gridDim.x} * blockDim.x) {
    int64_t slot;
    table.insert(keys[r], static_cast<int32_t>(r), &slot);
  }
}

// ------------------------------------------------------------------------------------- host

// The op's one host synchronisation: copies the status words to the host.
std::array<int64_t, kStatusSize> read_status(const at::Tensor& status) {
  const at::Tensor host = status.cpu();  // waits for the kernels queued so far
  std::array<int64_t, kStatusSize> words{};
  for (int j = 0; j < kStatusSize; ++j) words[j] = host.data_ptr<int64_t>()[j];
  return words;
}

// On bad indices, re-runs the CPU op on a host copy: it raises the CPU's exact error (first row
// outside the grid, or the first repeated site with both rows). Error path only.
template <typename RunOnCpu>
void raise_on_bad_status(const std::array<int64_t, kStatusSize>& status, RunOnCpu run_on_cpu) {
  if (status[kBadRow] != 0 || status[kDuplicate] != 0) {
    run_on_cpu();
    TORCH_CHECK(false, "spconv_lite: the GPU found indices outside the grid or duplicate sites "
                       "but the CPU check did not (internal error)");
  }
  TORCH_CHECK(status[kTableFull] == 0,
              "spconv_lite: GPU hash table full, which its sizing rules out (internal error)");
}

// The number of output sites a conv over n input sites is expected to have, which sizes the
// first output-site set. LiDAR sites lie on surfaces, so a regular conv's outputs number about
// the inputs times the fanout over the stride volume (k3 s2 on KITTI and spconv's cloud:
// 0.8-1.2 x the inputs, the bound 8 x): twice that, at least twice the inputs. A transposed conv
// spreads every input over its whole fanout: the bound.
int64_t expected_output_sites(int64_t n, const ConvGeometry& geometry, bool direct) {
  const int64_t fanout = kernel_fanout(geometry, direct);
  if (direct) return n * fanout;
  int64_t stride_volume = 1;
  for (int d = 0; d < geometry.ndim; ++d) stride_volume *= inverse_period(geometry, d);
  return 2 * n * std::max<int64_t>(1, fanout / stride_volume);
}

// keys (distinct, in [0, key_bound)) sorted by a radix sort of only the bits below key_bound
// (variant mapsort=radix): 28 bits instead of 64 for the 8x benchmark cloud's grid.
at::Tensor sort_keys_radix(const at::Tensor& keys, int64_t key_bound) {
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < key_bound) ++bits;
  at::Tensor sorted = at::empty_like(keys);
  const auto* in = reinterpret_cast<const unsigned long long*>(keys.data_ptr<int64_t>());
  auto* out = reinterpret_cast<unsigned long long*>(sorted.data_ptr<int64_t>());
  const int count = static_cast<int>(keys.numel());  // output sites, <= 2^31 - 1
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, temp_bytes, in, out, count, 0, bits,
                                                current_stream()));
  const at::Tensor temp =
      at::empty({static_cast<int64_t>(temp_bytes)}, keys.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(temp.data_ptr(), temp_bytes, in, out, count, 0,
                                                bits, current_stream()));
  return sorted;
}

void launch_neighbor_table(const at::Tensor& coords, int ndim, const ConvGeometry& geometry,
                           bool direct, const Grid& target_grid, const DeviceTable& target,
                           at::Tensor& out, at::Tensor* reversed) {
  const int64_t rows = coords.size(0);
  if (rows == 0) return;
  neighbor_table_kernel<<<blocks_for(rows * geometry.volume), kThreads, 0, current_stream()>>>(
      coords.data_ptr<int32_t>(), rows, ndim, geometry, direct, target_grid, target.view(),
      out.data_ptr<int32_t>(), reversed ? reversed->data_ptr<int32_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

DeviceTable insert_sites(const at::Tensor& indices, const Grid& grid, int64_t batch_size,
                         at::Tensor& status) {
  const int64_t n = indices.size(0);
  DeviceTable table = make_table(hash_capacity_for(n), indices.options(), true);
  insert_sites_kernel<<<blocks_for(n), kThreads, 0, current_stream()>>>(
      indices.data_ptr<int32_t>(), n, grid, batch_size, table.view(),
      status.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return table;
}

std::tuple<at::Tensor, at::Tensor> build_subm_map_cuda(const at::Tensor& indices,
                                                       c10::IntArrayRef spatial_shape,
                                                       int64_t batch_size,
                                                       c10::IntArrayRef kernel_size,
                                                       c10::IntArrayRef dilation,
                                                       bool check_sites) {
  const Grid grid = make_grid(spatial_shape, batch_size, "spatial_shape");
  const ConvGeometry geometry = subm_geometry(indices, grid, kernel_size, dilation);
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = indices.contiguous();
  const int64_t n = idx.size(0);
  const auto options = idx.options();
  at::Tensor nbr = at::empty({n, geometry.volume}, options);
  at::Tensor nbr_t = at::empty({n, geometry.volume}, options);
  if (n == 0) return {nbr, nbr_t};

  at::Tensor status = at::zeros({kStatusSize}, options.dtype(at::kLong));
  const DeviceTable table = insert_sites(idx, grid, batch_size, status);
  // A centred odd kernel is symmetric: output o reaches input i through offset k exactly when
  // input i reaches output o through offset K-1-k, so nbr_t is nbr with its columns reversed.
  launch_neighbor_table(idx, grid.ndim, geometry, /*direct=*/true, grid, table, nbr, &nbr_t);
  // Sites the caller vouches for (a conv map's outputs) need no check: no host sync then.
  if (!check_sites) return {nbr, nbr_t};
  // Host sync: bad indices must raise (the tables above are memory-safe garbage then).
  raise_on_bad_status(read_status(status), [&] {
    static const auto cpu_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("spconv_lite::build_subm_map", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::IntArrayRef,
                                                      int64_t, c10::IntArrayRef,
                                                      c10::IntArrayRef, bool)>();
    cpu_op.call(idx.cpu(), spatial_shape, batch_size, kernel_size, dilation, true);
  });
  return {nbr, nbr_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_conv_map_cuda(
    const at::Tensor& indices, c10::IntArrayRef spatial_shape, int64_t batch_size,
    c10::IntArrayRef out_spatial_shape, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool transposed) {
  const ConvMapArgs args = conv_map_args(indices, spatial_shape, batch_size, out_spatial_shape,
                                         kernel_size, stride, padding, dilation, transposed);
  const Grid& in_grid = args.in_grid;
  const Grid& out_grid = args.out_grid;
  const ConvGeometry& geometry = args.geometry;
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = indices.contiguous();
  const int64_t n = idx.size(0);
  const int width = in_grid.ndim + 1;
  const auto options = idx.options();
  if (n == 0) {
    return {at::empty({0, width}, options), at::empty({0, geometry.volume}, options),
            at::empty({0, geometry.volume}, options)};
  }
  const cudaStream_t stream = current_stream();
  const cuda::Variants variants = cuda::variants_from_env();
  at::Tensor status = at::zeros({kStatusSize}, options.dtype(at::kLong));
  const DeviceTable in_table = insert_sites(idx, in_grid, batch_size, status);

  // Regular conv: output o reads input o*s - p + k*d (direct); an input reaches outputs by the
  // inverse. A transposed conv swaps the two directions.
  const bool input_to_output_direct = transposed;
  // The output-site set has load factor <= 1/2 when sized for `keys` sites: first for the
  // expected count, then, only if the sites outgrow it, for an upper bound on their number.
  int64_t out_volume = batch_size;
  for (int d = 0; d < out_grid.ndim; ++d) out_volume *= out_grid.shape[d];  // <= 2^62
  const int64_t bound =
      std::min(n * kernel_fanout(geometry, input_to_output_direct), out_volume);
  // At least twice the threads the device runs at once: the blocks past their check of the count
  // (collect_output_keys_kernel) then add at most half the limit again and cannot fill the set.
  const int64_t expected = std::min(
      bound, std::max(expected_output_sites(n, geometry, input_to_output_direct),
                      2 * cuda::resident_threads(idx.get_device())));
  const auto collect = [&](int64_t keys) {
    const DeviceTable set = make_table(hash_capacity_for(keys), options, false);
    collect_output_keys_kernel<<<blocks_for(n * geometry.volume), kThreads, 0, stream>>>(
        idx.data_ptr<int32_t>(), n, in_grid, batch_size, geometry, input_to_output_direct,
        out_grid, set.view(), set.keys.numel() / 2, status.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return set;
  };
  DeviceTable set = collect(expected);
  // Host sync: the input-check status, and the number of output sites that sizes the outputs.
  std::array<int64_t, kStatusSize> words = read_status(status);
  if ((words[kOverflow] != 0 || words[kTableFull] != 0) && expected < bound) {
    // More output sites than expected (isolated input sites): one more pass and sync.
    status.slice(0, kTableFull).zero_();  // keeps the input check's words
    set = DeviceTable{};                  // frees the first set before the second is made
    set = collect(bound);
    words = read_status(status);
  }
  raise_on_bad_status(words, [&] {
    static const auto cpu_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("spconv_lite::build_conv_map", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, c10::IntArrayRef, int64_t, c10::IntArrayRef,
                c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool)>();
    cpu_op.call(idx.cpu(), spatial_shape, batch_size, out_spatial_shape, kernel_size, stride,
                padding, dilation, transposed);
  });
  const int64_t m = words[kCount];
  TORCH_CHECK_VALUE(m <= std::numeric_limits<int32_t>::max(), "convolution would produce ", m,
                    " output sites; at most 2^31 - 1 are supported");

  // Output sites sorted by packed key = by batch, then coordinates (the CPU op's order).
  at::Tensor out_keys = at::empty({m}, options.dtype(at::kLong));
  if (m > 0) {
    compact_keys_kernel<<<blocks_for(set.keys.numel()), kThreads, 0, stream>>>(
        set.keys.data_ptr<int64_t>(), set.keys.numel(), out_keys.data_ptr<int64_t>(),
        status.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out_keys = variants.radix_map_sort ? sort_keys_radix(out_keys, out_volume)
                                       : std::get<0>(at::sort(out_keys, /*dim=*/0,
                                                              /*descending=*/false));
  }
  at::Tensor out_indices = at::empty({m, width}, options);
  at::Tensor nbr = at::empty({m, geometry.volume}, options);
  at::Tensor nbr_t = at::empty({n, geometry.volume}, options);
  DeviceTable out_table = make_table(hash_capacity_for(m), options, true);
  if (m > 0) {
    keys_to_indices_kernel<<<blocks_for(m), kThreads, 0, stream>>>(
        out_keys.data_ptr<int64_t>(), m, out_grid, out_indices.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    insert_keys_kernel<<<blocks_for(m), kThreads, 0, stream>>>(out_keys.data_ptr<int64_t>(), m,
                                                               out_table.view());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_neighbor_table(out_indices, in_grid.ndim, geometry, !input_to_output_direct, in_grid,
                        in_table, nbr, nullptr);
  launch_neighbor_table(idx, in_grid.ndim, geometry, input_to_output_direct, out_grid, out_table,
                        nbr_t, nullptr);
  return {out_indices, nbr, nbr_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CUDA, m) {
  m.impl("build_subm_map", &build_subm_map_cuda);
  m.impl("build_conv_map", &build_conv_map_cuda);
}

}  // namespace spconv_lite
