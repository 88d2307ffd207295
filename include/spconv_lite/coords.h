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

// Key stride of each spatial dimension of `grid` (row-major); the batch stride is stride[-1] of
// a virtual dimension before the first, i.e. the product of all sizes (returned).
C10_HOST_DEVICE inline int64_t key_strides(const Grid& grid, int64_t* strides) {
  int64_t stride = 1;
  for (int d = grid.ndim - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= grid.shape[d];
  }
  return stride;
}

// Coordinate, along dimension d, of the site reached from coordinate `base` through kernel index
// j, or -1 when it falls outside `target` or is not an integer site.
//   direct:  base * stride - padding + j * dilation
//            (regular conv: output -> input; transposed conv: input -> output)
//   inverse: the r with r * stride - padding + j * dilation == base
//            (regular conv: input -> output; transposed conv: output -> input)
C10_HOST_DEVICE inline int64_t axis_neighbor(int64_t base, int64_t j, int d, const ConvGeometry& g,
                                             bool direct, const Grid& target) {
  int64_t c;
  if (direct) {
    c = base * g.stride[d] - g.padding[d] + j * g.dilation[d];
  } else {
    const int64_t num = base + g.padding[d] - j * g.dilation[d];
    if (num < 0 || num % g.stride[d] != 0) return -1;
    c = num / g.stride[d];
  }
  return (c >= 0 && c < target.shape[d]) ? c : -1;
}

// Key in `target` of the site that the site (batch, base) reaches through kernel offset k
// (row-major over g.kernel), or -1 when it falls outside `target` or between sites. The
// one-offset-at-a-time form of the rule above, as a GPU thread per (site, offset) uses it.
C10_HOST_DEVICE inline int64_t neighbor_key(int64_t batch, const int64_t* base, int64_t k,
                                            const ConvGeometry& g, bool direct,
                                            const Grid& target) {
  int64_t j[kMaxDims];
  for (int d = g.ndim - 1; d >= 0; --d) {
    j[d] = k % g.kernel[d];
    k /= g.kernel[d];
  }
  int64_t key = batch;
  for (int d = 0; d < g.ndim; ++d) {
    const int64_t c = axis_neighbor(base[d], j[d], d, g, direct, target);
    if (c < 0) return -1;
    key = key * target.shape[d] + c;
  }
  return key;
}

C10_HOST_DEVICE inline int64_t gcd_int64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// In the inverse direction a site reaches, per dimension d, only the offsets j with
// j * dilation == base + padding (mod stride): one residue class modulo this period.
C10_HOST_DEVICE inline int64_t inverse_period(const ConvGeometry& g, int d) {
  return g.stride[d] / gcd_int64(g.stride[d], g.dilation[d]);
}

// Most sites of the target grid that one site can reach through the kernel: every offset in
// the direct direction, one residue class of them per dimension in the inverse direction.
// Bounds the number of distinct output sites of a conv by (number of input sites) * fanout.
C10_HOST_DEVICE inline int64_t kernel_fanout(const ConvGeometry& g, bool direct) {
  int64_t fanout = 1;
  for (int d = 0; d < g.ndim; ++d) {
    const int64_t period = inverse_period(g, d);
    fanout *= direct ? g.kernel[d] : (g.kernel[d] + period - 1) / period;
  }
  return fanout;
}

}  // namespace spconv_lite
