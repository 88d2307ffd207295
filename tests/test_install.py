"""What a user of a source checkout or a wheel sees at import: the extension not built, or
built against another torch, is one clear ImportError that says what to do; the build records
the torch it compiled against."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from helpers import require

from spconv_lite import _extension

PACKAGE = Path(__file__).resolve().parents[1] / "spconv_lite"



def import_copy(tmp_path: Path, extension: bool, built: Optional[str]):
    """Imports a copy of the package in a fresh process: with or without the extension, with
    a build record naming torch ``built`` (None: no record)."""
    copy = tmp_path / "spconv_lite"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns(
        "*.so", "*.pyd", "__pycache__", "_build_info.py"))
    if extension:
        for library in PACKAGE.glob("_C.*"):
            (copy / library.name).symlink_to(library)
    if built is not None:
        (copy / "_build_info.py").write_text(f"TORCH_VERSION = {built!r}\n")
    return subprocess.run([sys.executable, "-c", "import spconv_lite"], capture_output=True,
                          text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_unbuilt_checkout_says_how_to_build(tmp_path):
    """Also where an editable install of another checkout would supply its extension."""
    done = import_copy(tmp_path, extension=False, built=None)
    assert done.returncode == 1
    assert last_line(done.stderr) == (
        f"ImportError: spconv_lite's C++ extension (spconv_lite._C) is not built in "
        f"{tmp_path / 'spconv_lite'}: build it with `pip install --no-build-isolation -e .` "
        "(or `python setup.py build_ext --inplace`) in the source checkout")


def test_extension_built_against_another_torch_names_both_versions(tmp_path):
    require(any(PACKAGE.glob("_C.*")), "the extension is not built")
    done = import_copy(tmp_path, extension=True, built="2.4.1+cu121")
    assert done.returncode == 1
    line = last_line(done.stderr)
    assert line.startswith("ImportError: spconv_lite's C++ extension was built against torch "
                           f"2.4.1+cu121, but torch {torch.__version__} is installed: rebuild")
    assert line.endswith("or install torch==2.4.1")


@pytest.mark.parametrize("built, installed, refused", [
    ("2.13.0", "2.13.0", False),
    ("2.13.0+cpu", "2.13.0+cu126", False),  # one release: one C++ ABI
    (None, "2.13.0", False),  # no record (an extension copied in by hand): not checked
    ("2.13.0", "2.12.1", True),
    ("2.4.0+cu121", "2.13.0+cpu", True),
])  # fmt: skip
def test_torch_version_check(built, installed, refused):
    if refused:
        pattern = f"built against torch {re.escape(built)}, but torch {re.escape(installed)} "
        with pytest.raises(ImportError, match=pattern + "is installed"):
            _extension.check_torch_version(built, installed)
    else:
        _extension.check_torch_version(built, installed)


def test_build_records_its_torch():
    """setup.py writes the record beside the extension it builds (in CI: pip install -e .)."""
    record = PACKAGE / "_build_info.py"
    require(record.is_file(), f"{record} not written: the extension was not built by setup.py")
    from spconv_lite import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
