// Kernel-map (indice) generation on the CPU.
//
// A kernel map is a pair of neighbour tables:
//   nbr   [N_out, K]: for output row o and kernel offset k, the input row feeding it, or -1;
//   nbr_t [N_in,  K]: for input row i and kernel offset k, the output row it feeds, or -1.
// Built from sorted site keys rather than with the hash table that the CUDA builder uses: on the
// CPU a sort plus sequential scans is several times faster than random hash probes (a KITTI
// frame's subm map: 4 ms instead of 14). Submanifold maps are merge joins of the sorted keys
// with themselves shifted by each offset; regular conv maps sort the (input, offset) -> output
// reaches by output key. Every parallel loop writes entries that only it owns, and the sorts
// are stable, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <sstream>
#include <tuple>
#include <vector>

#include "huge_pages.h"
#include "spconv_lite/checks.h"
#include "spconv_lite/coords.h"

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

[[noreturn]] void duplicate_sites_error(int64_t first, int64_t second, const at::Tensor& indices) {
  const int64_t width = indices.size(1);
  TORCH_CHECK_VALUE(false, "indices contains duplicate sites: rows ", first, " and ", second,
                    " are both ",
                    describe_row(indices.data_ptr<int32_t>() + second * width, width),
                    "; merge each site's rows first (torch.unique(indices, dim=0, "
                    "return_inverse=True), then scatter_reduce of the features)");
  __builtin_unreachable();
}

// Enumerates the sites that a site reaches through the kernel offsets, in kernel-offset order:
// per axis, only the kernel indices landing on a site of the target grid are listed (one or
// two of three for a stride-2 kernel), and only their combinations are visited, so a strided
// conv costs its few valid offsets rather than the kernel volume.
class SiteReach {
 public:
  SiteReach(const ConvGeometry& geometry, bool direct, const Grid& target)
      : geometry_(geometry), direct_(direct), target_(target) {
    batch_stride_ = key_strides(target, key_stride_);
    int64_t offset_stride = 1;
    for (int d = geometry.ndim - 1; d >= 0; --d) {
      offset_stride_[d] = offset_stride;
      offset_stride *= geometry.kernel[d];
    }
    int64_t total = 0;
    for (int d = 0; d < geometry.ndim; ++d) {
      axis_begin_[d] = total;
      total += geometry.kernel[d];
    }
    offset_part_.resize(total);
    key_part_.resize(total);
  }

  // Calls f(k, key) for each kernel offset k (ascending) through which the site (batch,
  // coord) reaches a site of the target grid, whose key is `key`.
  template <typename F>
  void for_each(int64_t batch, const int32_t* coord, const F& f) {
    const int ndim = geometry_.ndim;
    int64_t count[kMaxDims];
    for (int d = 0; d < ndim; ++d) {
      count[d] = 0;
      for (int64_t j = 0; j < geometry_.kernel[d]; ++j) {
        const int64_t c = axis_neighbor(coord[d], j, d, geometry_, direct_, target_);
        if (c < 0) continue;
        offset_part_[axis_begin_[d] + count[d]] = j * offset_stride_[d];
        key_part_[axis_begin_[d] + count[d]] = c * key_stride_[d];
        ++count[d];
      }
      if (count[d] == 0) return;
    }
    int64_t index[kMaxDims] = {0, 0, 0, 0};
    const int64_t batch_key = batch * batch_stride_;
    while (true) {
      int64_t k = 0, key = batch_key;
      for (int d = 0; d < ndim; ++d) {
        k += offset_part_[axis_begin_[d] + index[d]];
        key += key_part_[axis_begin_[d] + index[d]];
      }
      f(k, key);
      int d = ndim - 1;  // next combination, last axis fastest
      for (; d >= 0; --d) {
        if (++index[d] < count[d]) break;
        index[d] = 0;
      }
      if (d < 0) return;
    }
  }

 private:
  ConvGeometry geometry_;
  bool direct_;
  Grid target_;
  int64_t key_stride_[kMaxDims];
  int64_t offset_stride_[kMaxDims];
  int64_t batch_stride_;
  int64_t axis_begin_[kMaxDims];
  std::vector<int64_t> offset_part_;  // per axis: kernel-offset contribution of each valid index
  std::vector<int64_t> key_part_;     // per axis: key contribution of the site it reaches
};

// One entry of a regular conv map: input `row` reaches the output site `key` through kernel
// offset `offset`.
struct Reach {
  int64_t key;
  int32_t row;
  int32_t offset;
};

// Stable LSD radix sort of items by their `key` member, for keys in [0, 2^key_bits).
template <typename T>
void radix_sort_by_key(std::vector<T>* items, int key_bits) {
  const int64_t n = static_cast<int64_t>(items->size());
  if (n < 2 || key_bits <= 0) return;
  const int passes = (key_bits + 10) / 11;  // digits of at most 11 bits (2048 buckets)
  const int digit_bits = (key_bits + passes - 1) / passes;
  const uint64_t digit_mask = (uint64_t{1} << digit_bits) - 1;
  std::vector<T> buffer(n);
  std::vector<int64_t> start(digit_mask + 1);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * digit_bits;
    std::fill(start.begin(), start.end(), 0);
    for (const T& item : *items) ++start[(static_cast<uint64_t>(item.key) >> shift) & digit_mask];
    if (*std::max_element(start.begin(), start.end()) == n) continue;  // one digit: no-op pass
    int64_t total = 0;
    for (int64_t& count : start) {
      const int64_t here = count;
      count = total;
      total += here;
    }
    for (const T& item : *items) {
      buffer[start[(static_cast<uint64_t>(item.key) >> shift) & digit_mask]++] = item;
    }
    items->swap(buffer);
  }
}

// Number of bits of the largest key of `grid` with batch_size batches.
int key_bits(const Grid& grid, int64_t batch_size) {
  int64_t strides[kMaxDims];
  const uint64_t largest = static_cast<uint64_t>(key_strides(grid, strides) * batch_size - 1);
  return largest == 0 ? 0 : 64 - __builtin_clzll(largest);
}

// The sites sorted by key (as Reach entries: row = the site's row, offset 0), raising when two
// rows of `indices` are the same site. Keys already ascending (the output of a conv) need no
// sort.
std::vector<Reach> sorted_unique_sites(const std::vector<int64_t>& keys,
                                       const at::Tensor& indices, int bits) {
  std::vector<Reach> sorted(keys.size());
  for (size_t r = 0; r < keys.size(); ++r) sorted[r] = {keys[r], static_cast<int32_t>(r), 0};
  if (std::adjacent_find(keys.begin(), keys.end(), std::greater_equal<int64_t>()) == keys.end()) {
    return sorted;
  }
  radix_sort_by_key(&sorted, bits);
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i].key == sorted[i - 1].key) {
      duplicate_sites_error(sorted[i - 1].row, sorted[i].row, indices);
    }
  }
  return sorted;
}

// Every (input row, offset) -> output site reach, in row order then offset order. Rows are
// split into fixed chunks, each listed by one task and joined in order, so the list does not
// depend on the number of threads.
std::vector<Reach> input_reaches(const at::Tensor& indices, const ConvGeometry& geometry,
                                 bool direct, const Grid& out_grid) {
  constexpr int64_t kChunkRows = 4096;
  const int64_t rows = indices.size(0), width = indices.size(1);
  const int32_t* sites = indices.data_ptr<int32_t>();
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  std::vector<std::vector<Reach>> chunk_reaches(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    SiteReach reach(geometry, direct, out_grid);
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<Reach>& list = chunk_reaches[c];
      for (int64_t r = c * kChunkRows; r < std::min(rows, (c + 1) * kChunkRows); ++r) {
        const int32_t* site = sites + r * width;
        reach.for_each(site[0], site + 1, [&](int64_t k, int64_t key) {
          list.push_back({key, static_cast<int32_t>(r), static_cast<int32_t>(k)});
        });
      }
    }
  });
  size_t total = 0;
  for (const auto& list : chunk_reaches) total += list.size();
  std::vector<Reach> reaches;
  reaches.reserve(total);
  for (const auto& list : chunk_reaches) reaches.insert(reaches.end(), list.begin(), list.end());
  return reaches;
}

at::Tensor keys_to_indices(const std::vector<int64_t>& keys, const Grid& grid) {
  const int64_t n = static_cast<int64_t>(keys.size());
  const int64_t width = grid.ndim + 1;
  at::Tensor indices = empty_for_writing({n, width}, at::dtype(at::kInt));
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

// check_sites changes nothing here: the sort that builds the map finds bad sites for free.
std::tuple<at::Tensor, at::Tensor> build_subm_map_cpu(const at::Tensor& indices,
                                                      c10::IntArrayRef spatial_shape,
                                                      int64_t batch_size,
                                                      c10::IntArrayRef kernel_size,
                                                      c10::IntArrayRef dilation,
                                                      bool /*check_sites*/) {
  const Grid grid = make_grid(spatial_shape, batch_size, "spatial_shape");
  const ConvGeometry geometry = subm_geometry(indices, grid, kernel_size, dilation);
  const at::Tensor contiguous = indices.contiguous();
  const std::vector<int64_t> keys = pack_indices(contiguous, grid, batch_size, spatial_shape);
  const std::vector<Reach> sorted =
      sorted_unique_sites(keys, contiguous, key_bits(grid, batch_size));
  // A centred odd kernel is symmetric: o reaches i through offset k exactly when i reaches o
  // through offset K-1-k. So look up only the offsets before the centre, set the centre to the
  // site itself, and mirror the rest. Each mirrored (i, K-1-k) has exactly one writer.
  const int64_t rows = static_cast<int64_t>(keys.size()), volume = geometry.volume;
  const int64_t centre = volume / 2;
  at::Tensor nbr = empty_for_writing({rows, volume}, at::dtype(at::kInt)).fill_(-1);
  int32_t* table_out = nbr.data_ptr<int32_t>();
  // The lookups are merge joins over the sorted keys rather than hash-table probes: for a fixed
  // offset the neighbour key is key + delta, ascending with key, so forward scans find every
  // neighbour. Sites whose neighbour lies outside the grid are skipped (key + delta would wrap
  // onto another row of the grid).
  const int ndim = grid.ndim;
  const int32_t* sites = contiguous.data_ptr<int32_t>();
  const int64_t width = contiguous.size(1);
  std::vector<int32_t> sorted_coords(rows * ndim);  // coordinates in sorted order
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::copy_n(sites + sorted[i].row * width + 1, ndim, sorted_coords.data() + i * ndim);
      table_out[i * volume + centre] = static_cast<int32_t>(i);  // row i reaches itself
    }
  });
  // Offsets are scanned in groups that share all but the last axis: their neighbour keys lie
  // in [mid - pad, mid + pad] around mid = key + the group's shift, next to each other in the
  // sorted keys, so one scan per group (5 for a 3x3x3 kernel, not 13) finds them all.
  int64_t key_stride[kMaxDims];
  key_strides(grid, key_stride);
  const int last = ndim - 1;
  const int64_t last_kernel = geometry.kernel[last], last_pad = geometry.padding[last];
  const int64_t last_dilation = geometry.dilation[last];
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t group = 0; group <= centre / last_kernel; ++group) {
      int64_t delta[kMaxDims], key_delta = 0;
      for (int d = last - 1, rest = group; d >= 0; --d) {
        delta[d] = rest % geometry.kernel[d] * geometry.dilation[d] - geometry.padding[d];
        rest /= geometry.kernel[d];
        key_delta += delta[d] * key_stride[d];
      }
      // Scan position: the first site whose key is not below this range's first window.
      const int64_t first_low = sorted[begin].key + key_delta - last_pad;
      int64_t j = std::lower_bound(sorted.begin(), sorted.end(), first_low,
                                   [](const Reach& a, int64_t key) { return a.key < key; }) -
                  sorted.begin();
      for (int64_t i = begin; i < end; ++i) {
        const int32_t* coord = sorted_coords.data() + i * ndim;
        bool inside = true;
        for (int d = 0; d < last; ++d) {
          const int64_t c = coord[d] + delta[d];
          inside = inside && c >= 0 && c < grid.shape[d];
        }
        if (!inside) continue;
        const int64_t mid = sorted[i].key + key_delta;
        while (j < rows && sorted[j].key < mid - last_pad) ++j;
        for (int64_t q = j; q < rows && sorted[q].key <= mid + last_pad; ++q) {
          // A key in the window is a neighbour when it sits on a dilated kernel position and
          // stays in the row (no wrap onto the next or previous one).
          const int64_t step = sorted[q].key - mid + last_pad;  // in [0, 2 * pad]
          if (last_dilation > 1 && step % last_dilation != 0) {
            // Between kernel positions: search for the next one rather than step through the
            // keys, which a dilated window over a dense row holds by the thousand. Keys are
            // distinct integers, so the first key >= next is at most next - key places on.
            const int64_t next = mid - last_pad + (step / last_dilation + 1) * last_dilation;
            const int64_t search_end = std::min(rows, q + 1 + (next - sorted[q].key));
            q = std::lower_bound(sorted.begin() + q + 1, sorted.begin() + search_end, next,
                                 [](const Reach& a, int64_t key) { return a.key < key; }) -
                sorted.begin() - 1;  // the loop's ++q lands on it
            continue;
          }
          const int64_t x = coord[last] + step - last_pad;
          if (x < 0 || x >= grid.shape[last]) continue;
          const int64_t k = group * last_kernel + step / last_dilation;
          if (k < centre) table_out[sorted[i].row * volume + k] = sorted[q].row;
        }
      }
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
  at::Tensor nbr_t = empty_for_writing(nbr.sizes(), nbr.options());
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
                                         kernel_size, stride, padding, dilation, transposed);
  const Grid& in_grid = args.in_grid;
  const Grid& out_grid = args.out_grid;
  const ConvGeometry& geometry = args.geometry;
  const at::Tensor contiguous = indices.contiguous();
  const std::vector<int64_t> in_keys = pack_indices(contiguous, in_grid, batch_size, spatial_shape);
  sorted_unique_sites(in_keys, contiguous, key_bits(in_grid, batch_size));  // checks only

  // Regular conv: output o reads input o*s - p + k*d (direct); an input reaches outputs by the
  // inverse. A transposed conv swaps the two directions.
  const bool input_to_output_direct = transposed;
  std::vector<Reach> reaches =
      input_reaches(contiguous, geometry, input_to_output_direct, out_grid);
  // Sorted by output key (stable, so each output's entries stay in input-row order): the
  // output sites come out sorted, and both tables follow in one pass without a hash table.
  radix_sort_by_key(&reaches, key_bits(out_grid, batch_size));
  std::vector<int64_t> out_keys;
  for (size_t i = 0; i < reaches.size(); ++i) {
    if (i == 0 || reaches[i].key != reaches[i - 1].key) out_keys.push_back(reaches[i].key);
  }
  const int64_t n_out = static_cast<int64_t>(out_keys.size()), volume = geometry.volume;
  TORCH_CHECK_VALUE(n_out <= std::numeric_limits<int32_t>::max(), "convolution would produce ",
                    n_out, " output sites; at most 2^31 - 1 are supported");
  at::Tensor nbr = empty_for_writing({n_out, volume}, at::dtype(at::kInt)).fill_(-1);
  at::Tensor nbr_t =
      empty_for_writing({contiguous.size(0), volume}, at::dtype(at::kInt)).fill_(-1);
  int32_t* nbr_data = nbr.data_ptr<int32_t>();
  int32_t* nbr_t_data = nbr_t.data_ptr<int32_t>();
  int64_t out_row = -1;
  for (size_t i = 0; i < reaches.size(); ++i) {
    const Reach& r = reaches[i];
    if (i == 0 || r.key != reaches[i - 1].key) ++out_row;
    nbr_data[out_row * volume + r.offset] = r.row;
    nbr_t_data[r.row * volume + r.offset] = static_cast<int32_t>(out_row);
  }
  return {keys_to_indices(out_keys, out_grid), nbr, nbr_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CPU, m) {
  m.impl("build_subm_map", &build_subm_map_cpu);
  m.impl("build_conv_map", &build_conv_map_cpu);
}

}  // namespace spconv_lite
