// Open-addressing hash table over int64 site keys with int32 values, shared by CPU and CUDA.
//
// The table is two flat arrays (keys, values) owned by the caller as tensors, capacity a power
// of two. Linear probing is bounded by the capacity, so a full table is reported (kFull), never
// probed forever. Insertion is lock-free (compare-and-swap on the key slot) so many threads may
// insert at once; lookups must only run after all insertions finished.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace spconv_lite {

constexpr int64_t kEmptyKey = -1;

enum class InsertResult : int { kInserted = 0, kExisting = 1, kFull = 2 };

// Keys are hashed in groups of kGroup consecutive keys (kGroup neighbouring sites along the last
// axis): the group number goes through the splitmix64 finaliser, and a key's position in its
// group stays its offset inside the group. Neighbour lookups along the last axis then touch the
// same cache line, while groups still spread evenly over the table.
constexpr int64_t kGroupBits = 3;

C10_HOST_DEVICE inline uint64_t hash_key(int64_t key) {
  constexpr uint64_t in_group = (uint64_t{1} << kGroupBits) - 1;
  uint64_t x = static_cast<uint64_t>(key) >> kGroupBits;
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return (x << kGroupBits) | (static_cast<uint64_t>(key) & in_group);
}

// Smallest power of two >= 2 * count (load factor at most 1/2), at least 16.
inline int64_t hash_capacity_for(int64_t count) {
  int64_t capacity = 16;
  while (capacity < 2 * count) capacity <<= 1;
  return capacity;
}

C10_HOST_DEVICE inline int64_t atomic_cas_key(int64_t* slot, int64_t expected, int64_t desired) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(atomicCAS(reinterpret_cast<unsigned long long*>(slot),
                                        static_cast<unsigned long long>(expected),
                                        static_cast<unsigned long long>(desired)));
#else
  __atomic_compare_exchange_n(slot, &expected, desired, false, __ATOMIC_ACQ_REL,
                              __ATOMIC_ACQUIRE);
  return expected;  // holds the previous value on failure, `expected` itself on success
#endif
}

C10_HOST_DEVICE inline int64_t load_key(const int64_t* slot) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const volatile int64_t*>(slot);
#else
  return __atomic_load_n(slot, __ATOMIC_ACQUIRE);
#endif
}

struct HashTableView {
  int64_t* keys;
  int32_t* values;  // nullptr for a key set
  int64_t capacity;  // power of two

  // Inserts key -> value. On kExisting the stored value is left unchanged and *slot_out names
  // the slot holding the key. A set (values == nullptr) stores keys only.
  C10_HOST_DEVICE InsertResult insert(int64_t key, int32_t value, int64_t* slot_out) const {
    const int64_t mask = capacity - 1;
    int64_t slot = static_cast<int64_t>(hash_key(key) & static_cast<uint64_t>(mask));
    for (int64_t probe = 0; probe < capacity; ++probe) {
      // Cheap read first: most probes of a set-building pass find the key already there.
      int64_t previous = load_key(&keys[slot]);
      if (previous == kEmptyKey) previous = atomic_cas_key(&keys[slot], kEmptyKey, key);
      if (previous == kEmptyKey) {
        if (values != nullptr) values[slot] = value;
        *slot_out = slot;
        return InsertResult::kInserted;
      }
      if (previous == key) {
        *slot_out = slot;
        return InsertResult::kExisting;
      }
      slot = (slot + 1) & mask;
    }
    return InsertResult::kFull;
  }

  // The slot holding key, or else the empty slot where inserting it would put it; -1 when the
  // key is absent and the table is full. Not safe while other threads insert.
  C10_HOST_DEVICE int64_t slot_for(int64_t key) const {
    const int64_t mask = capacity - 1;
    int64_t slot = static_cast<int64_t>(hash_key(key) & static_cast<uint64_t>(mask));
    for (int64_t probe = 0; probe < capacity; ++probe) {
      const int64_t stored = keys[slot];
      if (stored == key || stored == kEmptyKey) return slot;
      slot = (slot + 1) & mask;
    }
    return -1;
  }

  // Returns the value stored for key, or -1 when absent.
  C10_HOST_DEVICE int32_t find(int64_t key) const {
    const int64_t slot = slot_for(key);
    return slot >= 0 && keys[slot] == key ? values[slot] : -1;
  }
};

}  // namespace spconv_lite
