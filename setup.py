"""Build of spconv_lite._C.

The C++ sources listed in src/sources.txt (src/*.cpp, src/cpu/*.cpp) are always built, with the
Python module's own sources (PYTHON_MODULE_SOURCES: its entry point and the LZF decoder). The
CUDA sources listed there (src/cuda/*.cu) are added when a CUDA toolkit and a CUDA-enabled torch
are present. Environment switches:

  SPCONV_LITE_WITH_CUDA=1   force the CUDA build (fails without a toolkit)
  SPCONV_LITE_WITH_CUDA=0   skip CUDA even when it is available
  SPCONV_LITE_NATIVE=1      compile the CPU kernels for this machine's instruction set
                            (-march=native); default off so the build runs anywhere

The build records the torch it compiled against in spconv_lite/_build_info.py, which the
package checks at import (an extension loaded into another torch fails with linker errors).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    switch = os.environ.get("SPCONV_LITE_WITH_CUDA", "auto").strip().lower()
    if switch in ("1", "true", "yes", "on"):
        return True
    if switch in ("0", "false", "no", "off"):
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None


def operator_sources(kind: str) -> list[str]:
    """The operator sources of one kind ("cpp" or "cuda") listed in src/sources.txt, the list
    that CMakeLists.txt (the library without Python) reads too."""
    with open(os.path.join(ROOT, "src", "sources.txt")) as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return [
        os.path.relpath(path, ROOT)
        for row_kind, pattern in rows
        if row_kind == kind
        for path in sorted(glob.glob(os.path.join(ROOT, pattern)))
    ]


# The Python module's entry point and what it holds besides the operators.
PYTHON_MODULE_SOURCES = ["src/python/module.cpp", "src/python/lzf.cpp"]


def _extension():
    sources = operator_sources("cpp") + PYTHON_MODULE_SOURCES
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20"]
    if os.environ.get("SPCONV_LITE_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    kwargs = dict(
        name="spconv_lite._C",
        include_dirs=[os.path.join(ROOT, "include")],
        extra_link_args=["-fopenmp"],
    )
    cuda_sources = operator_sources("cuda")
    if _want_cuda() and cuda_sources:
        return CUDAExtension(
            sources=sources + cuda_sources,
            define_macros=[("SPCONV_LITE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            **kwargs,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)


class _BuildExtension(BuildExtension.with_options(use_ninja=True)):
    """Builds the extension, then writes spconv_lite/_build_info.py beside it (in the build
    folder for a wheel, in the source tree too for in-place and editable builds)."""

    def run(self):
        super().run()
        text = (
            '"""Written by setup.py: the torch that spconv_lite._C was compiled against."""\n\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
        )
        folders = {os.path.join(self.build_lib, "spconv_lite")}
        if self.inplace or getattr(self, "editable_mode", False):
            folders.add(os.path.join(ROOT, "spconv_lite"))
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_info.py"), "w") as f:
                f.write(text)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension},
)
