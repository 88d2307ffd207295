"""``import spconv`` in a process started by one that ``python -m spconv_lite.as_spconv`` runs.

The launcher puts this folder first on ``PYTHONPATH``, which child processes inherit (DDP ranks
from torchrun or ``torch.multiprocessing.spawn``, spawned DataLoader workers, subprocesses), so
their ``import spconv`` finds this module first. It hands the name over to spconv_lite, as the
launcher did in its own process; the import then gives spconv_lite's stand-in.
"""

import sys
from pathlib import Path

del sys.modules["spconv"]  # this module; install_as_spconv() registers the stand-in instead

try:
    from spconv_lite.standin import install_as_spconv
except ModuleNotFoundError as error:
    if error.name != "spconv_lite":
        raise
    # A source checkout the launcher ran from its own folder, which the child's import path
    # lacks: the spconv_lite holding this file.
    sys.path.append(str(Path(__file__).resolve().parents[4]))
    from spconv_lite.standin import install_as_spconv

install_as_spconv()
