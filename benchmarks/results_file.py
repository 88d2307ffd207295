"""The ``--json`` results file of the benchmark scripts: checked before the run, written whole.
(No heavy imports: bench_voxelize's memory child measures what it imports.)"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def check_results_path(parser: argparse.ArgumentParser, path: Path | None,
                       data: Path | None) -> None:
    """Stops the script with a usage error, before anything is timed, when ``--json`` names a
    folder or one of the run's inputs: the ``--data`` file, or a file in the ``--data``
    folder (a LiDAR frame the benchmark reads)."""
    if path is None or not path.exists():
        return
    if path.is_dir():
        parser.error(f"--json {str(path)!r} is a folder, not a file")
    if data is None:
        return
    target, data = path.resolve(), data.resolve()
    if target == data or data in target.parents:
        parser.error(f"--json {str(path)!r} is an input (--data {str(data)!r}): refusing to "
                     "write over it")


def write_json(path: Path, payload: Any, **dump_options: Any) -> None:
    """Writes ``payload`` as JSON into a temporary file beside ``path``, then renames it into
    place: an interrupted run leaves the previous file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, **dump_options)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
