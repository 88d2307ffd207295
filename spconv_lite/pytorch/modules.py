"""``spconv.pytorch.modules``: ``SparseModule``, ``SparseSequential`` and the feature-wise
wrappers."""

from ..nn.conv import SparseConvolution
from ..nn.modules import (
    Identity,
    RemoveGrid,
    SparseBatchNorm,
    SparseIdentity,
    SparseModule,
    SparseReLU,
    SparseSequential,
    SparseSyncBatchNorm,
    ToDense,
    assign_name_for_sparse_modules,
)


def is_spconv_module(module) -> bool:
    """True for modules that ``SparseSequential`` hands the whole sparse tensor."""
    return isinstance(module, SparseModule)


def is_sparse_conv(module) -> bool:
    """True for sparse convolution layers."""
    return isinstance(module, SparseConvolution)

__all__ = [
    "Identity",
    "RemoveGrid",
    "SparseBatchNorm",
    "SparseIdentity",
    "SparseModule",
    "SparseReLU",
    "SparseSequential",
    "SparseSyncBatchNorm",
    "ToDense",
    "assign_name_for_sparse_modules",
    "SparseConvolution",
    "is_spconv_module",
    "is_sparse_conv",
]
