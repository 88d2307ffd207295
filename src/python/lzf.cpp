// spconv_lite._C.lzf_decompress(packed, size) -> bytes: the LZF decoder of the PCD reader
// (spconv_lite/io.py), in C++ because LZF is decoded a token at a time, a few bytes each: the
// same loop in Python took seconds for one compressed million-point cloud.
//
// LZF (liblzf's format, which PCL writes binary_compressed PCD files with): a control byte below
// 32 is followed by that many plus one literal bytes. Any other holds a length in its top 3 bits
// (7: add the next byte) and the high bits of a distance (the next byte holds the low ones): copy
// length + 2 bytes from distance + 1 bytes back, byte by byte (a copy may overlap its own output).
#include "lzf.h"

#include <cstdint>
#include <cstring>

namespace {

// A copy token of 3 bytes gives at most 7 + 255 + 2 = 264 bytes: no stream unpacks to more.
constexpr Py_ssize_t kMostBytesPerPackedByte = 88;

enum class Outcome { kDone, kEndsMidway, kReferenceBeforeStart, kTooLong };

// Decodes packed into out (capacity bytes); *written: the bytes it unpacked to (kDone), or as
// far as it got.
Outcome decode(const uint8_t* packed, Py_ssize_t packed_size, uint8_t* out, Py_ssize_t capacity,
               Py_ssize_t* written) {
  Py_ssize_t in = 0, at = 0;
  Outcome outcome = Outcome::kDone;
  while (in < packed_size) {
    const unsigned control = packed[in++];
    if (control < 32) {
      const Py_ssize_t length = control + 1;
      if (length > packed_size - in) {
        outcome = Outcome::kEndsMidway;
        break;
      }
      if (length > capacity - at) {
        outcome = Outcome::kTooLong;
        break;
      }
      std::memcpy(out + at, packed + in, length);
      in += length;
      at += length;
      continue;
    }
    Py_ssize_t length = control >> 5;
    if (length == 7) {
      if (in == packed_size) {
        outcome = Outcome::kEndsMidway;
        break;
      }
      length += packed[in++];
    }
    if (in == packed_size) {
      outcome = Outcome::kEndsMidway;
      break;
    }
    const Py_ssize_t distance = (static_cast<Py_ssize_t>(control & 31) << 8) + packed[in++] + 1;
    length += 2;
    if (distance > at) {
      outcome = Outcome::kReferenceBeforeStart;
      break;
    }
    if (length > capacity - at) {
      outcome = Outcome::kTooLong;
      break;
    }
    const uint8_t* from = out + at - distance;
    for (Py_ssize_t i = 0; i < length; ++i) out[at + i] = from[i];  // may repeat its own output
    at += length;
  }
  *written = at;
  return outcome;
}

}  // namespace

PyObject* spconv_lite_lzf_decompress(PyObject* /*module*/, PyObject* args) {
  Py_buffer packed;
  Py_ssize_t size;
  if (!PyArg_ParseTuple(args, "y*n:lzf_decompress", &packed, &size)) return nullptr;
  if (size < 0) {
    PyBuffer_Release(&packed);
    PyErr_Format(PyExc_ValueError, "lzf_decompress: size must be >= 0, got %zd", size);
    return nullptr;
  }
  // Never allocate more than the stream could unpack to, whatever size a file claims.
  const Py_ssize_t bound = packed.len > PY_SSIZE_T_MAX / kMostBytesPerPackedByte
                               ? PY_SSIZE_T_MAX
                               : packed.len * kMostBytesPerPackedByte;
  const Py_ssize_t capacity = size < bound ? size : bound;
  PyObject* result = PyBytes_FromStringAndSize(nullptr, capacity);
  if (result == nullptr) {
    PyBuffer_Release(&packed);
    return nullptr;
  }
  Py_ssize_t written = 0;
  Outcome outcome;
  Py_BEGIN_ALLOW_THREADS
  outcome = decode(static_cast<const uint8_t*>(packed.buf), packed.len,
                   reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(result)), capacity, &written);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&packed);
  if (outcome == Outcome::kDone && written == size) return result;
  Py_DECREF(result);
  switch (outcome) {
    case Outcome::kEndsMidway:
      PyErr_SetString(PyExc_ValueError, "it ends mid-way");
      break;
    case Outcome::kReferenceBeforeStart:
      PyErr_SetString(PyExc_ValueError, "a reference before its start");
      break;
    case Outcome::kTooLong:
      PyErr_Format(PyExc_ValueError, "it unpacks to more than the %zd bytes its header states",
                   size);
      break;
    case Outcome::kDone:
      PyErr_Format(PyExc_ValueError, "it unpacks to %zd bytes, not the %zd its header states",
                   written, size);
      break;
  }
  return nullptr;
}
