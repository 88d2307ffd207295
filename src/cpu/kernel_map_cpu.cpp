// Kernel-map (indice) generation on the CPU.
//
// A kernel map is a pair of neighbour tables:
//   nbr   [N_out, K]: for output row o and kernel offset k, the input row feeding it, or -1;
//   nbr_t [N_in,  K]: for input row i and kernel offset k, the output row it feeds, or -1.
// Both are filled by hash-table lookups in parallel loops where each thread writes its own
// rows, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <sstream>
#include <tuple>
#include <vector>

#include "spconv_lite/checks.h"
#include "spconv_lite/coords.h"
#include "spconv_lite/hash_table.h"

namespace spconv_lite {
namespace {

constexpr int64_t kRowGrain = 2048;

std::string describe_row(const int32_t* row, int64_t width) {
  std::ostringstream out;
  out << "[";
  for (int64_t c = 0; c < width; ++c) out << (c ? ", " : "") << row[c];
  out << "]";
  return out.str();
}

// Packs every row of `indices` into a key, checking that it lies inside the grid.
std::vector<int64_t> pack_indices(const at::Tensor& indices, const Grid& grid,
                                  int64_t batch_size, c10::IntArrayRef spatial_shape) {
  const int64_t n = indices.size(0);
  const int64_t width = grid.ndim + 1;
  const int32_t* data = indices.data_ptr<int32_t>();
  std::vector<int64_t> keys(n);
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    int64_t coord[kMaxDims];
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* row = data + r * width;
      bool ok = row[0] >= 0 && row[0] < batch_size;
      for (int d = 0; d < grid.ndim; ++d) {
        coord[d] = row[d + 1];
        ok = ok && coord[d] >= 0 && coord[d] < grid.shape[d];
      }
      if (!ok) {
        int64_t seen = first_bad.load();
        while (r < seen && !first_bad.compare_exchange_weak(seen, r)) {
        }
        continue;
      }
      keys[r] = pack_key(row[0], coord, grid);
    }
  });
  const int64_t bad = first_bad.load();
  TORCH_CHECK_VALUE(bad == n, "indices row ", bad, " = ", describe_row(data + bad * width, width),
                    " is outside the grid: batch index must be in [0, ", batch_size,
                    ") and coordinates inside spatial_shape ", spatial_shape);
  return keys;
}

struct OwnedHashTable {
  at::Tensor keys;
  at::Tensor values;
  HashTableView view() {
    return {keys.data_ptr<int64_t>(), values.data_ptr<int32_t>(), keys.numel()};
  }
};

OwnedHashTable make_table(int64_t capacity) {
  return {at::full({capacity}, kEmptyKey, at::dtype(at::kLong)),
          at::empty({capacity}, at::dtype(at::kInt))};
}

// Builds the table key -> row for the input sites; duplicate sites are an error.
OwnedHashTable build_site_table(const std::vector<int64_t>& keys, const at::Tensor& indices) {
  const int64_t n = static_cast<int64_t>(keys.size());
  OwnedHashTable table = make_table(hash_capacity_for(n));
  HashTableView view = table.view();
  std::atomic<bool> full{false};
  std::atomic<bool> duplicate{false};
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    int64_t slot;
    for (int64_t r = begin; r < end; ++r) {
      const InsertResult result = view.insert(keys[r], static_cast<int32_t>(r), &slot);
      if (result == InsertResult::kFull) full = true;
      if (result == InsertResult::kExisting) duplicate = true;
    }
  });
  TORCH_CHECK(!full.load(), "spconv_lite: site hash table of capacity ", view.capacity,
              " is full after inserting ", n, " sites");
  if (duplicate.load()) {
    // Rare error path: find the first row whose site is owned by another row, for the message.
    const int64_t width = indices.size(1);
    const int32_t* data = indices.data_ptr<int32_t>();
    for (int64_t r = 0; r < n; ++r) {
      const int32_t owner = view.find(keys[r]);
      if (owner != r) {
        TORCH_CHECK_VALUE(false, "indices contains duplicate sites: rows ", std::min<int64_t>(r, owner),
                          " and ", std::max<int64_t>(r, owner), " are both ",
                          describe_row(data + r * width, width));
      }
    }
  }
  return table;
}

// Enumerates, in kernel-offset order, the key of the site that a row site reaches through each
// kernel offset, or -1. Per-dimension coordinates are computed once per row (sum of kernel sizes
// divisions instead of kernel volume times dimensions), then combined odometer-style.
class NeighborKeys {
 public:
  NeighborKeys(const Grid& row_grid, const ConvGeometry& geometry, bool direct,
               const Grid& target)
      : row_grid_(row_grid), geometry_(geometry), direct_(direct), target_(target) {
    batch_stride_ = key_strides(target, strides_);
    int64_t total = 0;
    for (int d = 0; d < geometry.ndim; ++d) {
      axis_begin_[d] = total;
      total += geometry.kernel[d];
    }
    contributions_.resize(total);
  }

  void compute(int64_t row_key, int64_t* keys_out) {
    int64_t base[kMaxDims];
    const int64_t batch = unpack_key(row_key, base, row_grid_);
    const int ndim = geometry_.ndim;
    for (int d = 0; d < ndim; ++d) {
      for (int64_t j = 0; j < geometry_.kernel[d]; ++j) {
        const int64_t c = axis_neighbor(base[d], j, d, geometry_, direct_, target_);
        contributions_[axis_begin_[d] + j] = c < 0 ? -1 : c * strides_[d];
      }
    }
    int64_t index[kMaxDims] = {0, 0, 0, 0};
    const int64_t batch_key = batch * batch_stride_;
    for (int64_t k = 0; k < geometry_.volume; ++k) {
      int64_t key = batch_key;
      bool inside = true;
      for (int d = 0; d < ndim; ++d) {
        const int64_t part = contributions_[axis_begin_[d] + index[d]];
        inside = inside && part >= 0;
        key += part;
      }
      keys_out[k] = inside ? key : -1;
      for (int d = ndim - 1; d >= 0; --d) {  // next offset in row-major order
        if (++index[d] < geometry_.kernel[d]) break;
        index[d] = 0;
      }
    }
  }

 private:
  Grid row_grid_;
  ConvGeometry geometry_;
  bool direct_;
  Grid target_;
  int64_t strides_[kMaxDims];
  int64_t batch_stride_;
  int64_t axis_begin_[kMaxDims];
  std::vector<int64_t> contributions_;
};

// Fills table[row, k] = target row reached from `row_keys[row]` through offset k, or -1.
at::Tensor neighbor_table(const std::vector<int64_t>& row_keys, const Grid& row_grid,
                          const ConvGeometry& geometry, bool direct, const Grid& target_grid,
                          HashTableView target) {
  const int64_t rows = static_cast<int64_t>(row_keys.size());
  const int64_t volume = geometry.volume;
  at::Tensor table = at::empty({rows, volume}, at::dtype(at::kInt));
  int32_t* out = table.data_ptr<int32_t>();
  at::parallel_for(0, rows, kRowGrain / volume + 1, [&](int64_t begin, int64_t end) {
    NeighborKeys neighbors(row_grid, geometry, direct, target_grid);
    std::vector<int64_t> keys(volume);
    for (int64_t r = begin; r < end; ++r) {
      neighbors.compute(row_keys[r], keys.data());
      int32_t* row_out = out + r * volume;
      for (int64_t k = 0; k < volume; ++k) row_out[k] = keys[k] < 0 ? -1 : target.find(keys[k]);
    }
  });
  return table;
}

// The transposed table: out[table[r, k], k] = r. Each (target row, k) is written by exactly one
// (r, k) (a site reaches one site per offset), so parallel writes never collide.
at::Tensor transpose_table(const at::Tensor& table, int64_t target_rows) {
  const int64_t rows = table.size(0), volume = table.size(1);
  at::Tensor out = at::full({target_rows, volume}, -1, at::dtype(at::kInt));
  const int32_t* src = table.data_ptr<int32_t>();
  int32_t* dst = out.data_ptr<int32_t>();
  at::parallel_for(0, rows, kRowGrain / volume + 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < volume; ++k) {
        const int64_t target = src[r * volume + k];
        if (target >= 0) dst[target * volume + k] = static_cast<int32_t>(r);
      }
    }
  });
  return out;
}

// Keys of every output site reached by an input site, sorted (= by batch, then coordinates).
// The distinct keys are collected in a hash set sized from an estimate that grows on overflow,
// so memory follows the number of output sites rather than the candidate count.
std::vector<int64_t> collect_output_keys(const std::vector<int64_t>& in_keys, const Grid& in_grid,
                                         const ConvGeometry& geometry, bool direct,
                                         const Grid& out_grid) {
  const int64_t n = static_cast<int64_t>(in_keys.size());
  const int64_t volume = geometry.volume;
  int64_t capacity = hash_capacity_for(2 * n);
  while (true) {
    OwnedHashTable set = make_table(capacity);
    HashTableView view = set.view();
    const int64_t max_count = capacity / 2;
    std::atomic<int64_t> count{0};
    std::atomic<bool> overflow{false};
    at::parallel_for(0, n, kRowGrain / volume + 1, [&](int64_t begin, int64_t end) {
      NeighborKeys neighbors(in_grid, geometry, direct, out_grid);
      std::vector<int64_t> keys(volume);
      int64_t slot;
      for (int64_t r = begin; r < end && !overflow.load(std::memory_order_relaxed); ++r) {
        neighbors.compute(in_keys[r], keys.data());
        for (int64_t k = 0; k < volume; ++k) {
          if (keys[k] < 0) continue;
          const InsertResult result = view.insert(keys[k], 0, &slot);
          if (result == InsertResult::kExisting) continue;
          if (result == InsertResult::kFull || count.fetch_add(1) + 1 > max_count) {
            overflow = true;
            break;
          }
        }
      }
    });
    if (!overflow.load()) {
      const int64_t* keys = view.keys;
      std::vector<int64_t> out;
      out.reserve(count.load());
      for (int64_t s = 0; s < capacity; ++s) {
        if (keys[s] != kEmptyKey) out.push_back(keys[s]);
      }
      std::sort(out.begin(), out.end());
      return out;
    }
    capacity *= 4;  // load factor exceeded 1/2: retry with a larger set
  }
}

at::Tensor keys_to_indices(const std::vector<int64_t>& keys, const Grid& grid) {
  const int64_t n = static_cast<int64_t>(keys.size());
  const int64_t width = grid.ndim + 1;
  at::Tensor indices = at::empty({n, width}, at::dtype(at::kInt));
  int32_t* data = indices.data_ptr<int32_t>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    int64_t coord[kMaxDims];
    for (int64_t r = begin; r < end; ++r) {
      data[r * width] = static_cast<int32_t>(unpack_key(keys[r], coord, grid));
      for (int d = 0; d < grid.ndim; ++d) data[r * width + d + 1] = static_cast<int32_t>(coord[d]);
    }
  });
  return indices;
}

std::tuple<at::Tensor, at::Tensor> build_subm_map_cpu(const at::Tensor& indices,
                                                      c10::IntArrayRef spatial_shape,
                                                      int64_t batch_size,
                                                      c10::IntArrayRef kernel_size,
                                                      c10::IntArrayRef dilation) {
  const Grid grid = make_grid(spatial_shape, batch_size, "spatial_shape");
  const ConvGeometry geometry = subm_geometry(indices, grid, kernel_size, dilation);
  const at::Tensor contiguous = indices.contiguous();
  const std::vector<int64_t> keys = pack_indices(contiguous, grid, batch_size, spatial_shape);
  OwnedHashTable table = build_site_table(keys, contiguous);
  HashTableView view = table.view();
  // A centred odd kernel is symmetric: o reaches i through offset k exactly when i reaches o
  // through offset K-1-k. So look up only the offsets before the centre, set the centre to the
  // site itself, and mirror the rest. Each mirrored (i, K-1-k) has exactly one writer.
  const int64_t rows = static_cast<int64_t>(keys.size()), volume = geometry.volume;
  const int64_t centre = volume / 2;
  at::Tensor nbr = at::empty({rows, volume}, at::dtype(at::kInt));
  int32_t* table_out = nbr.data_ptr<int32_t>();
  at::parallel_for(0, rows, kRowGrain / volume + 1, [&](int64_t begin, int64_t end) {
    NeighborKeys neighbors(grid, geometry, /*direct=*/true, grid);
    std::vector<int64_t> neighbor_keys(volume);
    for (int64_t r = begin; r < end; ++r) {
      neighbors.compute(keys[r], neighbor_keys.data());
      int32_t* row = table_out + r * volume;
      for (int64_t k = 0; k < centre; ++k) {
        row[k] = neighbor_keys[k] < 0 ? -1 : view.find(neighbor_keys[k]);
      }
      row[centre] = static_cast<int32_t>(r);
      std::fill(row + centre + 1, row + volume, -1);
    }
  });
  at::parallel_for(0, rows, kRowGrain / volume + 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < centre; ++k) {
        const int64_t i = table_out[r * volume + k];
        if (i >= 0) table_out[i * volume + volume - 1 - k] = static_cast<int32_t>(r);
      }
    }
  });
  // The transposed table is the same table with the offsets reversed.
  at::Tensor nbr_t = at::empty_like(nbr);
  const int32_t* src = table_out;
  int32_t* dst = nbr_t.data_ptr<int32_t>();
  at::parallel_for(0, rows, kRowGrain / volume + 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < volume; ++k) dst[r * volume + k] = src[r * volume + volume - 1 - k];
    }
  });
  return {nbr, nbr_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_conv_map_cpu(
    const at::Tensor& indices, c10::IntArrayRef spatial_shape, int64_t batch_size,
    c10::IntArrayRef out_spatial_shape, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, bool transposed) {
  const ConvMapArgs args = conv_map_args(indices, spatial_shape, batch_size, out_spatial_shape,
                                         kernel_size, stride, padding, dilation);
  const Grid& in_grid = args.in_grid;
  const Grid& out_grid = args.out_grid;
  const ConvGeometry& geometry = args.geometry;
  const at::Tensor contiguous = indices.contiguous();
  const std::vector<int64_t> in_keys = pack_indices(contiguous, in_grid, batch_size, spatial_shape);
  OwnedHashTable in_table = build_site_table(in_keys, contiguous);

  // Regular conv: output o reads input o*s - p + k*d (direct); an input reaches outputs by the
  // inverse. A transposed conv swaps the two directions.
  const bool input_to_output_direct = transposed;
  const std::vector<int64_t> out_keys =
      collect_output_keys(in_keys, in_grid, geometry, input_to_output_direct, out_grid);
  TORCH_CHECK_VALUE(static_cast<int64_t>(out_keys.size()) <= std::numeric_limits<int32_t>::max(),
                    "convolution would produce ", out_keys.size(),
                    " output sites; at most 2^31 - 1 are supported");
  OwnedHashTable out_table = make_table(hash_capacity_for(static_cast<int64_t>(out_keys.size())));
  HashTableView out_view = out_table.view();
  at::parallel_for(0, static_cast<int64_t>(out_keys.size()), kRowGrain,
                   [&](int64_t begin, int64_t end) {
                     int64_t slot;
                     for (int64_t r = begin; r < end; ++r) {
                       out_view.insert(out_keys[r], static_cast<int32_t>(r), &slot);
                     }
                   });
  // Only the few valid (input, offset) candidates need a lookup; nbr follows by transposition.
  at::Tensor nbr_t =
      neighbor_table(in_keys, in_grid, geometry, input_to_output_direct, out_grid, out_view);
  at::Tensor nbr = transpose_table(nbr_t, static_cast<int64_t>(out_keys.size()));
  return {keys_to_indices(out_keys, out_grid), nbr, nbr_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CPU, m) {
  m.impl("build_subm_map", &build_subm_map_cpu);
  m.impl("build_conv_map", &build_conv_map_cpu);
}

}  // namespace spconv_lite
