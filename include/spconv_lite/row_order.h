// Row orders of a neighbour table grouped by neighbour pattern, shared by the CPU and CUDA
// implementations of conv_row_order and by the CUDA conv kernels that follow them.
//
// The kernel offsets of a table [R, K] are cut into `splits` contiguous ranges. For each range,
// the rows are sorted (stably, so ties keep their row order) by their neighbour mask over that
// range: bit j set when the row has a neighbour at offset begin + j. Rows with the same pattern
// then share the tiles of a fused conv kernel, which skips the offsets where none of a tile's
// rows has a neighbour. A conv over several ranges runs one pass per range, in range order, each
// pass adding its offsets to the accumulator of the one before: every output row still sums its
// offsets in increasing order, with one writer per row in each pass (no atomics).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace spconv_lite {

// Most ranges a row order may have (each pass re-reads and re-writes the accumulator).
constexpr int64_t kMaxRowOrderSplits = 8;

// First offset of range s of `splits` over `volume` offsets (range s is [begin(s), begin(s+1))).
C10_HOST_DEVICE inline int64_t split_begin(int64_t s, int64_t splits, int64_t volume) {
  return s * volume / splits;
}

// Bits of the sort key of a range: its first 64 offsets (ranges of more sort by those alone,
// which is still a valid order, only a coarser grouping).
C10_HOST_DEVICE inline int mask_bits(int64_t begin, int64_t end) {
  return end - begin < 64 ? static_cast<int>(end - begin) : 64;
}

// Neighbour mask of one table row over the offsets [begin, end).
C10_HOST_DEVICE inline uint64_t row_mask(const int32_t* row, int64_t begin, int64_t end) {
  const int bits = mask_bits(begin, end);
  uint64_t mask = 0;
  for (int j = 0; j < bits; ++j) mask |= static_cast<uint64_t>(row[begin + j] >= 0) << j;
  return mask;
}

}  // namespace spconv_lite
