"""The ``--json`` results file of the benchmark scripts: checked before the run, written whole.
(Imported before some scripts put the checkout on sys.path: spconv_lite is imported on use.)"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def check_results_path(parser: argparse.ArgumentParser, path: Path | None,
                       data: Path | None) -> None:
    """Stops the script with a usage error, before anything is timed, when ``--json`` names a
    folder, the ``--data`` file, or a file in the ``--data`` folder (whose LiDAR frames the
    benchmark reads)."""
    if path is None:
        return
    # The file the write reaches: its folder as the kernel resolves it (links first, then
    # "..", even through a folder the write has yet to make: "new/../frame.bin"), then the
    # name, which the rename replaces; a link there is checked at its target too.
    reached = Path(os.path.realpath(path.parent)) / path.name
    if reached.is_dir():
        parser.error(f"--json {str(path)!r} is a folder, not a file")
    if data is None:
        return
    data = Path(os.path.realpath(data))
    for target in (reached, Path(os.path.realpath(reached))):
        if target == data or data in target.parents:
            parser.error(f"--json {str(path)!r} is an input (--data {str(data)!r}): refusing "
                         "to write over it")


def write_json(path: Path, payload: Any, **dump_options: Any) -> None:
    """Writes ``payload`` as JSON to ``path`` whole or not at all (the command line's
    atomic writer): an interrupted run leaves the previous file or none, never half of one."""
    from spconv_lite.cli import write_atomically

    text = json.dumps(payload, **dump_options)  # fails, if it does, before any file is touched
    write_atomically(path, "--json", lambda f: f.write(text.encode()), overwrite=True)
