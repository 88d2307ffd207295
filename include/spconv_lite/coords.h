// Coordinate packing and convolution geometry shared by the CPU and CUDA kernels.
//
// A site is (batch, c_0, ..., c_{D-1}). It is packed into one int64 key in row-major order over
// (batch_size, spatial_shape...), so sorting keys sorts sites by batch, then coordinates, and
// sites of different batch items can never collide or be neighbours.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace spconv_lite {

constexpr int kMaxDims = 4;

// Grid description passed by value into kernels (host and device).
struct Grid {
  int ndim;
  int64_t shape[kMaxDims];
};

// Convolution geometry for one layer, per spatial dimension.
struct ConvGeometry {
  int ndim;
  int64_t kernel[kMaxDims];
  int64_t stride[kMaxDims];
  int64_t padding[kMaxDims];
  int64_t dilation[kMaxDims];
  int64_t volume;  // product of kernel sizes
};

C10_HOST_DEVICE inline int64_t pack_key(int64_t batch, const int64_t* coord, const Grid& grid) {
  int64_t key = batch;
  for (int d = 0; d < grid.ndim; ++d) key = key * grid.shape[d] + coord[d];
  return key;
}

C10_HOST_DEVICE inline int64_t unpack_key(int64_t key, int64_t* coord, const Grid& grid) {
  for (int d = grid.ndim - 1; d >= 0; --d) {
    coord[d] = key % grid.shape[d];
    key /= grid.shape[d];
  }
  return key;  // batch
}

// Row-major decomposition of a flat kernel offset index into per-dimension offsets.
C10_HOST_DEVICE inline void kernel_offset(int64_t k, const ConvGeometry& g, int64_t* offset) {
  for (int d = g.ndim - 1; d >= 0; --d) {
    offset[d] = k % g.kernel[d];
    k /= g.kernel[d];
  }
}

// "Direct" direction of a convolution: the site reached from `base` through kernel offset
// `offset`: base * stride - padding + offset * dilation. For a regular conv this maps an output
// site to its input site; for a transposed conv an input site to its output site.
// Returns false when the result falls outside `target`.
C10_HOST_DEVICE inline bool conv_direct(const int64_t* base, const int64_t* offset,
                                        const ConvGeometry& g, const Grid& target,
                                        int64_t* result) {
  for (int d = 0; d < g.ndim; ++d) {
    const int64_t c = base[d] * g.stride[d] - g.padding[d] + offset[d] * g.dilation[d];
    if (c < 0 || c >= target.shape[d]) return false;
    result[d] = c;
  }
  return true;
}

// Inverse of conv_direct: the site r with r * stride - padding + offset * dilation == base.
// Returns false when no such integer site exists inside `target`.
C10_HOST_DEVICE inline bool conv_inverse(const int64_t* base, const int64_t* offset,
                                         const ConvGeometry& g, const Grid& target,
                                         int64_t* result) {
  for (int d = 0; d < g.ndim; ++d) {
    const int64_t num = base[d] + g.padding[d] - offset[d] * g.dilation[d];
    if (num < 0 || num % g.stride[d] != 0) return false;
    const int64_t c = num / g.stride[d];
    if (c >= target.shape[d]) return false;
    result[d] = c;
  }
  return true;
}

}  // namespace spconv_lite
