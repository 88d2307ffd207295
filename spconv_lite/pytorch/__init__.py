"""spconv 2.x drop-in: ``import spconv_lite.pytorch as spconv`` in place of
``import spconv.pytorch as spconv``.

This package holds no code of its own beyond small shims: it gives spconv_lite's classes and
functions the names and module paths of ``spconv.pytorch`` (``.conv.SparseConvolution``,
``.modules.SparseModule``, ``.core.SparseConvTensor``, ``.pool``, ``.tables``, ``.identity``,
``.functional``, ``.ops``, ``.utils``, ``.constants``, ``.hash``), so model code written for
spconv runs unchanged. The remaining differences are listed in the README ("Differences from
spconv").

Example:
    >>> import torch
    >>> import spconv_lite.pytorch as spconv
    >>> x = spconv.SparseConvTensor(torch.randn(2, 4),
    ...                             torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]], dtype=torch.int32),
    ...                             spatial_shape=[8, 8, 8], batch_size=1)
    >>> net = spconv.SparseSequential(spconv.SubMConv3d(4, 8, 3, indice_key="subm1"))
    >>> isinstance(net[0], spconv.conv.SparseConvolution), net(x).features.shape
    (True, torch.Size([2, 8]))
"""

from . import constants, conv, core, functional, hash, identity, modules, ops, pool, tables, utils
from .constants import SPCONV_VERSION_NUMBERS
from .conv import (
    SparseConv1d,
    SparseConv2d,
    SparseConv3d,
    SparseConv4d,
    SparseConvTranspose1d,
    SparseConvTranspose2d,
    SparseConvTranspose3d,
    SparseConvTranspose4d,
    SparseInverseConv1d,
    SparseInverseConv2d,
    SparseInverseConv3d,
    SparseInverseConv4d,
    SubMConv1d,
    SubMConv2d,
    SubMConv3d,
    SubMConv4d,
)
from .core import SparseConvTensor
from .modules import (
    Identity,
    RemoveGrid,
    SparseBatchNorm,
    SparseIdentity,
    SparseModule,
    SparseReLU,
    SparseSequential,
    ToDense,
    assign_name_for_sparse_modules,
)
from .ops import ConvAlgo
from .pool import (
    SparseAvgPool1d,
    SparseAvgPool2d,
    SparseAvgPool3d,
    SparseGlobalAvgPool,
    SparseGlobalMaxPool,
    SparseMaxPool1d,
    SparseMaxPool2d,
    SparseMaxPool3d,
    SparseMaxPool4d,
)
from .tables import AddTable, ConcatTable, JoinTable

# The spconv API level this layer follows, as a version string. Client code tests spconv's
# version to choose between the 1.x and 2.x APIs and weight layouts (mmdetection3d checks
# ``spconv.__version__ >= '2.0.0'``); spconv_lite's own version is ``spconv_lite.__version__``.
__version__ = ".".join(map(str, SPCONV_VERSION_NUMBERS))

__all__ = [
    "constants",
    "conv",
    "core",
    "functional",
    "hash",
    "identity",
    "modules",
    "ops",
    "pool",
    "tables",
    "utils",
    "SPCONV_VERSION_NUMBERS",
    "SparseConv1d",
    "SparseConv2d",
    "SparseConv3d",
    "SparseConv4d",
    "SparseConvTranspose1d",
    "SparseConvTranspose2d",
    "SparseConvTranspose3d",
    "SparseConvTranspose4d",
    "SparseInverseConv1d",
    "SparseInverseConv2d",
    "SparseInverseConv3d",
    "SparseInverseConv4d",
    "SubMConv1d",
    "SubMConv2d",
    "SubMConv3d",
    "SubMConv4d",
    "SparseConvTensor",
    "Identity",
    "RemoveGrid",
    "SparseBatchNorm",
    "SparseIdentity",
    "SparseModule",
    "SparseReLU",
    "SparseSequential",
    "ToDense",
    "assign_name_for_sparse_modules",
    "ConvAlgo",
    "SparseAvgPool1d",
    "SparseAvgPool2d",
    "SparseAvgPool3d",
    "SparseGlobalAvgPool",
    "SparseGlobalMaxPool",
    "SparseMaxPool1d",
    "SparseMaxPool2d",
    "SparseMaxPool3d",
    "SparseMaxPool4d",
    "AddTable",
    "ConcatTable",
    "JoinTable",
    "__version__",
]
