// conv_row_order on the CPU: for each split of the kernel offsets, the rows of a neighbour table
// sorted stably by their neighbour mask over that split (see spconv_lite/row_order.h). The CPU
// conv does not use row orders (its threads own contiguous rows); this is the reference the
// CUDA op is checked against, bitwise.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "spconv_lite/checks.h"
#include "spconv_lite/row_order.h"

namespace spconv_lite {
namespace {

at::Tensor conv_row_order_cpu(const at::Tensor& nbr, int64_t splits) {
  check_row_order_request(nbr, splits);
  const at::Tensor table = nbr.contiguous();
  const int64_t rows = table.size(0), volume = table.size(1);
  at::Tensor order = at::empty({splits, rows}, table.options());
  const int32_t* data = table.data_ptr<int32_t>();
  std::vector<uint64_t> masks(rows);
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t begin = split_begin(s, splits, volume);
    const int64_t end = split_begin(s + 1, splits, volume);
    at::parallel_for(0, rows, 1 << 14, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) masks[r] = row_mask(data + r * volume, begin, end);
    });
    int32_t* out = order.data_ptr<int32_t>() + s * rows;
    std::iota(out, out + rows, 0);
    std::stable_sort(out, out + rows, [&](int32_t a, int32_t b) { return masks[a] < masks[b]; });
  }
  return order;
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CPU, m) { m.impl("conv_row_order", &conv_row_order_cpu); }

}  // namespace spconv_lite
