"""spconv_lite: sparse convolution for point clouds, compatible with spconv 2.x.

Example:
    >>> import torch, spconv_lite as spconv
    >>> indices = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]], dtype=torch.int32)
    >>> x = spconv.SparseConvTensor(torch.randn(2, 4), indices, [8, 8, 8], batch_size=1)
    >>> y = spconv.SubMConv3d(4, 16, 3, indice_key="subm1")(x)
    >>> y.features.shape
    torch.Size([2, 16])
"""

from . import checkpoint, functional, io, ops, reference
from .kernel_map import KernelMap
from .nn import *  # noqa: F401,F403
from .nn import __all__ as _nn_all
from .standin import install_as_spconv
from .tensor import SparseConvTensor
from .voxelize import PointToVoxel, batch_point_clouds, voxel_to_point

__version__ = "0.1.0"

__all__ = [
    "SparseConvTensor",
    "KernelMap",
    "PointToVoxel",
    "batch_point_clouds",
    "voxel_to_point",
    "install_as_spconv",
    "checkpoint",
    "functional",
    "io",
    "ops",
    "reference",
    *_nn_all,
]
