"""spconv's table modules: combine a list of sparse tensors that share their sites."""

from __future__ import annotations

from typing import Sequence

import torch

from ..functional import sparse_add
from ..tensor import SparseConvTensor, check_same_sites
from .modules import SparseModule


def _check_aligned(inputs: Sequence[SparseConvTensor], name: str, same_channels: bool) -> None:
    if len(inputs) == 0:
        raise ValueError(f"{name} needs at least one SparseConvTensor, got an empty list")
    first = inputs[0]
    for i, x in enumerate(inputs):
        if not isinstance(x, SparseConvTensor):
            raise TypeError(f"{name} input {i} is {type(x).__name__}, not a SparseConvTensor")
        x.check_rows()
        # spconv checks only the site count; the rows must be the same sites in the same order
        # (as for tensors derived from one input by submanifold layers).
        check_same_sites(first, x, f"{name} input {i}")
        if same_channels and x.features.shape[1] != first.features.shape[1]:
            raise ValueError(
                f"{name} needs the same channel count: input {i} has {x.features.shape[1]}, "
                f"input 0 has {first.features.shape[1]}"
            )


class JoinTable(SparseModule):
    """Concatenates the features of tensors with the same sites along the channels."""

    def forward(self, input: Sequence[SparseConvTensor]) -> SparseConvTensor:
        _check_aligned(input, "JoinTable", same_channels=False)
        return input[0].replace_feature(torch.cat([x.features for x in input], dim=1))


class AddTable(SparseModule):
    """Sums the features of tensors with the same sites."""

    def forward(self, input: Sequence[SparseConvTensor]) -> SparseConvTensor:
        _check_aligned(input, "AddTable", same_channels=True)
        total = input[0].features
        for x in input[1:]:
            total = total + x.features
        return input[0].replace_feature(total)


class AddTableMisaligned(SparseModule):
    """Sums tensors whose sites may differ, on the union of their sites (spconv's name for
    ``functional.sparse_add``)."""

    def forward(self, input: Sequence[SparseConvTensor]) -> SparseConvTensor:
        if len(input) == 0:
            raise ValueError("AddTableMisaligned needs at least one SparseConvTensor, got an "
                             "empty list")
        return sparse_add(*input)


class ConcatTable(SparseModule):
    """Applies each child module to the same input and returns the list of results."""

    def __init__(self, *modules, name=None) -> None:
        super().__init__(name=name)
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    def add(self, module) -> "ConcatTable":
        self.add_module(str(len(self._modules)), module)
        return self

    def forward(self, input):
        return [module(input) for module in self._modules.values()]

