// Large CPU outputs on transparent huge pages.
//
// A fresh allocation of many megabytes comes straight from the kernel, and writing it takes a
// page fault per 4 KB page: the 1.8 GB neighbour table of a kernel-7 regular conv spent more
// time faulting than the conv spent computing. Marked before it is first touched, such a
// tensor gets 2 MB pages where the system grants them on request
// (/sys/kernel/mm/transparent_hugepage/enabled set to "madvise", a common default; "always"
// gives them anyway, "never" not at all), 512 times fewer faults. The contents, and so the
// results, are the same either way. SPCONV_LITE_HUGE_PAGES=0 turns the advice off, for systems
// where assembling huge pages stalls (memory compaction on a fragmented machine).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace spconv_lite {

// at::empty for a CPU tensor that is about to be written whole (a neighbour table, a conv's
// output): from 16 MB up, the whole 2 MB pages inside it are advised to be huge pages.
inline at::Tensor empty_for_writing(at::IntArrayRef sizes, at::TensorOptions options) {
  at::Tensor tensor = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const char* wanted = std::getenv("SPCONV_LITE_HUGE_PAGES");  // read at each call
  // Unset or empty: the default (on), as for the other run-time switches.
  const bool unset = wanted == nullptr || wanted[0] == '\0';
  TORCH_CHECK_VALUE(unset || std::strcmp(wanted, "0") == 0 || std::strcmp(wanted, "1") == 0,
                    "SPCONV_LITE_HUGE_PAGES must be 0 or 1 (or unset), got '", wanted, "'");
  const bool advise = unset || wanted[0] == '1';
  if (advise && tensor.nbytes() >= 8 * kHugePage) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(tensor.data_ptr());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (start + tensor.nbytes()) & ~(kHugePage - 1);
    // Advice only: where it is refused (a kernel without THP), the pages stay 4 KB.
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return tensor;
}

}  // namespace spconv_lite
