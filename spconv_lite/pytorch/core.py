"""``spconv.pytorch.core``: ``SparseConvTensor`` and ``expand_nd``."""

from ..kernel_map import KernelMap  # what indice_dict holds
from ..nn.conv import ConvAlgo
from ..tensor import SparseConvTensor


def expand_nd(ndim: int, val) -> list[int]:
    """An int or a sequence of ``ndim`` ints as a list of ``ndim`` ints (spconv's helper)."""
    from ..kernel_map import expand_nd as _expand

    return list(_expand(ndim, val, "value"))

__all__ = [
    "KernelMap",
    "ConvAlgo",
    "SparseConvTensor",
    "expand_nd",
]
