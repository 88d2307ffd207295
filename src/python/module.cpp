// The Python side of spconv_lite._C and nothing else: `import spconv_lite._C` loads this shared
// library, which runs the operator registrations compiled into it (src/sources.txt). The
// operators are reached through torch.ops.spconv_lite; the module itself holds only what is not
// an operator: the PCD reader's LZF decoder (lzf.cpp). Kept apart from the operators so that the
// libtorch-only library (CMakeLists.txt) needs no Python.
#include "lzf.h"

extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"lzf_decompress", spconv_lite_lzf_decompress, METH_VARARGS,
       "lzf_decompress(packed, size) -> bytes: LZF data unpacked to exactly size bytes"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
