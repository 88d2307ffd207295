"""``spconv.constants``: the flags client code reads or sets on the top-level package.

The weight-layout flags are those of :mod:`spconv_lite.pytorch.constants`.
``SPCONV_USE_DIRECT_TABLE`` chooses the kind of spconv's GPU hash table; OpenPCDet sets it to
False for spconv >= 2.2. It is accepted and has no effect in spconv_lite.
"""

from ..pytorch.constants import (
    ALL_WEIGHT_IS_KRSC,
    FILTER_HWIO,
    SAVED_WEIGHT_LAYOUT,
    SPCONV_VERSION_NUMBERS,
)

SPCONV_USE_DIRECT_TABLE = True

__all__ = ["ALL_WEIGHT_IS_KRSC", "FILTER_HWIO", "SAVED_WEIGHT_LAYOUT", "SPCONV_VERSION_NUMBERS",
           "SPCONV_USE_DIRECT_TABLE"]
