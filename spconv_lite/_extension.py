"""Loads the compiled extension ``spconv_lite._C`` with errors that say what to do.

Importing a bare extension fails cryptically: an unbuilt source checkout gives "cannot import
name '_C' from partially initialized module 'spconv_lite' (most likely due to a circular
import)", and an extension built against another torch gives a linker message about an
undefined symbol. The build records the torch it compiled against (``setup.py`` writes
``_build_info.py`` beside the extension); it is checked before the extension is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

_BUILD_COMMAND = (
    "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) in the "
    "source checkout"
)


def release(version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"2.13.0"``: the CPU and CUDA wheels of one torch release share
    its C++ ABI."""
    return version.split("+", 1)[0]


def check_torch_version(built: Optional[str], installed: str) -> None:
    """Raises ImportError, naming both versions, when the extension was built against another
    torch release than the installed one (``built`` None: not recorded, not checked)."""
    if built is not None and release(built) != release(installed):
        raise ImportError(
            f"spconv_lite's C++ extension was built against torch {built}, but torch "
            f"{installed} is installed: rebuild it against this torch with {_BUILD_COMMAND}, or "
            f"install torch=={release(built)}"
        )


def _built_torch_version() -> Optional[str]:
    try:
        return importlib.import_module("spconv_lite._build_info").TORCH_VERSION
    except ImportError:  # an extension built without the record (or copied in by hand)
        return None


def load() -> ModuleType:
    """Imports ``spconv_lite._C`` (which registers the operators)."""
    package = Path(__file__).absolute().parent
    spec = importlib.util.find_spec("spconv_lite._C")
    # An editable install of another checkout can supply its extension to this one: its ops
    # need not match this Python code, so only an extension beside this package counts.
    if spec is None or spec.origin is None or Path(spec.origin).absolute().parent != package:
        raise ImportError(
            f"spconv_lite's C++ extension (spconv_lite._C) is not built in {package}: build "
            f"it with {_BUILD_COMMAND}"
        )
    built = _built_torch_version()
    check_torch_version(built, torch.__version__)
    try:
        return importlib.import_module("spconv_lite._C")
    except ImportError as exc:
        against = f" (built against torch {built})" if built else ""
        raise ImportError(
            f"spconv_lite's C++ extension failed to load under torch {torch.__version__}"
            f"{against}: {exc}; rebuild it against this torch with {_BUILD_COMMAND}"
        ) from exc


_C = load()
