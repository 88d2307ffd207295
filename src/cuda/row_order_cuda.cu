// conv_row_order on the GPU, bitwise equal to the CPU op (src/cpu/row_order_cpu.cpp): one
// kernel computes every row's neighbour mask over each split of the offsets, then a stable radix
// sort per split orders the row numbers by mask, on only the bits the split's masks use.
// No host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cub/device/device_radix_sort.cuh>

#include "spconv_lite/checks.h"
#include "spconv_lite/cuda_utils.cuh"
#include "spconv_lite/row_order.h"

namespace spconv_lite {
namespace {

using cuda::blocks_for;
using cuda::current_stream;
using cuda::kThreads;

// masks[s * rows + r] = mask of row r over split s; rows_in[r] = r (the sort's payload).
__global__ void row_masks_kernel(const int32_t* __restrict__ table, int64_t rows, int64_t volume,
                                 int64_t splits, unsigned long long* __restrict__ masks,
                                 int32_t* __restrict__ rows_in) {
  for (int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; r < rows;
       r += int64_t{gridDim.x} * blockDim.x) {
    const int32_t* row = table + r * volume;
    for (int64_t s = 0; s < splits; ++s) {
      masks[s * rows + r] =
          row_mask(row, split_begin(s, splits, volume), split_begin(s + 1, splits, volume));
    }
    rows_in[r] = static_cast<int32_t>(r);
  }
}

at::Tensor conv_row_order_cuda(const at::Tensor& nbr, int64_t splits) {
  check_row_order_request(nbr, splits);
  const c10::cuda::CUDAGuard guard(nbr.device());
  const at::Tensor table = nbr.contiguous();
  const int64_t rows = table.size(0), volume = table.size(1);
  at::Tensor order = at::empty({splits, rows}, table.options());
  if (rows == 0) return order;
  const cudaStream_t stream = current_stream();
  at::Tensor masks = at::empty({splits, rows}, table.options().dtype(at::kLong));
  at::Tensor sorted_masks = at::empty({rows}, masks.options());
  at::Tensor rows_in = at::empty({rows}, table.options());
  auto* mask_data = reinterpret_cast<unsigned long long*>(masks.data_ptr<int64_t>());
  auto* sorted_data = reinterpret_cast<unsigned long long*>(sorted_masks.data_ptr<int64_t>());
  row_masks_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(
      table.data_ptr<int32_t>(), rows, volume, splits, mask_data, rows_in.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int count = static_cast<int>(rows);  // <= 2^31 - 1 (check_row_order_request)
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, mask_data, sorted_data, rows_in.data_ptr<int32_t>(),
      order.data_ptr<int32_t>(), count, 0, 64, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, masks.options().dtype(at::kByte));
  for (int64_t s = 0; s < splits; ++s) {
    const int bits = mask_bits(split_begin(s, splits, volume), split_begin(s + 1, splits, volume));
    if (bits == 0) {  // a split without offsets (volume 0): the identity order
      order.select(0, s).copy_(rows_in);
      continue;
    }
    // Stable: rows with equal masks keep their row order, as the CPU op's stable_sort.
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.data_ptr(), temp_bytes, mask_data + s * rows, sorted_data,
        rows_in.data_ptr<int32_t>(), order.data_ptr<int32_t>() + s * rows, count, 0, bits,
        stream));
  }
  return order;
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, CUDA, m) { m.impl("conv_row_order", &conv_row_order_cuda); }

}  // namespace spconv_lite
