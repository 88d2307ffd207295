"""Typed wrappers over the ``torch.ops.spconv_lite`` operators, with fake kernels and autograd.

Every operator is defined once in ``src/registration.cpp`` and implemented per device in C++.
This module registers, for each of them, a fake kernel (shapes only, so ``torch.compile`` and
``torch.export`` can trace them) and, for the differentiable ones, the backward formula. Modules
never call ``torch.ops.spconv_lite`` directly, only these functions.

A kernel map is a pair of neighbour tables (int32, -1 where there is no neighbour):

* ``nbr``   ``[N_out, K]``: the input row feeding output row ``o`` through kernel offset ``k``;
* ``nbr_t`` ``[N_in, K]``: the output row fed by input row ``i`` through kernel offset ``k``.

Kernel offsets are numbered in row-major order over the kernel size, without flipping (the
cross-correlation convention of ``torch.nn.functional.conv3d``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from ._extension import _C  # noqa: F401  (loads the library, which registers the operators)
from .tensor import _as_int

_ops = torch.ops.spconv_lite

__all__ = [
    "build_subm_map",
    "build_conv_map",
    "sparse_conv",
    "conv_row_order",
    "sparse_sum_pool",
    "sparse_max_pool",
    "voxelize",
    "voxelize_mean",
]


def build_subm_map(
    indices: Tensor,
    spatial_shape: Sequence[int],
    batch_size: int,
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    check_sites: bool = True,
) -> tuple[Tensor, Tensor]:
    """Kernel map of a submanifold convolution (output sites = input sites).

    Args:
        indices: int32 ``[N, D + 1]``, batch index then coordinates; unique sites.
        spatial_shape: ``D`` grid sizes.
        batch_size: number of batch items.
        kernel_size: ``D`` odd kernel sizes.
        dilation: ``D`` dilations.
        check_sites: ``False`` when the sites are known to be in the grid and distinct (the
            output sites of a conv map): on a GPU the op then skips its check and the host
            synchronisation it costs, and bad sites give wrong tables, not an error. The CPU
            op checks them either way (its check costs no synchronisation).

    Returns:
        ``(nbr, nbr_t)``, both int32 ``[N, K]``.

    Example:
        >>> idx = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2]], dtype=torch.int32)
        >>> nbr, _ = build_subm_map(idx, [4, 4, 4], 1, [3, 3, 3], [1, 1, 1])
        >>> nbr[0, 13].item(), nbr[0, 14].item()  # centre offset, then +1 in x
        (0, 1)
    """
    return _ops.build_subm_map(
        indices, list(spatial_shape), _whole(batch_size, "batch_size"), list(kernel_size),
        list(dilation), bool(check_sites),
    )


def build_conv_map(
    indices: Tensor,
    spatial_shape: Sequence[int],
    batch_size: int,
    out_spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel map of a regular (or transposed) convolution or pooling window.

    A regular conv connects input site ``x`` to output site ``o`` through offset ``k`` when
    ``o * stride - padding + k * dilation == x``; a transposed conv when
    ``x * stride - padding + k * dilation == o``. The output sites are every site reached by an
    input, sorted by batch then coordinates, so the result is deterministic.

    Returns:
        ``(out_indices, nbr, nbr_t)``: int32 ``[N_out, D + 1]``, ``[N_out, K]``, ``[N_in, K]``.
    """
    return _ops.build_conv_map(
        indices,
        list(spatial_shape),
        _whole(batch_size, "batch_size"),
        list(out_spatial_shape),
        list(kernel_size),
        list(stride),
        list(padding),
        list(dilation),
        bool(transposed),
    )


def sparse_conv(features: Tensor, weight: Tensor, nbr: Tensor, nbr_t: Tensor, *,
                order: Optional[Tensor] = None, order_t: Optional[Tensor] = None,
                check_tables: bool = True) -> Tensor:
    """Gather-GEMM-scatter: ``out[o] = sum_k features[nbr[o, k]] @ weight[k]``.

    Args:
        features: ``[N_in, C_in]``.
        weight: ``[K, C_in, C_out]`` (any strides).
        nbr: int32 ``[N_out, K]``.
        nbr_t: int32 ``[N_in, K]``, the transposed table (used by the backward pass).
        order, order_t: optional row orders of ``nbr`` and ``nbr_t``
            (:func:`conv_row_order`), for the CUDA kernels; the result is the same without.
        check_tables: raise ``ValueError`` now if an entry of ``nbr`` is not -1 or a row of
            ``features``, or one of ``nbr_t`` not -1 or an output row, or a row of an order is
            not a permutation (one pass over the tables; on a GPU, one host synchronisation).
            The layers pass ``False`` for the maps the library built.

    Returns:
        ``[N_out, C_out]`` in the dtype of ``features``.
    """
    if check_tables:
        _check_tables(features, nbr, nbr_t)
        for rows_order, name, table in ((order, "order", nbr), (order_t, "order_t", nbr_t)):
            if rows_order is not None:
                _check_row_order(rows_order, name, table)
    return _run("sparse_conv", features, weight, nbr, nbr_t, order, order_t)


def conv_row_order(nbr: Tensor, splits: int) -> Tensor:
    """Row orders of a neighbour table for the CUDA conv kernels.

    The kernel offsets are cut into ``splits`` contiguous ranges; for each, the rows are sorted
    (stably) by their neighbour mask over the range, so that rows with the same neighbour
    pattern share the kernels' tiles, which skip the offsets none of their rows has. A conv
    given these orders runs one pass per range; every output row still sums its offsets in
    increasing order.

    Args:
        nbr: int32 ``[R, K]`` neighbour table.
        splits: number of ranges, ``1 <= splits <= min(8, K)``.

    Returns:
        int32 ``[splits, R]``: row ``s`` is a permutation of ``0 .. R-1``.

    Example:
        >>> nbr = torch.tensor([[0, -1], [-1, 1], [2, 3]], dtype=torch.int32)
        >>> conv_row_order(nbr, 1).tolist()  # masks 0b01, 0b10, 0b11
        [[0, 1, 2]]
        >>> conv_row_order(nbr, 2).tolist()  # by offset 0, then by offset 1
        [[1, 0, 2], [0, 1, 2]]
    """
    return _ops.conv_row_order(nbr, int(splits))


def _check_row_order(order: Tensor, name: str, table: Tensor) -> None:
    """Raises ``ValueError`` unless every row of ``order`` is a permutation of ``table``'s rows
    (one sort and, on a GPU, one host synchronisation). An order of the wrong shape or dtype is
    left to the op, whose message names them."""
    if (torch.compiler.is_compiling() or not isinstance(order, Tensor) or order.dim() != 2
            or order.shape[1] != table.shape[0] or order.dtype != torch.int32
            or order.numel() == 0):
        return
    order = _whole_batch(order)
    expected = torch.arange(order.shape[-1], device=order.device, dtype=order.dtype)
    if not bool((order.sort(dim=-1).values == expected).all()):
        raise ValueError(f"{name} is not a row order: a row of it is not a permutation of "
                         f"0 .. {order.shape[-1] - 1}")


def sparse_sum_pool(features: Tensor, nbr: Tensor, nbr_t: Tensor, *,
                    check_tables: bool = True) -> Tensor:
    """``out[o] = sum_k features[nbr[o, k]]`` over the active neighbours (``check_tables`` as
    in :func:`sparse_conv`)."""
    if check_tables:
        _check_tables(features, nbr, nbr_t)
    return _run("sparse_sum_pool", features, nbr, nbr_t)


def sparse_max_pool(features: Tensor, nbr: Tensor, nbr_t: Tensor, *,
                    check_tables: bool = True) -> Tensor:
    """``out[o, c] = max_k features[nbr[o, k], c]`` over the active neighbours (true maximum;
    ``check_tables`` as in :func:`sparse_conv`)."""
    if check_tables:
        _check_tables(features, nbr, nbr_t)
    return _run("sparse_max_pool", features, nbr, nbr_t)[0]


def _check_tables(features: Tensor, nbr: Tensor, nbr_t: Tensor) -> None:
    """Raises ``ValueError`` unless every entry of ``nbr`` is -1 or a row of ``features`` and
    every entry of ``nbr_t`` is -1 or a row of ``nbr`` (an output row).

    The ops themselves check ``nbr`` on the CPU; on a GPU they only stop with a device-side
    assertion, which breaks every later CUDA call of the process, so hand-made tables are checked
    here first: one pass over the tables and, on a GPU, one host synchronisation. Tables whose
    shapes do not fit are left to the op, whose message names the shape. Skipped inside
    ``torch.compile``, where a data-dependent check cannot be traced.
    """
    if torch.compiler.is_compiling() or not _tables_fit(features, nbr, nbr_t):
        return
    for table, name, rows, what in ((nbr, "nbr", features.shape[0], "the given features"),
                                    (nbr_t, "nbr_t", nbr.shape[0], "the output rows")):
        if table.numel() == 0:
            continue
        low, high = torch.stack(torch.aminmax(_whole_batch(table))).tolist()
        if low < -1 or high >= rows:
            raise ValueError(f"{name} has entries outside [-1, {rows}): it does not index {what} "
                             f"(seen {low} .. {high})")


def _whole_batch(tensor: Tensor) -> Tensor:
    """Under torch.func.vmap, the tensor of every batch entry (a batched tensor has no data of
    its own to check); otherwise ``tensor`` itself."""
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        batch_dim = torch._C._functorch.maybe_get_bdim(tensor)
        tensor = torch._C._functorch.get_unwrapped(tensor)
        if batch_dim >= 0:  # batch dimensions first, so the last stays the entries' last
            tensor = tensor.movedim(batch_dim, 0)
    return tensor


def _tables_fit(features, nbr, nbr_t) -> bool:
    """Whether the arguments have the shapes and dtypes the ops accept (their entries aside)."""
    tensors = (features, nbr, nbr_t)
    if not all(isinstance(t, Tensor) and t.dim() == 2 for t in tensors):
        return False
    return (nbr.dtype == nbr_t.dtype == torch.int32 and nbr.shape[1] == nbr_t.shape[1]
            and nbr_t.shape[0] == features.shape[0])


def _detached_points(points) -> Tensor:
    """``points`` detached (voxelizing is not differentiable); a non-tensor raises TypeError
    naming the argument, as the op's schema check did before the detach."""
    if not isinstance(points, Tensor):
        raise TypeError(f"points must be a torch.Tensor, got {type(points).__name__}")
    return points.detach()


def voxelize(
    points: Tensor,
    voxel_size: Sequence[float],
    range_min: Sequence[float],
    grid_size: Sequence[int],
    max_points_per_voxel: int,
    max_voxels: int,
    empty_mean: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Groups points into voxels (spconv's ``PointToVoxel``; use ``spconv_lite.PointToVoxel``).

    A point's voxel along axis ``d`` is ``floor((p[d] - range_min[d]) / voxel_size[d])``
    computed in the points' precision (float32 or float64, as spconv) with the float32 size
    and range; points outside ``[0, grid_size)`` or with a non-finite value are
    dropped. Voxels are numbered in order of their first point; voxels past ``max_voxels`` are
    dropped.

    Args:
        points: float32 or float64 ``[N, C]``, coordinates (x, y, z) first.
        voxel_size, range_min, grid_size: per axis, in x, y, z order.
        max_points_per_voxel: slots per voxel; a voxel keeps its first points in input order.
        max_voxels: at most this many voxels.
        empty_mean: fill free slots with the mean of the voxel's points instead of zeros.

    Returns:
        ``(voxels [M, max_points_per_voxel, C] float32, coordinates [M, D] int32 (z, y, x),
        num_points_per_voxel [M] int32, point_voxel_id [N] int64, -1 for dropped points)``.

    Example:
        >>> pts = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.1, 0.1], [1.5, 0.1, 0.1]])
        >>> v, c, n, ids = voxelize(pts, [1, 1, 1], [0, 0, 0], [2, 2, 2], 4, 10)
        >>> c.tolist(), n.tolist(), ids.tolist()
        ([[0, 0, 0], [0, 0, 1]], [2, 1], [0, 0, 1])
    """
    # Not differentiable (spconv voxelizes under no_grad): detached, so the outputs do not
    # claim a gradient the op has no formula for (backward would give the points none).
    return _ops.voxelize(
        _detached_points(points),
        *_grid_args(voxel_size, range_min, grid_size),
        _whole(max_points_per_voxel, "max_points_per_voxel"),
        _whole(max_voxels, "max_voxels"),
        bool(empty_mean),
    )


def voxelize_mean(
    points: Tensor,
    voxel_size: Sequence[float],
    range_min: Sequence[float],
    grid_size: Sequence[int],
    max_voxels: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dynamic voxelization: like :func:`voxelize`, but each voxel gets the mean of all its
    points (no cap on points per voxel).

    Returns:
        ``(features [M, C] float32, coordinates [M, D] int32, num_points_per_voxel [M] int32,
        point_voxel_id [N] int64)``.
    """
    return _ops.voxelize_mean(  # detached: see voxelize
        _detached_points(points), *_grid_args(voxel_size, range_min, grid_size),
        _whole(max_voxels, "max_voxels"),
    )


def _whole(value, name: str) -> int:
    """``value`` as an int: whole numbers only, never truncated."""
    try:
        return _as_int(value)
    except TypeError:
        raise TypeError(f"{name} must be a whole number, got {value!r}") from None


def _grid_args(voxel_size, range_min, grid_size) -> tuple[list[float], list[float], list[int]]:
    try:
        sizes = [_as_int(g) for g in grid_size]
    except TypeError:
        raise TypeError(f"grid_size must hold whole numbers, got {list(grid_size)!r}") from None
    return [float(v) for v in voxel_size], [float(v) for v in range_min], sizes


# ---------------------------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes only.


def _check_fake_indices(indices: Tensor, ndim: int) -> None:
    torch._check(indices.dim() == 2 and indices.shape[1] == ndim + 1)


def _new_row_count() -> torch.SymInt:
    """The data-dependent row count of a fake output, in every tracing mode.

    ``ctx.new_dynamic_size()`` refuses (``DynamicOutputShapeException``) unless the tracer's
    shape environment allows dynamic output shapes. Dynamo allows them under
    ``fullgraph=True`` and ``torch.export`` but not in a plain ``torch.compile(model)``, where
    every map build would then end the graph. The count is only a tensor size, which the
    compiler backends (inductor, aot_eager) handle, so it is created directly in the shape
    environment, as ``new_dynamic_size`` itself does after its check.
    """
    ctx = torch.library.get_ctx()
    shape_env = getattr(ctx, "_shape_env", None)
    try:  # private torch API (2.13): without it, the plain compile breaks the graph here
        from torch.fx.experimental.symbolic_shapes import _constrain_range_for_size
    except ImportError:
        shape_env = None
    if shape_env is None or shape_env.allow_dynamic_output_shape_ops:
        return ctx.new_dynamic_size()
    count = shape_env.create_unbacked_symint()
    _constrain_range_for_size(count, min=0)
    return count


@torch.library.register_fake("spconv_lite::build_subm_map")
def _build_subm_map_fake(indices, spatial_shape, batch_size, kernel_size, dilation,
                         check_sites=True):
    _check_fake_indices(indices, len(spatial_shape))
    shape = (indices.shape[0], math.prod(kernel_size))
    return indices.new_empty(shape), indices.new_empty(shape)


@torch.library.register_fake("spconv_lite::build_conv_map")
def _build_conv_map_fake(
    indices, spatial_shape, batch_size, out_spatial_shape, kernel_size, stride, padding,
    dilation, transposed,
):
    _check_fake_indices(indices, len(spatial_shape))
    num_out = _new_row_count()
    volume = math.prod(kernel_size)
    return (
        indices.new_empty((num_out, indices.shape[1])),
        indices.new_empty((num_out, volume)),
        indices.new_empty((indices.shape[0], volume)),
    )


def _check_same_device(**tensors) -> None:
    """Raises ValueError naming the arguments unless all given tensors share one device. A meta
    tensor beside real ones sends a call to these fake kernels, which would return
    uninitialised memory (a model built on the meta device and never materialised)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("the tensor arguments must be on one device, got "
                         + ", ".join(f"{name} on {device}" for name, device in devices.items()))


@torch.library.register_fake("spconv_lite::sparse_conv")
def _sparse_conv_fake(features, weight, nbr, nbr_t, order=None, order_t=None):
    _check_same_device(features=features, weight=weight, nbr=nbr, nbr_t=nbr_t, order=order,
                       order_t=order_t)
    torch._check(weight.dim() == 3 and weight.shape[1] == features.shape[1])
    # As the kernels check: a traced graph of another dtype would size its buffers wrongly.
    torch._check_type(weight.dtype == features.dtype, lambda: (
        f"weight dtype {weight.dtype} must match features dtype {features.dtype}"))
    return features.new_empty((nbr.shape[0], weight.shape[2]))


@torch.library.register_fake("spconv_lite::conv_row_order")
def _conv_row_order_fake(nbr, splits):
    return nbr.new_empty((splits, nbr.shape[0]))


@torch.library.register_fake("spconv_lite::sparse_conv_weight_grad")
def _sparse_conv_weight_grad_fake(features, grad_out, nbr):
    _check_same_device(features=features, grad_out=grad_out, nbr=nbr)
    torch._check_type(grad_out.dtype == features.dtype, lambda: (
        f"grad_out dtype {grad_out.dtype} must match features dtype {features.dtype}"))
    return features.new_empty((nbr.shape[1], features.shape[1], grad_out.shape[1]))


@torch.library.register_fake("spconv_lite::sparse_sum_pool")
def _sparse_sum_pool_fake(features, nbr, nbr_t):
    _check_same_device(features=features, nbr=nbr, nbr_t=nbr_t)
    return features.new_empty((nbr.shape[0], features.shape[1]))


@torch.library.register_fake("spconv_lite::sparse_max_pool")
def _sparse_max_pool_fake(features, nbr, nbr_t):
    _check_same_device(features=features, nbr=nbr, nbr_t=nbr_t)
    shape = (nbr.shape[0], features.shape[1])
    return features.new_empty(shape), features.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("spconv_lite::sparse_max_pool_backward")
def _sparse_max_pool_backward_fake(grad_out, argmax, nbr_t):
    _check_same_device(grad_out=grad_out, argmax=argmax, nbr_t=nbr_t)
    return grad_out.new_empty((nbr_t.shape[0], grad_out.shape[1]))


def _voxel_outputs_fake(points, slot_shape, ndim):
    """Fake outputs of the voxelize ops: [M, *slot_shape], [M, ndim], [M], [N]."""
    num = _new_row_count()
    return (
        points.new_empty((num, *slot_shape), dtype=torch.float32),
        points.new_empty((num, ndim), dtype=torch.int32),
        points.new_empty((num,), dtype=torch.int32),
        points.new_empty((points.shape[0],), dtype=torch.int64),
    )


@torch.library.register_fake("spconv_lite::voxelize")
def _voxelize_fake(
    points, voxel_size, range_min, grid_size, max_points_per_voxel, max_voxels, empty_mean
):
    torch._check(points.dim() == 2 and points.shape[1] >= len(voxel_size))
    return _voxel_outputs_fake(points, (max_points_per_voxel, points.shape[1]), len(voxel_size))


@torch.library.register_fake("spconv_lite::voxelize_mean")
def _voxelize_mean_fake(points, voxel_size, range_min, grid_size, max_voxels):
    torch._check(points.dim() == 2 and points.shape[1] >= len(voxel_size))
    return _voxel_outputs_fake(points, (points.shape[1],), len(voxel_size))


# ---------------------------------------------------------------------------------------------
# Autograd. The input gradient of a conv is the same gather-GEMM-scatter over the transposed
# table with transposed weights, so it is itself differentiable.
#
# torch.library.register_autograd wraps a formula in an autograd.Function without
# ``setup_context``, which torch.func's transforms refuse, and has no forward mode (torch ran
# the op without its inputs' tangents: zero derivatives). So each formula is registered twice:
# with the op (eager, torch.compile, torch.export) and in an autograd.Function of our own, with
# a forward-mode formula too, that the functions here call instead while a torch.func transform
# is running or an input carries a tangent; its vmap rule runs the op once per batch entry.

_FUNCTORCH_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def _run(op: str, *args):
    """``torch.ops.spconv_lite.<op>(*args)``, through the op's autograd.Function where
    :func:`python_autograd_needed`."""
    if python_autograd_needed(op, *args):
        return _FUNCTORCH_FUNCTIONS[op].apply(*args)
    return getattr(_ops, op)(*args)


def python_autograd_needed(name: str, *args) -> bool:
    """Whether the function ``name`` of ``args`` must run through an autograd.Function with
    ``setup_context`` and a forward-mode formula: while a torch.func transform is running or
    an argument carries a forward-mode tangent. Under torch.compile, a graph keeps the op only
    without them or under vmap (run once per entry); otherwise dynamo breaks the graph here
    (it cannot trace the interpreter stack, or this raises) and runs the op eagerly: the graph
    would run it without the transform or the tangents (zero or wrong derivatives).

    Raises:
        NotImplementedError: forward mode over forward mode (``jacfwd(jacfwd(f))``, a ``jvp``
            of a ``jvp``): torch runs an autograd.Function's forward formula with forward mode
            off, so the outer level would miss the inner one's terms (wrong derivatives);
            under ``torch.compile(fullgraph=True)``, forward-mode dual tensors.
    """
    if torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import (
            retrieve_all_functorch_interpreters,
            retrieve_current_functorch_interpreter,
        )

        if (torch.compiler.is_compiling()
                and retrieve_current_functorch_interpreter().key() == TransformType.Vmap):
            return False  # the graph runs the op once per entry (torch's batching fallback)
        forward_levels = sum(interpreter.key() == TransformType.Jvp
                             for interpreter in retrieve_all_functorch_interpreters())
        if forward_levels > 1:
            raise NotImplementedError(
                f"{name}: forward mode over forward mode (jacfwd of jacfwd, jvp of jvp) is not "
                "supported; for second derivatives use torch.func.hessian (jacfwd of jacrev) "
                "or jacrev of jacrev")
        return True
    if torch.compiler.is_compiling():
        if forward_ad._current_level >= 0:  # dual tensors may come, unseen by dynamo
            # Raising while tracing makes dynamo run this frame eagerly, where they are seen.
            raise NotImplementedError(
                f"{name}: forward-mode dual tensors (torch.autograd.forward_ad) cannot pass "
                "through a torch.compile graph, which would run the op without their "
                "tangents; compile without fullgraph=True, so that the op runs eagerly")
        return False
    return any(isinstance(arg, Tensor) and forward_ad.unpack_dual(arg).tangent is not None
               for arg in args)


def _as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _register_autograd(op: str, backward, setup_context, jvp) -> None:
    """Registers ``backward`` as the reverse-mode derivative of ``torch.ops.spconv_lite.<op>``,
    for torch's autograd and for torch.func's (:func:`_run`), and ``jvp`` (called with the
    op's inputs and outputs, then the inputs' tangents) as its forward-mode derivative for
    :func:`_run`."""
    torch.library.register_autograd(f"spconv_lite::{op}", backward,
                                    setup_context=setup_context)

    def forward(*args):
        return getattr(_ops, op)(*args)

    def setup_both(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        # Saved, not held on ctx: an output held there would keep its own graph alive.
        ctx.save_for_forward(*inputs, *_as_tuple(output))
        ctx.input_count = len(inputs)

    def forward_derivative(ctx, *tangents):
        saved = ctx.saved_tensors
        outputs = saved[ctx.input_count:]
        return jvp(saved[:ctx.input_count], outputs if len(outputs) > 1 else outputs[0],
                   *tangents)

    def vmap(info, in_dims, *args):
        # No batched kernels: one call per entry, stacked. Tensors not mapped are shared.
        if info.batch_size == 0:  # nothing to run: empty outputs shaped by the fake kernel
            entry = [arg if arg is None else arg.to("meta") if dim is None else
                     arg.new_empty(arg.shape[:dim] + arg.shape[dim + 1:], device="meta")
                     for arg, dim in zip(args, in_dims)]
            stacked = tuple(torch.empty((0, *out.shape), dtype=out.dtype, device=args[0].device)
                            for out in _as_tuple(getattr(_ops, op)(*entry)))
        else:
            results = [_as_tuple(_run(op, *(arg if dim is None else arg.select(dim, entry)
                                            for arg, dim in zip(args, in_dims))))
                       for entry in range(info.batch_size)]
            stacked = tuple(torch.stack(parts) for parts in zip(*results))
        if len(stacked) > 1:
            return stacked, (0,) * len(stacked)
        return stacked[0], 0

    _FUNCTORCH_FUNCTIONS[op] = type(f"{op}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_both),
        "backward": staticmethod(backward),
        "jvp": staticmethod(forward_derivative),
        "vmap": staticmethod(vmap),
    })


def _sparse_conv_setup(ctx, inputs, output):
    features, weight, nbr, nbr_t, order, order_t = inputs
    # Each gradient needs the other operand only: a frozen layer keeps no features alive (and
    # its input may be edited in place after the forward), as torch's layers do.
    needs_features, needs_weight = ctx.needs_input_grad[:2]
    ctx.save_for_backward(features if needs_weight else None, weight if needs_features else None,
                          nbr, nbr_t, order, order_t)


def _sparse_conv_backward(ctx, grad):
    features, weight, nbr, nbr_t, order, order_t = ctx.saved_tensors
    grad_features = grad_weight = None
    if ctx.needs_input_grad[0]:
        # The same op over the transposed table, so the row orders swap roles too.
        try:
            grad_features = _run("sparse_conv", grad, weight.transpose(1, 2), nbr_t, nbr,
                                 order_t, order)
        except ValueError as error:
            # The op sees nbr_t as its "nbr" and order_t as its "order" here; name the
            # tensors the caller passed.
            message = str(error)
            if message.startswith("nbr has entries outside"):
                low, high = torch.stack(torch.aminmax(nbr_t)).tolist()
                raise ValueError(f"nbr_t has entries outside [-1, {grad.shape[0]}): it does not "
                                 f"index the output rows (seen {low} .. {high}; the backward "
                                 "pass reads it)") from None
            if message.startswith("order row "):
                raise ValueError("order_t" + message[len("order"):]) from None
            raise
    if ctx.needs_input_grad[1]:
        grad_weight = _run("sparse_conv_weight_grad", features, grad, nbr)
    return grad_features, grad_weight, None, None, None, None


def _sparse_conv_jvp(inputs, output, features_tangent, weight_tangent, *_):
    features, weight, nbr, nbr_t, order, order_t = inputs  # bilinear in features and weight
    return _sum_or_zeros(output, [
        _run("sparse_conv", features_tangent, weight, nbr, nbr_t, order, order_t)
        if features_tangent is not None else None,
        _run("sparse_conv", features, weight_tangent, nbr, nbr_t, order, order_t)
        if weight_tangent is not None else None])


def _sum_or_zeros(like: Tensor, terms) -> Tensor:
    """The sum of the terms that are not None, or zeros shaped as ``like``."""
    present = [term for term in terms if term is not None]
    return sum(present[1:], present[0]) if present else torch.zeros_like(like)


_register_autograd("sparse_conv", _sparse_conv_backward, _sparse_conv_setup, _sparse_conv_jvp)


def _transposed_table(nbr: Tensor, input_rows: int) -> Tensor:
    """``nbr_t`` from ``nbr``: ``nbr_t[i, k] = o`` where ``nbr[o, k] = i``. Assumes what every
    map built here holds, one o per (i, k); a hand-made table that breaks it has wrong first
    derivatives already."""
    out_rows, offsets = (nbr >= 0).nonzero(as_tuple=True)
    nbr_t = torch.full((input_rows, nbr.shape[1]), -1, dtype=nbr.dtype, device=nbr.device)
    nbr_t[nbr[out_rows, offsets].long(), offsets] = out_rows.to(nbr.dtype)
    return nbr_t


def _weight_grad_setup(ctx, inputs, output):
    features, grad_out, nbr = inputs
    ctx.save_for_backward(features, grad_out, nbr)


def _weight_grad_backward(ctx, grad):
    # weight_grad[k] = sum over pairs (i, o) of offset k of features[i]^T grad_out[o]: bilinear,
    # so its derivatives are a conv of grad_out (as the input gradient) and one of features
    # (as the forward), both with ``grad`` [K, C_in, C_out] as the weight. Second derivatives
    # only (gradient penalties): the table's transpose is rebuilt here.
    features, grad_out, nbr = ctx.saved_tensors
    nbr_t = _transposed_table(nbr, features.shape[0])
    grad_features = grad_grad_out = None
    if ctx.needs_input_grad[0]:
        grad_features = _run("sparse_conv", grad_out, grad.transpose(1, 2), nbr_t, nbr, None, None)
    if ctx.needs_input_grad[1]:
        grad_grad_out = _run("sparse_conv", features, grad, nbr, nbr_t, None, None)
    return grad_features, grad_grad_out, None


def _weight_grad_jvp(inputs, output, features_tangent, grad_out_tangent, _):
    features, grad_out, nbr = inputs  # bilinear in features and grad_out
    return _sum_or_zeros(output, [
        _run("sparse_conv_weight_grad", features_tangent, grad_out, nbr)
        if features_tangent is not None else None,
        _run("sparse_conv_weight_grad", features, grad_out_tangent, nbr)
        if grad_out_tangent is not None else None])


_register_autograd("sparse_conv_weight_grad", _weight_grad_backward, _weight_grad_setup,
                   _weight_grad_jvp)


def _sum_pool_setup(ctx, inputs, output):
    _, nbr, nbr_t = inputs
    ctx.save_for_backward(nbr, nbr_t)


def _sum_pool_backward(ctx, grad):
    nbr, nbr_t = ctx.saved_tensors
    return _run("sparse_sum_pool", grad, nbr_t, nbr), None, None


def _sum_pool_jvp(inputs, output, features_tangent, *_):
    _, nbr, nbr_t = inputs  # linear
    return _run("sparse_sum_pool", features_tangent, nbr, nbr_t)


_register_autograd("sparse_sum_pool", _sum_pool_backward, _sum_pool_setup, _sum_pool_jvp)


def _max_pool_setup(ctx, inputs, output):
    _, _, nbr_t = inputs
    ctx.save_for_backward(output[1], nbr_t)


def _max_pool_backward(ctx, grad, _grad_argmax):
    argmax, nbr_t = ctx.saved_tensors
    return _run("sparse_max_pool_backward", grad, argmax, nbr_t), None, None


def _max_pool_jvp(inputs, output, features_tangent, *_):
    # Each output takes the value of its argmax row, and so that row's tangent.
    return _rows_at(features_tangent, output[1]), None


_register_autograd("sparse_max_pool", _max_pool_backward, _max_pool_setup, _max_pool_jvp)


def _max_pool_backward_setup(ctx, inputs, output):
    _, argmax, _ = inputs
    ctx.save_for_backward(argmax)


def _max_pool_double_backward(ctx, grad):
    # The backward routes grad_out[o, c] to input row argmax[o, c] (-1: none): linear in
    # grad_out, so its own gradient reads grad back from those rows.
    (argmax,) = ctx.saved_tensors
    return _rows_at(grad, argmax), None, None


def _rows_at(values: Tensor, argmax: Tensor) -> Tensor:
    """``values[argmax[o, c], c]``, 0 where ``argmax`` is -1 (an output without inputs)."""
    picked = values.gather(0, argmax.clamp(min=0).long())
    return torch.where(argmax >= 0, picked, torch.zeros_like(picked))


def _max_pool_backward_jvp(inputs, output, grad_out_tangent, *_):
    _, argmax, nbr_t = inputs  # linear in grad_out
    return _run("sparse_max_pool_backward", grad_out_tangent, argmax, nbr_t)


_register_autograd("sparse_max_pool_backward", _max_pool_double_backward,
                   _max_pool_backward_setup, _max_pool_backward_jvp)
