"""Flags that client code reads from ``spconv.constants`` and ``spconv.pytorch.constants``.

They describe spconv_lite, under spconv's names:

- ``SPCONV_VERSION_NUMBERS``: the spconv API level followed (2.3.8).
- ``ALL_WEIGHT_IS_KRSC`` / ``FILTER_HWIO`` / ``SAVED_WEIGHT_LAYOUT``: every sparse conv weight is
  ``[C_out, *kernel, C_in]`` ("KRSC"), and loading never converts layouts behind your back
  (spconv converts when the ``SPCONV_SAVED_WEIGHT_LAYOUT`` variable is set; spconv_lite ignores
  that variable: convert older checkpoints explicitly with
  ``spconv_lite.checkpoint.convert_state_dict``).
- ``CPU_ONLY_BUILD``: True when the extension was built without CUDA kernels.
- ``PYTORCH_VERSION``, ``TORCH_HAS_AMP``, ``is_amp_enabled()``: as in spconv.pytorch.constants.
"""

from __future__ import annotations

import re

import torch

SPCONV_VERSION_NUMBERS = [2, 3, 8]

ALL_WEIGHT_IS_KRSC = True
FILTER_HWIO = False
SAVED_WEIGHT_LAYOUT = ""

PYTORCH_VERSION = [int(v) for v in re.findall(r"\d+", torch.__version__.split("+")[0])[:3]]
TORCH_HAS_AMP = True


def is_amp_enabled() -> bool:
    """True inside a CUDA ``torch.autocast`` region (as spconv's: ``torch.autocast("cpu")``
    gives False, though the convs run in its dtype there too)."""
    return torch.is_autocast_enabled()


def _cpu_only_build() -> bool:
    # A CUDA build registers the conv op for the CUDA dispatch key.
    from .. import ops  # noqa: F401  (loads the extension)

    try:
        return not torch._C._dispatch_has_kernel_for_dispatch_key(
            "spconv_lite::sparse_conv", "CUDA")
    except (AttributeError, RuntimeError):  # a private API: assume the safe answer
        return True


CPU_ONLY_BUILD = _cpu_only_build()
