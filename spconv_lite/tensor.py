"""``SparseConvTensor``: features at active sites of a batched sparse grid (spconv 2.x API)."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

SpatialShape = Union[Sequence[int], np.ndarray, Tensor]


# Sites have int32 coordinates and batch indices, so no grid axis or batch may be larger.
MAX_GRID_SIZE = 2**31


def check_count(value: Any, name: str, *, least: int = 1,
                most: Optional[tuple[int, str]] = None) -> int:
    """``value`` as an int, after checking that it is a whole number (a Python, numpy or 0-d
    tensor int, not a bool) of at least ``least`` and at most ``most`` = (limit, its text)."""
    try:
        count = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < least:
        kind = "a positive int" if least == 1 else f"an int >= {least}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if most is not None and count > most[0]:
        raise ValueError(f"{name} must be at most {most[1]}, got {count}")
    return count


def _as_shape(spatial_shape: SpatialShape) -> list[int]:
    """Converts a list, tuple, numpy array or tensor of integer sizes into a list of Python
    ints; whole floats (41.0, as spconv takes them) are converted, fractions refused rather
    than truncated."""
    if isinstance(spatial_shape, Tensor):
        spatial_shape = spatial_shape.reshape(-1).tolist()
    elif isinstance(spatial_shape, np.ndarray):
        spatial_shape = spatial_shape.reshape(-1).tolist()
    try:
        shape = [_as_int(s) for s in spatial_shape]
    except TypeError as exc:
        raise TypeError(
            f"spatial_shape must be a sequence of ints, got {spatial_shape!r}"
        ) from exc
    if not 1 <= len(shape) <= 4 or any(s < 1 for s in shape):
        raise ValueError(f"spatial_shape must hold 1 to 4 positive sizes, got {shape}")
    if any(s > MAX_GRID_SIZE for s in shape):
        raise ValueError(f"spatial_shape sizes must be at most 2^31 (the int32 indices hold "
                         f"coordinates below 2^31), got {shape}")
    return shape


def _as_int(value: Any) -> int:
    """A Python, numpy or 0-d tensor integer, or a whole float, as an int; TypeError for other
    floats and for bools."""
    if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"expected an int, got the bool {value!r}")
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise TypeError(f"expected an int, got {value!r}")
        return int(value)
    if type(value) in (int, torch.SymInt):
        # operator.index would make a traced (symbolic) grid size a constant: a compiled model
        # then recompiled for every new spatial_shape
        return value
    return operator.index(value)


def site_keys(indices: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """One int64 key per row, row-major over (batch, *spatial_shape) as the C++ ops pack
    sites: equal keys are equal sites, and key order is (batch, z, y, x) order."""
    keys = indices[:, 0].long()
    for d, size in enumerate(spatial_shape):
        keys = keys * size + indices[:, d + 1].long()
    return keys


def site_ids(indices: Tensor, spatial_shape: Sequence[int], batch_size: int) -> Tensor:
    """One int64 id per row: equal for equal sites, ordered as the sites in (batch, z, y, x)
    order. The packed key (:func:`site_keys`) where every key fits int64, else the row's rank
    among the distinct rows (``unique(dim=0)``, an order of magnitude slower)."""
    if int(batch_size) * math.prod([int(n) for n in spatial_shape]) <= 2**63:
        return site_keys(indices, spatial_shape)
    return torch.unique(indices, dim=0, return_inverse=True)[1]


def check_indices(indices: Tensor, spatial_shape: Sequence[int]) -> None:
    """Raises TypeError or ValueError unless ``indices`` is an int32 ``[N, D + 1]`` tensor for
    the D dimensions of ``spatial_shape``."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int32:
        raise TypeError(f"indices must be int32, got {indices.dtype}")
    width = len(spatial_shape) + 1
    if indices.dim() != 2 or indices.shape[1] != width:
        raise ValueError(
            f"indices must have shape [N, {width}] (batch index then one column per "
            f"dimension of spatial_shape {spatial_shape}), got {list(indices.shape)}"
        )


def check_in_grid(indices: Tensor, spatial_shape: Sequence[int], batch_size: int) -> None:
    """Raises ValueError naming the first row of ``indices`` outside the batch and grid (and
    what check_indices raises): such rows' packed keys can equal real sites'. Under
    torch.compile the graph asserts it instead (RuntimeError, without the row)."""
    check_indices(indices, spatial_shape)
    compiling = torch.compiler.is_compiling()
    if not compiling and indices.shape[0] == 0:
        return
    bad = (indices < 0).any(dim=1)
    # Column by column, not against a tensor of sizes: an exported graph would hold that as a
    # constant. A size past int32 bounds no column (torch before 2.13 wrapped it to int32).
    for column, size in enumerate([batch_size, *spatial_shape]):
        if size <= torch.iinfo(indices.dtype).max:
            bad |= indices[:, column] >= size
    if compiling:  # (a traced grid is symbolic: formatting its sizes would break the graph)
        torch._assert_async(~bad.any(), "indices has rows outside the grid (a batch index or "
                                        "coordinate past batch_size / spatial_shape)")
    elif bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"indices row {row} = {indices[row].tolist()} is outside the grid: "
                         f"batch index must be in [0, {batch_size}) and coordinates inside "
                         f"spatial_shape {list(spatial_shape)}")


# How to fix the error, in its message (the C++ map builders say the same).
MERGE_DUPLICATES = ("merge each site's rows first (torch.unique(indices, dim=0, "
                    "return_inverse=True), then scatter_reduce of the features)")


def check_sites(indices: Tensor, spatial_shape: Sequence[int], batch_size: int) -> None:
    """Raises ValueError naming the first row of ``indices`` outside the batch and grid, or two
    rows that are the same site (and what check_indices raises).

    The C++ kernel-map builders check this in every mode; this check guards the paths that
    compare or combine sites without one (``dense()``, the global pools, ``sparse_add``).
    Under torch.compile the graph asserts it instead (RuntimeError, without the rows).
    """
    check_in_grid(indices, spatial_shape, batch_size)
    if torch.compiler.is_compiling():
        sorted_ids = site_ids(indices, spatial_shape, batch_size).sort().values
        # Each id against the one before it, gathered: inductor in torch 2.11 cannot lower a
        # slice of a sort whose size is data dependent (and roll guards on that size).
        positions = torch.arange(sorted_ids.shape[0], device=sorted_ids.device)
        previous = sorted_ids[(positions - 1).clamp(min=0)]
        differs = (sorted_ids != previous) | (positions == 0)
        torch._assert_async(differs.all(), "indices contains duplicate sites")
        return
    if indices.shape[0] == 0:
        return
    sorted_ids, order = site_ids(indices, spatial_shape, batch_size).sort(stable=True)
    repeated = (sorted_ids[1:] == sorted_ids[:-1]).nonzero()
    if repeated.shape[0]:
        j = int(repeated[0, 0])
        first, second = int(order[j]), int(order[j + 1])
        raise ValueError(
            f"indices contains duplicate sites: rows {first} and {second} are both "
            f"{indices[second].tolist()}; {MERGE_DUPLICATES}"
        )


def check_same_sites(x: "SparseConvTensor", other: "SparseConvTensor", what: str) -> None:
    """Raises ValueError unless ``other`` holds ``x``'s sites row for row (the same indices
    tensor, or equal contents, on the same grid), as an elementwise combination of their
    features needs; ``what`` names ``other`` in the message."""
    grid = (list(x.spatial_shape), x.batch_size)
    if (list(other.spatial_shape), other.batch_size) != grid:
        raise ValueError(
            f"{what} has spatial_shape {list(other.spatial_shape)} and batch_size "
            f"{other.batch_size}, not {grid[0]} and {grid[1]}: it must live on the same sites"
        )
    if other.indices is x.indices:
        return
    if torch.compiler.is_compiling():
        torch._check(other.indices.shape[0] == x.indices.shape[0])
        torch._assert_async((other.indices == x.indices).all(),
                            f"{what} must live on the same sites in the same row order")
    elif other.indices.shape != x.indices.shape or not torch.equal(other.indices, x.indices):
        raise ValueError(
            f"{what} must live on the same sites in the same row order, but its "
            f"{other.indices.shape[0]} rows of indices differ from the {x.indices.shape[0]} "
            "expected"
        )


class SparseConvTensor:
    """A batch of sparse grids: ``features[i]`` lives at site ``indices[i]``.

    Args:
        features: ``[N, C]``, floating point for the layers (integer or bool features, such
            as labels, can be made dense).
        indices: int32 ``[N, D + 1]``: batch index, then ``D`` coordinates (z, y, x in 3D).
        spatial_shape: ``D`` grid sizes (list, tuple, numpy array or tensor).
        batch_size: number of batch items.
        grid, voxel_num, benchmark, permanent_thrust_allocator, enable_timer, force_algo:
            accepted for spconv compatibility and ignored.
        indice_dict: kernel maps cached by ``indice_key``, for later layers to reuse: shared
            with this tensor's shadow copies (``replace_feature``); a layer's output gets a
            copy with the layer's map added, leaving its input's dict as it was (as spconv).

    Example:
        >>> features = torch.ones(2, 4)
        >>> indices = torch.tensor([[0, 0, 1, 2], [0, 3, 3, 3]], dtype=torch.int32)
        >>> x = SparseConvTensor(features, indices, [4, 4, 4], batch_size=1)
        >>> x.dense().shape
        torch.Size([1, 4, 4, 4, 4])
    """

    def __init__(
        self,
        features: Tensor,
        indices: Tensor,
        spatial_shape: SpatialShape,
        batch_size: int,
        grid: Optional[Tensor] = None,
        voxel_num: Optional[Tensor] = None,
        indice_dict: Optional[dict] = None,
        benchmark: bool = False,
        permanent_thrust_allocator: bool = False,
        enable_timer: bool = False,
        force_algo: Any = None,
    ) -> None:
        self.spatial_shape = spatial_shape
        self.batch_size = batch_size
        check_indices(indices, self.spatial_shape)
        self.indices = indices
        self._features = self._checked_features(features)
        self.check_rows()
        self.indice_dict: dict = {} if indice_dict is None else indice_dict
        self.grid = grid
        self.voxel_num = voxel_num
        self.benchmark = benchmark
        self.benchmark_record: dict = {}
        self.force_algo = force_algo
        self.int8_scale = None  # spconv's field for its int8 inference; none here

    def _checked_features(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.is_complex():
            # Integer and bool features are fine (spconv's too: labels or counts scattered
            # into a grid with dense()); the layers check for floating point themselves.
            raise TypeError(f"features must be a real tensor, got {features.dtype}")
        if features.dim() != 2:
            raise ValueError(f"features must be 2-D [N, C], got shape {list(features.shape)}")
        if features.device != self.indices.device:
            raise ValueError(
                f"features is on {features.device} but indices is on {self.indices.device}: "
                "they must be on the same device"
            )
        return features

    def check_rows(self) -> None:
        """Raises ValueError unless ``features`` has one row per row of ``indices``.

        Checked by the constructor and wherever the tensor is used (every layer, ``dense()``),
        not when ``features`` or ``indices`` is assigned: client code assigns the two one after
        the other (OpenPCDet's VoxelNeXt sets features of a new row count with
        ``replace_feature``, then the matching ``indices``), as spconv allows.
        """
        if torch.compiler.is_compiling():
            # Row counts may be data-dependent there (a strided conv's output): an assertion
            # in the graph, not a branch the tracer would have to guard on.
            torch._check(self.features.shape[0] == self.indices.shape[0])
        elif self.features.shape[0] != self.indices.shape[0]:
            raise ValueError(
                f"features has {self.features.shape[0]} rows but indices has "
                f"{self.indices.shape[0]}: they must match"
            )

    # Everything else reads ``self.features``, never ``self._features``: TorchDynamo before
    # torch 2.13 traces ``t.features = v`` as a plain attribute without calling the setter, so
    # inside a compiled region ``_features`` would still hold the old features.
    @property
    def features(self) -> Tensor:
        return self._features

    @features.setter
    def features(self, value: Tensor) -> None:
        # spconv 2.x forbids this; spconv 1.x code relies on it, so allow it with the same checks.
        self._features = self._checked_features(value)

    @property
    def spatial_shape(self) -> list[int]:
        return self._spatial_shape

    @spatial_shape.setter
    def spatial_shape(self, value: SpatialShape) -> None:
        self._spatial_shape = _as_shape(value)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        try:
            batch_size = _as_int(value)
        except TypeError:
            batch_size = 0
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {value!r}")
        if batch_size > MAX_GRID_SIZE:
            raise ValueError(f"batch_size must be at most 2^31 (the int32 indices hold batch "
                             f"indices below 2^31), got {value!r}")
        self._batch_size = batch_size

    def __repr__(self) -> str:
        return (
            f"SparseConvTensor(features={list(self.features.shape)}, "
            f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size})"
        )

    @property
    def spatial_size(self) -> int:
        return math.prod(self.spatial_shape)

    def replace_feature(self, feature: Tensor) -> "SparseConvTensor":
        """A tensor with the same sites and cached kernel maps and new features."""
        out = self.shadow_copy()
        out.features = feature
        return out

    def minus(self) -> "SparseConvTensor":
        """The negated features on the same sites (spconv API)."""
        return self.replace_feature(-self.features)

    @property
    def is_quantized(self) -> bool:
        """Always False: there are no int8-quantized features here (spconv API)."""
        return False

    def shadow_copy(self) -> "SparseConvTensor":
        """A new tensor sharing every field (including ``indice_dict``) with this one."""
        out = SparseConvTensor(
            self.features, self.indices, self.spatial_shape, self.batch_size,
            self.grid, self.voxel_num, self.indice_dict, self.benchmark,
        )
        out.benchmark_record = self.benchmark_record
        out.force_algo = self.force_algo
        return out

    def find_indice_pair(self, key: Optional[str]):
        """The kernel map cached under ``key``, or None."""
        if key is None:
            return None
        return self.indice_dict.get(key)

    def dense(self, channels_first: bool = True) -> Tensor:
        """Dense tensor ``[B, C, *spatial]`` (or ``[B, *spatial, C]``), zero at inactive sites."""
        self.check_rows()
        check_sites(self.indices, self.spatial_shape, self.batch_size)
        channels = self.features.shape[1]
        if channels_first:
            out = self.features.new_zeros([self.batch_size, channels, *self.spatial_shape])
            sites = out.movedim(1, -1)  # a channels-last view: rows are written in place
        else:
            out = sites = self.features.new_zeros([self.batch_size, *self.spatial_shape, channels])
        index = self.indices.to(self.features.device).long()
        sites.index_put_(tuple(index.t()), self.features)
        return out

    @classmethod
    def from_dense(cls, x: Tensor) -> "SparseConvTensor":
        """Sparse tensor of the sites of a channels-last ``[B, *spatial, C]`` tensor where any
        channel is nonzero."""
        if x.dim() < 3:
            raise ValueError(
                f"x must be [B, *spatial, C] with 1 to 4 spatial dims, got {list(x.shape)}"
            )
        sparse = x.to_sparse(x.dim() - 1).coalesce()
        indices = sparse.indices().t().contiguous().int()
        return cls(sparse.values(), indices, list(x.shape[1:-1]), x.shape[0])

    def __add__(self, other: Union["SparseConvTensor", Tensor]) -> "SparseConvTensor":
        """Sum of the features of two tensors on the same sites (or of a feature tensor);
        ``spconv_lite.functional.sparse_add`` sums tensors whose sites differ."""
        if isinstance(other, SparseConvTensor):
            check_same_sites(self, other, "the SparseConvTensor added")
            other = other.features
        return self.replace_feature(self.features + other)

    __radd__ = __add__


@dataclasses.dataclass
class _SparseConvTensorFields:
    """The fields through which torch's distributed wrappers see a ``SparseConvTensor``.

    ``indices`` comes first: helpers that rebuild a dataclass by setting its fields one by one
    in this order (Lightning's ``move_data_to_device``, run on every batch) then move the
    indices before the features, whose setter checks that both are on one device."""

    indices: Tensor
    features: Tensor
    spatial_shape: list
    batch_size: int
    indice_dict: dict


# DistributedDataParallel (find_unused_parameters=True) and FSDP2 (fully_shard) look for a
# module's output tensors in lists, tuples, dicts and dataclasses only: in an opaque object they
# find none, so DDP marks every parameter unused and then fails ("marked as ready twice"), and
# FSDP2 registers no pre-backward hook (a layer wrapped on its own reads freed parameters in
# backward; a wrapped root never reduces its gradients: silently wrong training). Listing the
# fields as a dataclass's lets them reach ``features``; ``dataclasses.replace`` rebuilds the
# tensor through the constructor with its cached maps.
SparseConvTensor.__dataclass_fields__ = _SparseConvTensorFields.__dataclass_fields__
