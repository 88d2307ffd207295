// cub::DeviceRadixSort emulated for the CPU emulation of src/cuda (see ../../../emu.h): a stable
// sort on the bits [begin_bit, end_bit) of unsigned keys, as the real radix sort orders them
// (keys equal in those bits keep their input order, whatever their other bits), so that a bit
// range too narrow for the keys shows up as a wrong order.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../../cuda_runtime.h"

namespace cub {

struct DeviceRadixSort {
  template <typename Key, typename Value>
  static cudaError_t SortPairs(void* temp, std::size_t& temp_bytes, const Key* keys_in,
                               Key* keys_out, const Value* values_in, Value* values_out,
                               int count, int begin_bit = 0, int end_bit = sizeof(Key) * 8,
                               cudaStream_t = nullptr) {
    static_assert(std::is_unsigned_v<Key>, "the emulation sorts unsigned keys only");
    if (temp == nullptr) {  // size query
      temp_bytes = 1;
      return cudaSuccess;
    }
    const int width = end_bit - begin_bit;
    const Key mask = width >= static_cast<int>(sizeof(Key) * 8) ? ~Key{0}
                                                                 : (Key{1} << width) - Key{1};
    auto digit = [&](Key key) { return (key >> begin_bit) & mask; };
    std::vector<int> positions(count);
    std::iota(positions.begin(), positions.end(), 0);
    std::stable_sort(positions.begin(), positions.end(),
                     [&](int a, int b) { return digit(keys_in[a]) < digit(keys_in[b]); });
    std::vector<Key> keys(count);
    std::vector<Value> values(values_in != nullptr ? count : 0);
    for (int j = 0; j < count; ++j) {
      keys[j] = keys_in[positions[j]];
      if (values_in != nullptr) values[j] = values_in[positions[j]];
    }
    std::copy(keys.begin(), keys.end(), keys_out);
    if (values_in != nullptr) std::copy(values.begin(), values.end(), values_out);
    return cudaSuccess;
  }

  template <typename Key>
  static cudaError_t SortKeys(void* temp, std::size_t& temp_bytes, const Key* keys_in,
                              Key* keys_out, int count, int begin_bit = 0,
                              int end_bit = sizeof(Key) * 8, cudaStream_t stream = nullptr) {
    return SortPairs<Key, char>(temp, temp_bytes, keys_in, keys_out, nullptr, nullptr, count,
                                begin_bit, end_bit, stream);
  }
};

}  // namespace cub
