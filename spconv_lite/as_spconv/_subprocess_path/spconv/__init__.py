"""``import spconv`` in a process started by one that ``python -m spconv_lite.as_spconv`` runs.

The launcher puts this folder first on ``PYTHONPATH``, which child processes inherit (DDP ranks
from torchrun or ``torch.multiprocessing.spawn``, spawned DataLoader workers, subprocesses), so
their ``import spconv`` finds this module first. It hands the name over to spconv_lite, as the
launcher did in its own process; the import then gives spconv_lite's stand-in.
"""

import sys

del sys.modules["spconv"]  # this module; install_as_spconv() registers the stand-in instead

from spconv_lite.standin import install_as_spconv  # noqa: E402

install_as_spconv()
