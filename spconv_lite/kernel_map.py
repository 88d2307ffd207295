"""Kernel maps for conv and pool layers, and their cache in ``SparseConvTensor.indice_dict``.

This is the one place that decides output sites and output grid sizes, and that reuses or
builds a map for a given ``indice_key``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import Tensor

from . import ops
from .tensor import SparseConvTensor

IntOrSeq = Union[int, Sequence[int]]


def expand_nd(ndim: int, value: IntOrSeq, name: str) -> tuple[int, ...]:
    """An int or a per-dimension sequence as a tuple of ``ndim`` ints."""
    # operator.index accepts Python, numpy and torch integers but not floats or strings, which
    # int() would silently truncate or parse.
    try:
        return (operator.index(value),) * ndim
    except TypeError:
        pass
    try:
        values = tuple(operator.index(v) for v in value)
    except TypeError as exc:
        raise TypeError(
            f"{name} must be an int or a sequence of {ndim} ints, got {value!r}"
        ) from exc
    if len(values) != ndim:
        raise ValueError(f"{name} must have {ndim} entries, got {list(values)}")
    return values


def conv_output_shape(
    spatial_shape: Sequence[int], kernel_size, stride, padding, dilation
) -> list[int]:
    """Output grid of a regular conv / pool, as ``torch.nn.functional.conv3d`` computes it."""
    shape = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(spatial_shape, kernel_size, stride, padding, dilation)
    ]
    if any(n < 1 for n in shape):
        raise ValueError(
            f"spatial_shape {list(spatial_shape)} is too small for kernel_size {list(kernel_size)}"
            f", padding {list(padding)}, dilation {list(dilation)}: output shape would be {shape}"
        )
    return shape


def conv_transpose_output_shape(
    spatial_shape: Sequence[int], kernel_size, stride, padding, dilation, output_padding
) -> list[int]:
    """Output grid of a transposed conv, as ``torch.nn.functional.conv_transpose3d``."""
    shape = [
        (n - 1) * s - 2 * p + d * (k - 1) + 1 + op
        for n, k, s, p, d, op in zip(
            spatial_shape, kernel_size, stride, padding, dilation, output_padding
        )
    ]
    if any(n < 1 for n in shape):
        raise ValueError(
            f"transposed conv of spatial_shape {list(spatial_shape)} with padding "
            f"{list(padding)} gives an empty output shape {shape}"
        )
    return shape


@dataclass
class KernelMap:
    """A kernel map between the sites of two grids, as cached in ``indice_dict``."""

    in_indices: Tensor
    out_indices: Tensor
    nbr: Tensor  # [N_out, K] input row per output row and offset, or -1
    nbr_t: Tensor  # [N_in, K] output row per input row and offset, or -1
    in_spatial_shape: list[int]
    out_spatial_shape: list[int]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    subm: bool
    transposed: bool

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)


def _check_reuse(key: str, cached, geometry: dict) -> None:
    if not isinstance(cached, KernelMap):
        raise ValueError(f"indice_key {key!r} holds {type(cached).__name__}, not a kernel map")
    seen = {name: getattr(cached, name) for name in geometry}
    if seen != geometry:
        raise ValueError(
            f"indice_key {key!r} is reused with a different geometry: the cached map has "
            f"{seen}, this layer asks for {geometry}"
        )


def subm_map(
    x: SparseConvTensor, kernel_size: tuple[int, ...], dilation: tuple[int, ...],
    indice_key: Optional[str],
) -> KernelMap:
    """The submanifold map of ``x``, reused from ``indice_dict[indice_key]`` when present."""
    geometry = {"kernel_size": kernel_size, "dilation": dilation, "subm": True}
    cached = x.find_indice_pair(indice_key)
    if cached is not None:
        _check_reuse(indice_key, cached, geometry)
        if cached.in_indices.shape[0] != x.indices.shape[0]:
            raise ValueError(
                f"indice_key {indice_key!r} caches a map over {cached.in_indices.shape[0]} sites "
                f"but this input has {x.indices.shape[0]}"
            )
        return cached
    nbr, nbr_t = ops.build_subm_map(x.indices, x.spatial_shape, x.batch_size, kernel_size, dilation)
    ndim = len(kernel_size)
    kmap = KernelMap(
        x.indices, x.indices, nbr, nbr_t, x.spatial_shape, x.spatial_shape, kernel_size,
        (1,) * ndim, tuple((k - 1) // 2 * d for k, d in zip(kernel_size, dilation)), dilation,
        subm=True, transposed=False,
    )
    if indice_key is not None:
        x.indice_dict[indice_key] = kmap
    return kmap


def conv_map(
    x: SparseConvTensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    indice_key: Optional[str],
    transposed: bool = False,
    output_padding: Optional[tuple[int, ...]] = None,
) -> KernelMap:
    """The map of a regular or transposed conv (or pool) over ``x``; cached under
    ``indice_key`` so that an inverse conv can undo it. A cached map is reused when it was built
    for these very indices."""
    geometry = {
        "kernel_size": kernel_size, "stride": stride, "padding": padding,
        "dilation": dilation, "subm": False, "transposed": transposed,
    }
    cached = x.find_indice_pair(indice_key)
    if cached is not None:
        _check_reuse(indice_key, cached, geometry)
        if cached.in_indices is x.indices:
            return cached
    if transposed:
        out_shape = conv_transpose_output_shape(
            x.spatial_shape, kernel_size, stride, padding, dilation,
            output_padding or (0,) * len(kernel_size),
        )
    else:
        out_shape = conv_output_shape(x.spatial_shape, kernel_size, stride, padding, dilation)
    out_indices, nbr, nbr_t = ops.build_conv_map(
        x.indices, x.spatial_shape, x.batch_size, out_shape, kernel_size, stride, padding,
        dilation, transposed,
    )
    kmap = KernelMap(
        x.indices, out_indices, nbr, nbr_t, x.spatial_shape, out_shape, kernel_size, stride,
        padding, dilation, subm=False, transposed=transposed,
    )
    if indice_key is not None:
        x.indice_dict[indice_key] = kmap
    return kmap


def inverse_map(
    x: SparseConvTensor, kernel_size: tuple[int, ...], indice_key: Optional[str]
) -> KernelMap:
    """The map of the conv stored under ``indice_key``, to run it backwards on ``x``."""
    if indice_key is None:
        raise ValueError("an inverse conv needs the indice_key of the conv it inverts, got None")
    cached = x.find_indice_pair(indice_key)
    if cached is None:
        raise ValueError(
            f"indice_key {indice_key!r} not found in indice_dict (keys: {sorted(x.indice_dict)}): "
            "run the strided conv with this indice_key first"
        )
    if not isinstance(cached, KernelMap) or cached.subm:
        raise ValueError(f"indice_key {indice_key!r} holds a submanifold map; an inverse conv "
                         "needs the map of a strided conv or pool")
    if cached.kernel_size != kernel_size:
        raise ValueError(
            f"indice_key {indice_key!r} was built with kernel_size {list(cached.kernel_size)}, "
            f"the inverse conv has {list(kernel_size)}"
        )
    if cached.out_indices.shape[0] != x.indices.shape[0]:
        raise ValueError(
            f"the input has {x.indices.shape[0]} sites but the conv cached under {indice_key!r} "
            f"produced {cached.out_indices.shape[0]}"
        )
    return cached
