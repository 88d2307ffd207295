"""Making ``import spconv`` resolve to spconv_lite, for client code that cannot be edited.

:func:`install_as_spconv` registers :mod:`spconv_lite.as_spconv` as ``spconv`` in
``sys.modules``, :mod:`spconv_lite.pytorch` as ``spconv.pytorch``, and their submodules under
the matching ``spconv.*`` names. Call it before anything imports ``spconv``, or run the client's
script with ``python -m spconv_lite.as_spconv SCRIPT [ARGS...]`` (``-m MODULE [ARGS...]`` for a
module), which calls it and then runs the script as ``python SCRIPT [ARGS...]`` would. The
launcher also puts a folder first on ``PYTHONPATH`` whose ``spconv`` module does the same in the
processes the script starts (DDP ranks, spawned DataLoader workers): ``import spconv`` gives
spconv_lite there too.

Example:
    >>> import spconv_lite
    >>> spconv_lite.install_as_spconv()  # doctest: +SKIP
    >>> import spconv, spconv.pytorch   # doctest: +SKIP
    >>> spconv.__version__, spconv.pytorch is spconv_lite.pytorch  # doctest: +SKIP
    ('2.3.8', True)
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

USAGE = """usage: python -m spconv_lite.as_spconv SCRIPT [ARGS...]
       python -m spconv_lite.as_spconv -m MODULE [ARGS...]

Runs SCRIPT (or MODULE) with `import spconv` resolving to spconv_lite
(spconv_lite.install_as_spconv())."""


def install_as_spconv() -> ModuleType:
    """Registers spconv_lite's modules as ``spconv``, ``spconv.pytorch``, ``spconv.utils``,
    ``spconv.constants``, ``spconv.core`` and ``spconv.pytorch.*`` in ``sys.modules``.

    Calling it again is harmless. Names spconv_lite does not provide
    (``spconv.pytorch.quantization``, ``spconv.utils.VoxelGeneratorV2``, ...) raise
    ``ImportError`` / ``AttributeError``, as they would with a spconv build that lacks them.

    Returns:
        The module that ``import spconv`` now gives (:mod:`spconv_lite.as_spconv`).

    Raises:
        RuntimeError: another ``spconv`` (the real one) is already imported in this process:
            two libraries cannot share the name, so the call must come first.
    """
    from . import as_spconv

    present = sorted(name for name in sys.modules if name.split(".")[0] == "spconv")
    if present:
        if sys.modules.get("spconv") is as_spconv:
            return as_spconv
        origin = getattr(sys.modules.get(present[0]), "__file__", None)
        raise RuntimeError(
            f"spconv is already imported ({present[0]} from {origin}); call "
            "spconv_lite.install_as_spconv() before anything imports spconv, or run the script "
            "with `python -m spconv_lite.as_spconv SCRIPT`"
        )
    aliases = {}
    for prefix, package in (("spconv_lite.as_spconv", "spconv"),
                            ("spconv_lite.pytorch", "spconv.pytorch")):
        for name, module in list(sys.modules.items()):
            if name == prefix or name.startswith(prefix + "."):
                aliases[package + name[len(prefix):]] = module
    aliases.pop("spconv.__main__", None)
    sys.modules.update(aliases)
    return as_spconv


# Holds a `spconv` module that installs the stand-in in the processes a launched script starts.
SUBPROCESS_PATH = str(Path(__file__).resolve().parent / "as_spconv" / "_subprocess_path")


def _hand_down_to_subprocesses() -> None:
    """Puts SUBPROCESS_PATH first on ``PYTHONPATH``, which child processes inherit, and on this
    process's import path after the script's folder (where PYTHONPATH's entries go), which
    multiprocessing's spawn gives its children in place of their own. Their ``import spconv``
    then finds its module before any installed spconv; here ``spconv`` is installed already."""
    given = os.environ.get("PYTHONPATH")
    # Empty entries stay: each puts the working directory on the import path.
    entries = [p for p in given.split(os.pathsep) if p != SUBPROCESS_PATH] if given else []
    os.environ["PYTHONPATH"] = os.pathsep.join([SUBPROCESS_PATH, *entries])
    if SUBPROCESS_PATH not in sys.path:
        sys.path.insert(1, SUBPROCESS_PATH)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m spconv_lite.as_spconv``: installs the stand-in, then runs the script or
    module given on the command line with the remaining arguments as its ``sys.argv``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return
    if not args or args == ["-m"]:
        raise SystemExit(USAGE)
    if args[0] != "-m" and not Path(args[0]).is_file():
        raise SystemExit(f"spconv_lite.as_spconv: script {args[0]!r} not found\n{USAGE}")
    install_as_spconv()
    sys.argv = args[1:] if args[0] == "-m" else args
    if args[0] != "-m":  # as `python SCRIPT` does: the script's folder comes first
        sys.path[0] = str(Path(args[0]).resolve().parent)
    _hand_down_to_subprocesses()
    if args[0] == "-m":
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        return
    runpy.run_path(args[0], run_name="__main__")
