// The Python side of spconv_lite._C and nothing else: `import spconv_lite._C` loads this shared
// library, which runs the operator registrations compiled into it (src/sources.txt). The module
// itself is empty: all functionality is reached through torch.ops.spconv_lite. Kept apart from
// the operators so that the libtorch-only library (CMakeLists.txt) needs no Python.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
