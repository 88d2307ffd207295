"""Kernel maps for conv and pool layers, and their cache in ``SparseConvTensor.indice_dict``.

This is the one place that decides output sites and output grid sizes, and that reuses or
builds a map for a given ``indice_key``.
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .tensor import MAX_GRID_SIZE, SparseConvTensor, check_in_grid, site_keys

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


# The least value of each conv argument, as torch's convs accept.
_GEOMETRY_MINIMUM = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1,
                     "output_padding": 0}


def expand_geometry(ndim: int, **values: IntOrSeq) -> tuple[tuple[int, ...], ...]:
    """The given conv arguments (``kernel_size``, ``stride``, ``padding``, ``dilation``,
    ``output_padding``), each as ``ndim`` ints, in the order given.

    Raises:
        ValueError: naming the argument, when an entry is below its minimum (1, or 0 for the
            paddings).
    """
    expanded = []
    for name, value in values.items():
        entries = expand_nd(ndim, value, name)
        minimum = _GEOMETRY_MINIMUM[name]
        if any(v < minimum for v in entries):
            raise ValueError(f"{name} entries must be >= {minimum}, got {list(entries)}")
        expanded.append(entries)
    return tuple(expanded)


def _check_fits_int32(shape: list[int], layer: str) -> None:
    if any(n > MAX_GRID_SIZE for n in shape):
        raise ValueError(
            f"{layer} gives an output spatial_shape {shape} with sizes above 2**31: its "
            "coordinates would not fit the int32 indices"
        )


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
    _check_fits_int32(shape, f"a conv of spatial_shape {list(spatial_shape)} with stride "
                             f"{list(stride)} and padding {list(padding)}")
    return shape


def check_output_padding(output_padding, stride, dilation) -> None:
    """Raises ValueError unless each output padding is below its stride or its dilation, as
    torch's transposed convs require."""
    if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
        raise ValueError(
            f"output_padding {list(output_padding)} must be smaller than either stride "
            f"{list(stride)} or dilation {list(dilation)} in each dimension"
        )


def conv_transpose_output_shape(
    spatial_shape: Sequence[int], kernel_size, stride, padding, dilation, output_padding
) -> list[int]:
    """Output grid of a transposed conv, as ``torch.nn.functional.conv_transpose3d``."""
    check_output_padding(output_padding, stride, dilation)
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
    _check_fits_int32(shape, f"a transposed conv of spatial_shape {list(spatial_shape)} with "
                             f"kernel_size {list(kernel_size)} and stride {list(stride)}")
    return shape


@dataclass
class KernelMap:
    """A kernel map between the sites of two grids, as cached in ``indice_dict``.

    The map is a promise about sites: it may serve only the very ``in_indices`` it was built
    for (same tensor at the same version, or equal contents), on the same grid and batch size.
    ``in_version`` / ``out_version`` are the tensors' versions when the map was built (in a
    copy: their versions when copied, or -1 where they had been edited), so an in-place edit of
    either (``x.indices[:, 1:] *= 2``) is detected.
    """

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
    batch_size: int = 1
    output_padding: tuple[int, ...] = ()
    in_version: int = 0
    out_version: int = 0
    # Row orders of nbr / nbr_t for the CUDA conv kernels (ops.conv_row_order), built on first
    # use by row_orders() with order_splits splits.
    order: Optional[Tensor] = None
    order_t: Optional[Tensor] = None
    order_splits: int = 0

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)

    # spconv's names for the same tables (its IndiceData / ImplicitGemmIndiceData), read by
    # client code such as FLOP counters: (pair_fwd >= 0).sum() is the number of pairs.
    @property
    def indices(self) -> Tensor:
        """The input sites (spconv's ``indices``)."""
        return self.in_indices

    @property
    def spatial_shape(self) -> list[int]:
        """The input grid (spconv's ``spatial_shape``)."""
        return self.in_spatial_shape

    @property
    def is_subm(self) -> bool:
        """Whether this is a submanifold map (spconv's ``is_subm``)."""
        return self.subm

    @property
    def ksize(self) -> list[int]:
        """The kernel size (spconv's ``ksize``)."""
        return list(self.kernel_size)

    @property
    def pair_fwd(self) -> Tensor:
        """``[K, N_out]``: the input row of each output row at each offset, or -1."""
        return self.nbr.t()

    @property
    def pair_bwd(self) -> Tensor:
        """``[K, N_in]``: the output row of each input row at each offset, or -1."""
        return self.nbr_t.t()

    @property
    def indice_pairs(self) -> Tensor:
        """``[2, K, N_in]`` int32, spconv's native pair lists: at offset ``k``, ``[0, k, :n_k]``
        the input rows that have a pair there (increasing), ``[1, k, :n_k]`` their output rows,
        -1 after (``n_k = indice_pair_num[k]``). Read by clients such as SphereFormer."""
        nbr_t = self.nbr_t.t()  # [K, N_in]
        # A stable sort of "has no pair" moves each offset's paired input rows to the front,
        # in increasing order: the sort's permutation is then those rows themselves.
        rows = torch.argsort((nbr_t < 0).to(torch.int8), dim=1, stable=True)
        out_rows = nbr_t.gather(1, rows)
        pair_in = torch.where(out_rows >= 0, rows, -1)
        return torch.stack([pair_in, out_rows]).to(torch.int32)

    @property
    def indice_pair_num(self) -> Tensor:
        """``[K]`` int32: the number of pairs at each offset."""
        return (self.nbr >= 0).sum(dim=0, dtype=torch.int32)

    # Copies (deepcopy, pickle, a DataLoader worker's queue) restart their tensors' version
    # counters, so a copy keeps whether each indices tensor was edited since the build, not
    # the count: an edited one stays edited, an unedited one is unedited at its new version.
    # (A map pickled before these flags existed keeps its stored versions.)
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["in_edited"] = _edited_in_place(self.in_indices, self.in_version)
        state["out_edited"] = _edited_in_place(self.out_indices, self.out_version)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        in_edited, out_edited = state.pop("in_edited", None), state.pop("out_edited", None)
        self.__dict__.update(state)
        if in_edited is not None:
            self.in_version = _EDITED if in_edited else _version(self.in_indices)
        if out_edited is not None:
            self.out_version = _EDITED if out_edited else _version(self.out_indices)


def rows_variant() -> int:
    """N of ``rows=N`` in ``SPCONV_LITE_CUDA_VARIANTS`` (the CUDA kernel variants, listed in
    include/spconv_lite/cuda_utils.cuh, where the C++ side reads the others): the splits of the
    row orders the CUDA conv kernels get; 0, the default, for none."""
    for item in os.environ.get("SPCONV_LITE_CUDA_VARIANTS", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "rows":
            if not value.strip().isdigit():
                raise ValueError(f"SPCONV_LITE_CUDA_VARIANTS: rows={value} is not a number of "
                                 "splits (rows=0 .. 8)")
            return int(value)
    return 0


def _row_order_splits(kmap: KernelMap) -> int:
    """Splits of the row orders for a conv over ``kmap``: :func:`rows_variant`, at most the kernel
    volume; 0 on the CPU (whose kernels do not use them) and for a one-offset kernel."""
    if not kmap.nbr.is_cuda or kmap.kernel_volume <= 1:
        return 0
    return min(rows_variant(), kmap.kernel_volume)


def row_orders(kmap: KernelMap, inverse: bool = False) -> tuple[Optional[Tensor],
                                                                 Optional[Tensor]]:
    """``(order, order_t)`` for ``ops.sparse_conv`` over ``kmap``'s tables (swapped when
    ``inverse``): built once per map and cached on it, the one of the input gradient's table only
    while gradients are on; ``(None, None)`` when no row orders are wanted."""
    splits = _row_order_splits(kmap)
    if splits == 0:
        return None, None
    if kmap.order_splits != splits:
        kmap.order, kmap.order_t, kmap.order_splits = None, None, splits
    need_order = not inverse or torch.is_grad_enabled()
    need_order_t = inverse or torch.is_grad_enabled()
    if need_order and kmap.order is None:
        kmap.order = ops.conv_row_order(kmap.nbr, splits)
    if need_order_t and kmap.order_t is None:
        kmap.order_t = ops.conv_row_order(kmap.nbr_t, splits)
    return (kmap.order_t, kmap.order) if inverse else (kmap.order, kmap.order_t)


def _version_unknown(t: Tensor) -> bool:
    # torch.compile treats a tensor's version as data, and inference tensors
    # (torch.inference_mode) keep no version counter: there identity stands for it, so an
    # in-place edit goes unnoticed (as in spconv, which never checks).
    return torch.compiler.is_compiling() or t.is_inference()


# A version no tensor has: the map's sites were edited in place before it was copied.
_EDITED = -1


def _version(t: Tensor) -> int:
    return 0 if _version_unknown(t) else t._version


def _edited_in_place(t: Tensor, version: int) -> bool:
    """Whether ``t`` was modified in place since it had ``version`` (never known while
    tracing, nor for inference tensors)."""
    return not _version_unknown(t) and t._version != version


def _describe_difference(built: Tensor, given: Tensor, spatial_shape: Sequence[int]) -> str:
    """How the sites of ``given`` differ from those of ``built`` (for error messages only)."""
    if built.shape != given.shape:
        return f"the map is over {built.shape[0]} sites, this input has {given.shape[0]}"
    built_keys, given_keys = site_keys(built, spatial_shape), site_keys(given, spatial_shape)
    missing = int((~torch.isin(given_keys, built_keys)).sum())
    if missing:
        return f"{missing} of this input's {given.shape[0]} sites are not sites of the map"
    return f"this input has the map's {given.shape[0]} sites in another row order"


def _check_sites(key: str, role: str, built: Tensor, version: int, given: Tensor,
                 spatial_shape: Sequence[int]) -> None:
    """Raises ValueError unless ``given`` holds exactly the sites (rows in order) ``built`` held
    when the map cached under ``key`` was made; ``role`` names them in the message."""
    if torch.compiler.is_compiling():
        # Identity is a trace-time fact; other tensors are compared when the graph runs.
        if given is not built:
            torch._check(given.shape[0] == built.shape[0])
            torch._assert_async(
                (given == built).all(), f"indice_key {key!r}: the input's sites differ from the "
                f"{role} the cached kernel map was built for")
        return
    if _edited_in_place(built, version):
        raise ValueError(
            f"indice_key {key!r}: the {role} the cached kernel map was built for were modified "
            "in place after it was built, so the map may no longer fit them; edit a copy "
            "(indices = indices.clone()) or use a new indice_key"
        )
    if given is built or (given.shape == built.shape and torch.equal(given, built)):
        return
    raise ValueError(
        f"indice_key {key!r} caches the kernel map of other sites: "
        f"{_describe_difference(built, given, spatial_shape)}. A key must only be reused on the "
        "sites it was built for (in the same row order); use another indice_key"
    )


def _check_grid(what: str, spatial_shape: Sequence[int], batch_size: int,
                x: SparseConvTensor) -> None:
    """Raises ValueError unless ``x`` is on this grid; ``what`` begins the message."""
    if (list(spatial_shape), batch_size) != (list(x.spatial_shape), x.batch_size):
        raise ValueError(
            f"{what} spatial_shape {list(spatial_shape)} with batch_size {batch_size}, but "
            f"this input has spatial_shape {list(x.spatial_shape)} and batch_size "
            f"{x.batch_size}"
        )


def _check_reuse(key: str, cached, geometry: dict, x: SparseConvTensor) -> None:
    """Raises ValueError unless the map cached under ``key`` is the map of ``x``'s sites with
    this layer's geometry."""
    if not isinstance(cached, KernelMap):
        raise ValueError(f"indice_key {key!r} holds {type(cached).__name__}, not a kernel map")
    seen = {name: getattr(cached, name) for name in geometry}
    if seen != geometry:
        raise ValueError(
            f"indice_key {key!r} is reused with a different geometry: the cached map has "
            f"{seen}, this layer asks for {geometry}"
        )
    _check_grid(f"indice_key {key!r} caches a map over", cached.in_spatial_shape,
                cached.batch_size, x)
    _check_sites(key, "input sites", cached.in_indices, cached.in_version, x.indices,
                 x.spatial_shape)


# The grid on which an indices tensor's sites were found valid (inside it and distinct), by
# tensor: (its version then, spatial_shape, batch_size). Set in eager mode on the sites a map
# built or checked, with or without an indice_key (a keyless pool's output, a keyless
# submanifold layer's input), so that the next submanifold map over them skips the check. Not
# an attribute of the tensor: that would travel with copies, whose version counters restart.
_valid_sites = WeakIdKeyDictionary()


def _mark_valid_sites(indices: Tensor, spatial_shape: Sequence[int], batch_size: int) -> None:
    if not torch.compiler.is_compiling():
        _valid_sites[indices] = (_version(indices), tuple(spatial_shape), batch_size)


def _sites_of_a_map(x: SparseConvTensor) -> bool:
    """Whether ``x``'s indices are, unedited and on the same grid, sites a map found valid: the
    output sites of a regular or transposed conv map or the input sites a map checked (in its
    ``indice_dict``, or marked on the tensor in eager mode). Such sites are in the grid and
    distinct, so a submanifold map over them needs no check (on a GPU: no host
    synchronisation). Inference tensors are always checked: an edit would go unnoticed."""
    if not torch.compiler.is_compiling():
        if x.indices.is_inference():
            return False
        mark = _valid_sites.get(x.indices)
        if mark == (_version(x.indices), tuple(x.spatial_shape), x.batch_size):
            return True
    for kmap in x.indice_dict.values():
        if not isinstance(kmap, KernelMap) or kmap.subm or kmap.batch_size != x.batch_size:
            continue
        for sites, version, shape in ((kmap.out_indices, kmap.out_version,
                                       kmap.out_spatial_shape),
                                      (kmap.in_indices, kmap.in_version, kmap.in_spatial_shape)):
            if (sites is x.indices and list(shape) == list(x.spatial_shape)
                    and not _edited_in_place(sites, version)):
                return True
    return False


def subm_map(
    x: SparseConvTensor, kernel_size: tuple[int, ...], dilation: tuple[int, ...],
    indice_key: Optional[str],
) -> KernelMap:
    """The submanifold map of ``x``, reused from ``indice_dict[indice_key]`` when present."""
    geometry = {"kernel_size": kernel_size, "dilation": dilation, "subm": True}
    cached = x.find_indice_pair(indice_key)
    if cached is not None:
        _check_reuse(indice_key, cached, geometry, x)
        return cached
    nbr, nbr_t = ops.build_subm_map(x.indices, x.spatial_shape, x.batch_size, kernel_size,
                                    dilation, check_sites=not _sites_of_a_map(x))
    _mark_valid_sites(x.indices, x.spatial_shape, x.batch_size)
    ndim = len(kernel_size)
    version = _version(x.indices)
    kmap = KernelMap(
        x.indices, x.indices, nbr, nbr_t, x.spatial_shape, x.spatial_shape, kernel_size,
        (1,) * ndim, tuple((k - 1) // 2 * d for k, d in zip(kernel_size, dilation)), dilation,
        subm=True, transposed=False, batch_size=x.batch_size, in_version=version,
        out_version=version,
    )
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
    """The map of a regular or transposed conv (or pool) over ``x``, reused from
    ``indice_dict[indice_key]`` when present (the layer's output carries it under that key, see
    ``output_maps``, so that an inverse conv can undo it)."""
    ndim = len(kernel_size)
    output_padding = output_padding if transposed and output_padding else (0,) * ndim
    geometry = {
        "kernel_size": kernel_size, "stride": stride, "padding": padding,
        "dilation": dilation, "subm": False, "transposed": transposed,
        "output_padding": output_padding,
    }
    cached = x.find_indice_pair(indice_key)
    if cached is not None:
        _check_reuse(indice_key, cached, geometry, x)
        if _edited_in_place(cached.out_indices, cached.out_version):
            raise ValueError(
                f"indice_key {indice_key!r}: the output indices of the cached kernel map were "
                "modified in place, so reusing the map would return the edited sites; edit a "
                "copy (indices = indices.clone()) or use a new indice_key"
            )
        return cached
    if transposed:
        out_shape = conv_transpose_output_shape(
            x.spatial_shape, kernel_size, stride, padding, dilation, output_padding
        )
    else:
        out_shape = conv_output_shape(x.spatial_shape, kernel_size, stride, padding, dilation)
    out_indices, nbr, nbr_t = ops.build_conv_map(
        x.indices, x.spatial_shape, x.batch_size, out_shape, kernel_size, stride, padding,
        dilation, transposed,
    )
    # The map checked its input sites and made valid output sites.
    _mark_valid_sites(x.indices, x.spatial_shape, x.batch_size)
    _mark_valid_sites(out_indices, out_shape, x.batch_size)
    kmap = KernelMap(
        x.indices, out_indices, nbr, nbr_t, x.spatial_shape, out_shape, kernel_size, stride,
        padding, dilation, subm=False, transposed=transposed, batch_size=x.batch_size,
        output_padding=output_padding, in_version=_version(x.indices),
        out_version=_version(out_indices),
    )
    return kmap


def identity_table(x: SparseConvTensor) -> Tensor:
    """The neighbour table of a 1x1 layer run on ``x``'s own rows (row r reaches row r),
    ``[N, 1]`` int32. Sites no map has checked yet are checked (in the grid, distinct) by the
    map builder, which does so in every mode, torch.compile included, and whose one-offset
    table is this identity."""
    if _sites_of_a_map(x):
        return torch.arange(x.indices.shape[0], dtype=torch.int32,
                            device=x.indices.device).unsqueeze(1)
    ones = [1] * len(x.spatial_shape)
    nbr, _ = ops.build_subm_map(x.indices, list(x.spatial_shape), x.batch_size, ones, ones)
    _mark_valid_sites(x.indices, x.spatial_shape, x.batch_size)
    return nbr


def output_maps(x: SparseConvTensor, indice_key: Optional[str],
                kmap: Optional[KernelMap]) -> dict:
    """The ``indice_dict`` of a layer's output: a copy of the input's, with the layer's map
    under its ``indice_key``. As in spconv, the input's own dict is left as it was, so a map is
    seen only downstream of the layer that made it: branches that reuse a key on one input each
    build their own map, and an input run again after an in-place edit gets new maps."""
    maps = dict(x.indice_dict)
    if indice_key is not None and kmap is not None:
        maps[indice_key] = kmap
    return maps


def inverse_map(
    x: SparseConvTensor, kernel_size: tuple[int, ...], indice_key: Optional[str]
) -> tuple[KernelMap, Optional[Tensor]]:
    """The map of the conv stored under ``indice_key``, to run it backwards on ``x``.

    ``x`` must hold the output sites of that conv, in any row order. Returns the map and
    ``None`` when ``x``'s rows are the map's output rows in order, else the row index that
    puts ``x``'s rows in the map's order (``x.features[index]``).
    """
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
    _check_grid(f"the conv cached under {indice_key!r} produced", cached.out_spatial_shape,
                cached.batch_size, x)
    if _edited_in_place(cached.in_indices, cached.in_version):
        raise ValueError(
            f"indice_key {indice_key!r}: the input indices of the conv cached under it were "
            "modified in place, so the inverse conv cannot return them; edit a copy "
            "(indices = indices.clone())"
        )
    if _edited_in_place(cached.out_indices, cached.out_version):
        raise ValueError(
            f"indice_key {indice_key!r}: the output indices of the conv cached under it were "
            "modified in place, so its output sites are no longer known; edit a copy "
            "(indices = indices.clone())"
        )
    if x.indices is cached.out_indices:
        return cached, None
    return cached, _rows_in_map_order(indice_key, cached, x)


def _rows_in_map_order(key: str, kmap: KernelMap, x: SparseConvTensor) -> Optional[Tensor]:
    """``None`` when ``x.indices`` equals ``kmap.out_indices``, else the index ``r`` with
    ``x.indices[r]`` equal to it (the same sites in another row order); raises ValueError
    naming the key when ``x`` has other sites."""
    compiling = torch.compiler.is_compiling()
    if compiling:
        torch._check(x.indices.shape[0] == kmap.out_indices.shape[0])
    elif x.indices.shape[0] != kmap.out_indices.shape[0]:
        raise ValueError(
            f"the input has {x.indices.shape[0]} sites but the conv cached under {key!r} "
            f"produced {kmap.out_indices.shape[0]}"
        )
    elif torch.equal(x.indices, kmap.out_indices):
        return None
    check_in_grid(x.indices, x.spatial_shape, x.batch_size)  # their keys can alias real sites
    given, x_order = site_keys(x.indices, x.spatial_shape).sort()
    produced, map_order = site_keys(kmap.out_indices, kmap.out_spatial_shape).sort()
    if compiling:
        torch._assert_async((given == produced).all(), "the inverse conv's input has other "
                            f"sites than the conv cached under {key!r} produced")
    elif not torch.equal(given, produced):
        missing = int((~torch.isin(given, produced)).sum())
        raise ValueError(
            f"the inverse conv's input has other sites than the conv cached under {key!r} "
            f"produced: {missing} of its {x.indices.shape[0]} sites are not among them"
            + ("" if missing else " (it has duplicate sites)")
        )
    # Row map_order[j] of the conv's outputs is row x_order[j] of x.
    return torch.empty_like(x_order).index_put_((map_order,), x_order)
