"""Containers and small modules: ``SparseModule``, ``SparseSequential``, ``ToDense``,
``Identity``, ``RemoveGrid`` and spconv's feature-wise wrappers ``SparseBatchNorm``,
``SparseReLU``, ``SparseIdentity``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ..tensor import SparseConvTensor


class SparseModule(nn.Module):
    """Base class of modules that take and return a ``SparseConvTensor``.

    ``SparseSequential`` passes the whole sparse tensor to these; any other module gets only
    ``.features``.
    """

    def __init__(self, name: Optional[str] = None) -> None:
        super().__init__()
        self.name = name
        self._sparse_unique_name = ""  # set by assign_name_for_sparse_modules


class SparseSequential(SparseModule):
    """``nn.Sequential`` for sparse tensors: ``SparseModule`` children receive the sparse tensor,
    plain torch modules (BatchNorm1d, ReLU, ...) are applied to its features.

    Example:
        >>> from spconv_lite import SubMConv3d
        >>> net = SparseSequential(SubMConv3d(4, 16, 3, bias=False), nn.BatchNorm1d(16), nn.ReLU())
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, module in args[0].items():
                self.add_module(name, module)
        else:
            for index, module in enumerate(args):
                self.add_module(str(index), module)
        for name, module in kwargs.items():
            if name in self._modules:
                raise ValueError(f"SparseSequential got the module name {name!r} twice")
            self.add_module(name, module)

    def __getitem__(self, index: int) -> nn.Module:
        modules = list(self._modules.values())
        if not -len(modules) <= index < len(modules):
            raise IndexError(f"index {index} is out of range for {len(modules)} modules")
        return modules[index]

    def __len__(self) -> int:
        return len(self._modules)

    def add(self, module: nn.Module, name: Optional[str] = None) -> None:
        """Appends ``module``; a ``name`` the sequence already has replaces that module in its
        place (as spconv's, and ``add_module``)."""
        if name is None:
            name = str(len(self._modules))
            if name in self._modules:
                raise KeyError(f"SparseSequential already has a module named {name!r}; pass "
                               "another name")
        self.add_module(name, module)

    def forward(self, input):
        for module in self._modules.values():
            if isinstance(module, SparseModule) or not isinstance(input, SparseConvTensor):
                input = module(input)
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            if is_norm and torch.compiler.is_compiling():
                # The row count after a strided conv is data dependent, and batch_norm branches
                # on it (numel == 0; one row in training). Promise the tracer a usable count; an
                # input without enough sites then fails a runtime check instead of a trace.
                # (Later norms outside a SparseSequential, e.g. in residual blocks, rely on it.)
                # The message is a literal: torch 2.11's dynamo takes no closure in it.
                torch._check(input.features.shape[0] >= (2 if module.training else 1), lambda: (
                    "a BatchNorm in a compiled or exported SparseSequential needs at least 1 "
                    "site (2 in training)"))
            elif (is_norm and input.features.shape[0] == 0
                  and not isinstance(module, (nn.SyncBatchNorm, SparseBatchNorm))):
                # As spconv: an empty input leaves the norm's batch count as it was. Not a
                # SyncBatchNorm: every process must join its all_gather, or the others wait
                # forever; nor SparseBatchNorm, which spconv hands the whole tensor.
                continue
            input = input.replace_feature(module(input.features))
        return input


class ToDense(SparseModule):
    """Converts a ``SparseConvTensor`` into a dense ``[B, C, *spatial]`` tensor."""

    def forward(self, x: SparseConvTensor) -> torch.Tensor:
        return x.dense()


class Identity(SparseModule):
    """Returns its input unchanged (sparse or dense)."""

    def forward(self, input):
        return input


class RemoveGrid(SparseModule):
    """Drops the ``grid`` buffer of a ``SparseConvTensor`` (spconv API; spconv_lite keeps no
    grid buffer, so this only clears the field)."""

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        x.grid = None
        return x


class _FeatureWise:
    """Mixin: a torch module that also accepts a ``SparseConvTensor`` and applies itself to
    ``.features``. ``SparseSequential`` hands these modules the features directly, which gives
    the same result."""

    def forward(self, input):
        if isinstance(input, SparseConvTensor):
            return input.replace_feature(super().forward(input.features))
        return super().forward(input)


class SparseBatchNorm(_FeatureWise, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that also takes a ``SparseConvTensor`` (spconv's name).

    ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns it into a plain ``nn.SyncBatchNorm``,
    which ``SparseSequential`` applies to the features like any other torch module.
    """


class SparseSyncBatchNorm(_FeatureWise, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that also takes a ``SparseConvTensor`` (spconv's name)."""


class SparseReLU(_FeatureWise, nn.ReLU):
    """``nn.ReLU`` that also takes a ``SparseConvTensor`` (spconv's name)."""


class SparseIdentity(_FeatureWise, nn.Identity):
    """``nn.Identity`` that also takes a ``SparseConvTensor`` (spconv's name)."""


def assign_name_for_sparse_modules(module: nn.Module) -> None:
    """Stores each ``SparseModule``'s qualified name in ``_sparse_unique_name`` (spconv API,
    used by its debugging and quantization tools)."""
    for name, child in module.named_modules():
        if isinstance(child, SparseModule):
            child._sparse_unique_name = name
