"""Stand-in for the top-level ``spconv`` package (spconv 2.3.8's API), backed by spconv_lite.

:func:`spconv_lite.install_as_spconv` registers this package as ``spconv`` in ``sys.modules``
(and :mod:`spconv_lite.pytorch` as ``spconv.pytorch``), so that client code that imports
``spconv`` itself runs unchanged:

- ``spconv.__version__`` is ``"2.3.8"``, the spconv API level followed (mmdetection3d's test
  ``spconv.__version__ >= '2.0.0'``, OpenPCDet's ``float(spconv.__version__[2:])``);
- ``spconv.constants`` (layout flags, ``SPCONV_USE_DIRECT_TABLE``), ``spconv.core``
  (``ConvAlgo``), ``spconv.utils`` (``Point2VoxelCPU1d`` .. ``4d``);
- ``spconv.pytorch`` is :mod:`spconv_lite.pytorch`, with its submodules.

``python -m spconv_lite.as_spconv SCRIPT [ARGS...]`` (or ``-m MODULE [ARGS...]``) runs a script
with the stand-in installed, without editing it.
"""

from .. import pytorch
from ..pytorch.constants import SPCONV_VERSION_NUMBERS
from . import constants, core, utils
from .core import ConvAlgo

__version__ = ".".join(map(str, SPCONV_VERSION_NUMBERS))

__all__ = ["ConvAlgo", "SPCONV_VERSION_NUMBERS", "constants", "core", "pytorch", "utils",
           "__version__"]
