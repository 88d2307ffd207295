"""The examples in spconv_lite's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import spconv_lite


def _modules_with_examples() -> list[str]:
    names = ["spconv_lite"] + [
        info.name for info in pkgutil.walk_packages(spconv_lite.__path__, "spconv_lite.")
        if not info.name.endswith(".__main__")  # command-line entry points run on import
    ]
    finder = doctest.DocTestFinder()
    return [name for name in names
            if any(test.examples for test in finder.find(importlib.import_module(name)))]


@pytest.mark.parametrize("module_name", _modules_with_examples())
def test_docstring_examples(module_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    result = doctest.testmod(importlib.import_module(module_name),
                             optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
