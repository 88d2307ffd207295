// Host-side argument checks shared by the CPU and CUDA ops. Every message names the argument
// and the values seen; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError /
// TypeError.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "spconv_lite/coords.h"
#include "spconv_lite/row_order.h"

namespace spconv_lite {

inline void check_indices_layout(const at::Tensor& indices, int64_t ndim) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, "indices must be int32, got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(1) == ndim + 1,
                    "indices must have shape [N, ", ndim + 1,
                    "] (batch index then one column per spatial dimension), got ",
                    indices.sizes());
  TORCH_CHECK_VALUE(indices.size(0) <= std::numeric_limits<int32_t>::max(),
                    "indices has ", indices.size(0), " rows; at most 2^31 - 1 are supported");
}

inline Grid make_grid(c10::IntArrayRef spatial_shape, int64_t batch_size, const char* name) {
  const int64_t ndim = static_cast<int64_t>(spatial_shape.size());
  TORCH_CHECK_VALUE(ndim >= 1 && ndim <= kMaxDims, name, " must have 1 to ", kMaxDims,
                    " dimensions, got ", spatial_shape);
  TORCH_CHECK_VALUE(batch_size >= 1, "batch_size must be >= 1, got ", batch_size);
  Grid grid{};
  grid.ndim = static_cast<int>(ndim);
  // Keys are batch * prod(shape) + linear index: keep the product below 2^62.
  int64_t volume = batch_size;
  const int64_t limit = int64_t{1} << 62;
  for (int64_t d = 0; d < ndim; ++d) {
    TORCH_CHECK_VALUE(spatial_shape[d] >= 1, name, " must be positive, got ", spatial_shape);
    TORCH_CHECK_VALUE(volume <= limit / spatial_shape[d], name, " ", spatial_shape,
                      " with batch_size ", batch_size,
                      " has more than 2^62 sites, too many to index with int64 keys");
    volume *= spatial_shape[d];
    grid.shape[d] = spatial_shape[d];
  }
  return grid;
}

// Every geometry value stays below 2^31, so coordinate arithmetic such as
// site * stride - padding + offset * dilation cannot overflow int64.
constexpr int64_t kMaxGeometryValue = std::numeric_limits<int32_t>::max();

inline void copy_per_dim(c10::IntArrayRef values, int64_t ndim, int64_t minimum, const char* name,
                         int64_t* out) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == ndim, name, " must have ", ndim,
                    " entries (one per spatial dimension), got ", values);
  for (int64_t d = 0; d < ndim; ++d) {
    TORCH_CHECK_VALUE(values[d] >= minimum, name, " entries must be >= ", minimum, ", got ",
                      values);
    TORCH_CHECK_VALUE(values[d] <= kMaxGeometryValue, name, " entries must be at most 2^31 - 1, got ",
                      values);
    out[d] = values[d];
  }
}

inline ConvGeometry make_geometry(int64_t ndim, c10::IntArrayRef kernel_size,
                                  c10::IntArrayRef stride, c10::IntArrayRef padding,
                                  c10::IntArrayRef dilation) {
  ConvGeometry g{};
  g.ndim = static_cast<int>(ndim);
  copy_per_dim(kernel_size, ndim, 1, "kernel_size", g.kernel);
  copy_per_dim(stride, ndim, 1, "stride", g.stride);
  copy_per_dim(padding, ndim, 0, "padding", g.padding);
  copy_per_dim(dilation, ndim, 1, "dilation", g.dilation);
  // Kernel offsets are int32 in the tables' columns and the pair lists.
  g.volume = 1;
  for (int64_t d = 0; d < ndim; ++d) {
    TORCH_CHECK_VALUE(g.volume <= kMaxGeometryValue / g.kernel[d], "kernel_size ", kernel_size,
                      " has more than 2^31 - 1 offsets");
    g.volume *= g.kernel[d];
  }
  return g;
}

// Checked geometry of a submanifold conv: stride 1, odd kernel sizes, the kernel centred on
// each site (neighbour = site + (k - (K-1)/2) * dilation, i.e. padding (K-1)/2 * dilation).
// A kernel may reach at most the grid's size to each side of a site: offsets beyond can never
// connect two sites, and would only cost memory (one table column each).
inline ConvGeometry subm_geometry(const at::Tensor& indices, const Grid& grid,
                                  c10::IntArrayRef kernel_size, c10::IntArrayRef dilation) {
  check_indices_layout(indices, grid.ndim);
  const std::vector<int64_t> ones(grid.ndim, 1);
  const std::vector<int64_t> zeros(grid.ndim, 0);
  ConvGeometry geometry = make_geometry(grid.ndim, kernel_size, ones, zeros, dilation);
  for (int d = 0; d < grid.ndim; ++d) {
    TORCH_CHECK_VALUE(geometry.kernel[d] % 2 == 1,
                      "submanifold convolution needs odd kernel sizes, got kernel_size ",
                      kernel_size);
    // The output grid is the input's, so a kernel may reach past a thin grid (kernel 5 over
    // z = 1, as torch's same-padded conv): offsets outside it find no neighbour.
    geometry.padding[d] = (geometry.kernel[d] - 1) / 2 * geometry.dilation[d];
  }
  return geometry;
}

// Checked arguments of build_conv_map, shared by its CPU and CUDA implementations.
struct ConvMapArgs {
  Grid in_grid;
  Grid out_grid;
  ConvGeometry geometry;
};

inline ConvMapArgs conv_map_args(const at::Tensor& indices, c10::IntArrayRef spatial_shape,
                                 int64_t batch_size, c10::IntArrayRef out_spatial_shape,
                                 c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                 bool transposed) {
  ConvMapArgs args{};
  args.in_grid = make_grid(spatial_shape, batch_size, "spatial_shape");
  args.out_grid = make_grid(out_spatial_shape, batch_size, "out_spatial_shape");
  TORCH_CHECK_VALUE(args.in_grid.ndim == args.out_grid.ndim, "out_spatial_shape ",
                    out_spatial_shape, " must have as many dimensions as spatial_shape ",
                    spatial_shape);
  check_indices_layout(indices, args.in_grid.ndim);
  args.geometry = make_geometry(args.in_grid.ndim, kernel_size, stride, padding, dilation);
  const ConvGeometry& g = args.geometry;
  // The kernel slides over the padded input (over the padded output when transposed) and, as
  // in torch, may not be larger than it.
  const Grid& slid = transposed ? args.out_grid : args.in_grid;
  for (int d = 0; d < g.ndim; ++d) {
    TORCH_CHECK_VALUE(
        out_spatial_shape[d] <= (int64_t{1} << 31), "out_spatial_shape ", out_spatial_shape,
        " has sizes above 2^31, whose coordinates do not fit the int32 indices");
    TORCH_CHECK_VALUE(slid.shape[d] + 2 * g.padding[d] >= (g.kernel[d] - 1) * g.dilation[d] + 1,
                      "kernel_size ", kernel_size, " with dilation ", dilation,
                      " is larger than the grid it slides over: ",
                      transposed ? "out_spatial_shape " : "spatial_shape ",
                      transposed ? out_spatial_shape : spatial_shape, " padded by ", padding);
  }
  // The output grid must be the conv's own (torch's formulas; a transposed conv may add an
  // output padding below the stride or the dilation): a smaller one would drop output sites.
  std::vector<int64_t> expected(g.ndim);
  bool matches = true;
  for (int d = 0; d < g.ndim; ++d) {
    const int64_t reach = g.dilation[d] * (g.kernel[d] - 1) + 1;
    if (transposed) {
      // spatial_shape may reach 2^62: (shape - 1) * stride can pass int64, so in 128 bits.
      const __int128 full = static_cast<__int128>(args.in_grid.shape[d] - 1) * g.stride[d] -
                            2 * g.padding[d] + reach;
      expected[d] =
          static_cast<int64_t>(std::min<__int128>(full, std::numeric_limits<int64_t>::max()));
      const __int128 extra = static_cast<__int128>(out_spatial_shape[d]) - full;
      matches = matches && extra >= 0 && extra < std::max(g.stride[d], g.dilation[d]);
    } else {
      expected[d] = (args.in_grid.shape[d] + 2 * g.padding[d] - reach) / g.stride[d] + 1;
      matches = matches && out_spatial_shape[d] == expected[d];
    }
  }
  TORCH_CHECK_VALUE(matches, "out_spatial_shape ", out_spatial_shape, " is not the output grid of ",
                    transposed ? "a transposed conv" : "a conv", " of spatial_shape ",
                    spatial_shape, " with kernel_size ", kernel_size, ", stride ", stride,
                    ", padding ", padding, " and dilation ", dilation, ": that is ", c10::IntArrayRef(expected),
                    transposed ? " (plus an output padding below the stride or the dilation)"
                               : "");
  return args;
}

// Checks a neighbour table: int32 [rows, kernel_volume].
inline void check_neighbor_table(const at::Tensor& nbr, const char* name, int64_t rows,
                                 int64_t kernel_volume) {
  TORCH_CHECK_TYPE(nbr.scalar_type() == at::kInt, name, " must be int32, got ", nbr.scalar_type());
  TORCH_CHECK_VALUE(nbr.dim() == 2, name, " must be 2-D [rows, kernel_volume], got ", nbr.sizes());
  if (rows >= 0) {
    TORCH_CHECK_VALUE(nbr.size(0) == rows, name, " must have ", rows, " rows, got ", nbr.sizes());
  }
  if (kernel_volume >= 0) {
    TORCH_CHECK_VALUE(nbr.size(1) == kernel_volume, name, " must have ", kernel_volume,
                      " columns (the kernel volume), got ", nbr.sizes());
  }
}

// CPU only: every entry of a neighbour table must be -1 or a valid row of the table it indexes,
// so that a table from elsewhere can never make a kernel read out of bounds.
inline void check_neighbor_entries_cpu(const at::Tensor& nbr, const char* name, int64_t limit) {
  const at::Tensor table = nbr.contiguous();
  const int32_t* data = table.data_ptr<int32_t>();
  const int64_t count = table.numel();
  std::atomic<bool> bad{false};
  // -1 <= v < limit as one unsigned 32-bit comparison (v + 1 <= limit), reduced without
  // branches so that the scan vectorizes: it runs on every conv call. A limit of 2^31 or more
  // admits every non-negative int32.
  const uint32_t bound = static_cast<uint32_t>(std::min<int64_t>(limit, int64_t{1} << 31));
  at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
    uint32_t outside = 0;  // an integer: gcc does not vectorize `bool &=`
    for (int64_t j = begin; j < end; ++j) {
      outside |= static_cast<uint32_t>(data[j]) + 1u > bound;
    }
    if (outside != 0) bad = true;
  });
  TORCH_CHECK_VALUE(!bad.load(), name, " has entries outside [-1, ", limit,
                    "): it does not index the given features");
}

// Checks a row order of a neighbour table of `rows` rows and `volume` offsets (conv_row_order's
// output): int32 [splits, rows] with 1 <= splits <= min(kMaxRowOrderSplits, max(volume, 1)).
inline void check_row_order(const at::Tensor& order, const char* name, int64_t rows,
                            int64_t volume) {
  TORCH_CHECK_TYPE(order.scalar_type() == at::kInt, name, " must be int32, got ",
                   order.scalar_type());
  TORCH_CHECK_VALUE(order.dim() == 2 && order.size(1) == rows, name,
                    " must be [splits, ", rows, "] (a row order of the table), got ",
                    order.sizes());
  const int64_t most = std::min(kMaxRowOrderSplits, std::max<int64_t>(volume, 1));
  TORCH_CHECK_VALUE(order.size(0) >= 1 && order.size(0) <= most, name, " has ", order.size(0),
                    " splits of the kernel offsets; a table of ", volume,
                    " offsets allows 1 to ", most);
}

// Checks the arguments of conv_row_order: a neighbour table and 1 <= splits <= the limit.
inline void check_row_order_request(const at::Tensor& nbr, int64_t splits) {
  check_neighbor_table(nbr, "nbr", -1, -1);
  TORCH_CHECK_VALUE(nbr.size(0) <= std::numeric_limits<int32_t>::max(), "nbr has ", nbr.size(0),
                    " rows; a row order holds int32 rows");
  const int64_t most = std::min(kMaxRowOrderSplits, std::max<int64_t>(nbr.size(1), 1));
  TORCH_CHECK_VALUE(splits >= 1 && splits <= most, "splits must be in [1, ", most,
                    "] for a table of ", nbr.size(1), " offsets, got ", splits);
}

// CPU only: every row of a row order must be a permutation of 0 .. rows-1, so that each output
// row is written exactly once.
inline void check_row_order_entries_cpu(const at::Tensor& order, const char* name) {
  const at::Tensor rows_of = order.contiguous();
  const int64_t rows = rows_of.size(1);
  const int32_t* data = rows_of.data_ptr<int32_t>();
  std::vector<char> seen(rows);
  for (int64_t s = 0; s < rows_of.size(0); ++s) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t j = 0; j < rows; ++j) {
      const int32_t r = data[s * rows + j];
      TORCH_CHECK_VALUE(r >= 0 && r < rows && !seen[r], name, " row ", s,
                        " is not a permutation of 0 .. ", rows - 1, " (entry ", j, " is ", r,
                        ")");
      seen[r] = 1;
    }
  }
}

// A device op gets every tensor on the device it runs on (the dispatcher picks the CUDA kernel
// as soon as one argument is a CUDA tensor, so a CPU table next to CUDA features lands here).
inline void check_device(const at::Tensor& t, const char* name, const c10::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but the op runs on ",
                    device, ": move every input to the same device");
}

inline void check_features(const at::Tensor& features, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()), name,
                   " must be a floating-point tensor, got ", features.scalar_type());
  TORCH_CHECK_VALUE(features.dim() == 2, name, " must be 2-D [rows, channels], got ",
                    features.sizes());
}

}  // namespace spconv_lite
