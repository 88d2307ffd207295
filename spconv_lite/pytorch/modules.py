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
    """spconv's test for modules that take a whole sparse tensor: ``SparseModule``s, and the
    ``SparseBatchNorm`` / ``SparseReLU`` wrappers, which take one as well as features."""
    return isinstance(module, (SparseModule, SparseBatchNorm, SparseReLU))


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
