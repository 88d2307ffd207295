// The LZF decoder behind spconv_lite._C.lzf_decompress (src/python/lzf.cpp).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

// lzf_decompress(packed: bytes-like, size: int) -> bytes of exactly size bytes; ValueError
// saying what is wrong with a stream that does not unpack to size bytes.
PyObject* spconv_lite_lzf_decompress(PyObject* module, PyObject* args);
