"""Shared helpers of the tests: seeded random sparse inputs, dense PyTorch counterparts of every
sparse op, conversions between the spconv and torch weight layouts, and the checks of a sparse
run against its dense counterpart.

Everything here is plain torch so that the dense side of a comparison never goes through
spconv_lite code; spconv_lite is only imported by the helpers that build its modules and
tensors, so the reference tests can use this file even when the C++ extension is not built.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

# Devices the fast path is tested on: the CPU always, CUDA when a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}

# Tolerances of a fast result against an exact (float64) dense result, per dtype.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


def ntuple(value, ndim: int) -> tuple[int, ...]:
    """An int as ``ndim`` copies, or a sequence as a tuple."""
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def case_id(case) -> str:
    """Readable pytest id of a case tuple."""
    if isinstance(case, (tuple, list)):
        return "-".join(case_id(v) for v in case)
    return str(case).replace(" ", "").replace("torch.", "")


def make_gen(*key) -> torch.Generator:
    """A generator seeded from the test case, so every case gets its own fixed data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def misaligned(t):
    """A contiguous copy of ``t`` whose data starts one element past an aligned address, as a
    view into a larger tensor does (the kernels' 16-byte loads must not be used there)."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    buffer[1:].copy_(t.flatten())
    view = buffer[1:].view(t.shape)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def random_sites(gen: torch.Generator, batch_size: int, shape: Sequence[int],
                 density: float = 0.3, count: Optional[int] = None) -> Tensor:
    """Unique random sites, int32 ``[N, D+1]`` (batch first), in random row order.

    ``count`` sites if given, else ``round(density * cells)`` (at least one).
    """
    cells = batch_size * math.prod(shape)
    n = count if count is not None else max(1, round(density * cells))
    flat = torch.randperm(cells, generator=gen)[:n]
    coords = []
    for size in reversed((batch_size, *shape)):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], 1).to(torch.int32)


def case_sites(batch_size: int, shape: Sequence[int], *key) -> tuple[torch.Generator, Tensor]:
    """The generator of a case (seeded from ``key``) and the random sites drawn first from it."""
    gen = make_gen(*key)
    return gen, random_sites(gen, batch_size, shape)


def randn(gen: torch.Generator, *shape, dtype=torch.float64, scale: float = 1.0) -> Tensor:
    """Seeded normal values, drawn in float64 then cast (same values across dtypes)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def distinct_values(gen: torch.Generator, *shape, dtype=torch.float64) -> Tensor:
    """Values that are pairwise far apart (a shuffled grid), so that max pooling has no ties
    and stays differentiable under finite differences."""
    n = math.prod(shape)
    values = torch.randperm(n, generator=gen).to(torch.float64) * 0.1 - n * 0.05
    return values.reshape(shape).to(dtype)


def many_offsets_case(dtype: torch.dtype, *key) -> tuple[Tensor, ...]:
    """(x, w, g, nbr, nbr_t) of a submanifold conv whose 1D kernel has 65537 offsets (reach 32768
    to each side of 4 sites in a 40000-cell grid, 2 batches): more than a CUDA grid's y or z
    holds, 8 input and 8 output channels, seeded from ``key``."""
    import spconv_lite  # noqa: F401  (registers the ops)

    idx = torch.tensor([[0, 5], [0, 20000], [0, 39999], [1, 7]], dtype=torch.int32)
    nbr, nbr_t = torch.ops.spconv_lite.build_subm_map(idx, [40000], 2, [65537], [1])
    gen = make_gen("offsets", dtype, *key)
    x = randn(gen, 4, 8, dtype=dtype)
    w = randn(gen, 65537, 8, 8, dtype=dtype, scale=0.25)
    g = randn(gen, 4, 8, dtype=dtype)
    return x, w, g, nbr, nbr_t


def voxel_cloud(gen: torch.Generator, n: int, columns: int, voxel_size: Sequence[float],
                range_min: Sequence[float], grid_size: Sequence[int]) -> Tensor:
    """float32 ``[n, columns]`` points for the voxelize ops: spread over the range and a margin
    past both ends, a third snapped onto voxel borders, many repeated voxels (copied rows, some
    then moved by up to 1e-3), and NaN / infinite values in coordinate and feature
    columns."""
    ndim = len(voxel_size)
    size = torch.tensor(voxel_size, dtype=torch.float64)
    low = torch.tensor(range_min, dtype=torch.float64)
    span = size * torch.tensor(grid_size, dtype=torch.float64)
    pts = torch.rand(n, columns, generator=gen, dtype=torch.float64) * 4 - 1
    spread = torch.rand(n, ndim, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    pts[:, :ndim] = low + spread * span
    border = torch.rand(n, generator=gen) < 0.3
    snapped = low + torch.round((pts[:, :ndim] - low) / size) * size
    pts[border, :ndim] = snapped[border]
    copies = torch.randint(0, n, (n // 3,), generator=gen)
    pts[torch.randint(0, n, (n // 3,), generator=gen)] = pts[copies]
    moved = torch.randint(0, n, (n // 4,), generator=gen)
    pts[moved, :ndim] += torch.rand(len(moved), ndim, generator=gen, dtype=torch.float64) * 1e-3
    pts = pts.float()
    for column, value in [(0, math.nan), (ndim - 1, math.inf), (columns - 1, -math.inf),
                          (columns - 1, math.nan)]:
        pts[torch.randint(0, n, (max(1, n // 100),), generator=gen), column] = value
    return pts


def densify(features: Tensor, indices: Tensor, shape: Sequence[int], batch_size: int,
            fill: float = 0.0) -> Tensor:
    """Differentiable scatter of ``[N, C]`` features to dense ``[B, C, *shape]``."""
    dense = features.new_full((batch_size, *shape, features.shape[1]), fill)
    dense = dense.index_put(tuple(indices.long().t()), features)
    return dense.movedim(-1, 1)


def occupancy(indices: Tensor, shape: Sequence[int], batch_size: int) -> Tensor:
    """``[B, 1, *shape]`` float64 mask of the active sites."""
    ones = torch.ones(len(indices), 1, dtype=torch.float64)
    return densify(ones, indices, shape, batch_size)


def gather(dense: Tensor, indices: Tensor) -> Tensor:
    """Values ``[N, C]`` of dense ``[B, C, *S]`` at the given sites."""
    return dense.movedim(1, -1)[tuple(indices.long().t())]


def support_sites(count: Tensor) -> Tensor:
    """Sites ``[M, D+1]`` int32 where a ``[B, 1, *S]`` count is positive, sorted row-major."""
    return (count[:, 0] > 0.5).nonzero().to(torch.int32)


def skip_if_empty(out_shape: Sequence[int]) -> None:
    """Skips a case whose dense output would have no cells: there is nothing to compare."""
    if min(out_shape) < 1:
        pytest.skip("dense output would be empty")


def conv_shape(shape, k, s, p, d) -> list[int]:
    return [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1
            for n, kk, ss, pp, dd in zip(shape, k, s, p, d)]


def conv_geometry(shape, k, s, p, d) -> tuple[tuple[int, ...], ...]:
    """A case's kernel, stride (None: the kernel, as pools default), padding and dilation as
    per-dimension tuples; skips the case if the dense output would be empty."""
    ndim = len(shape)
    k, p, d = (ntuple(v, ndim) for v in (k, p, d))
    s = k if s is None else ntuple(s, ndim)
    skip_if_empty(conv_shape(shape, k, s, p, d))
    return k, s, p, d


def transpose_shape(shape, k, s, p, d, op) -> list[int]:
    return [(n - 1) * ss - 2 * pp + dd * (kk - 1) + 1 + oo
            for n, kk, ss, pp, dd, oo in zip(shape, k, s, p, d, op)]


def is_1x1(kernel_size, stride=1, subm: bool = False) -> bool:
    """Whether spconv 2.x computes the layer as ``features @ weight.view(C_in, C_out)``: kernel
    volume 1, and submanifold or every stride 1 (an inverse conv has stride 1)."""
    kernel = ntuple(kernel_size, 1)
    return math.prod(kernel) == 1 and (subm or all(s == 1 for s in ntuple(stride, len(kernel))))


def conv_weight(w: Tensor, conv1x1: bool = False) -> Tensor:
    """spconv ``[C_out, *k, C_in]`` -> torch conv ``[C_out, C_in, *k]``; a 1x1 layer's weight
    is its memory viewed as ``[C_in, C_out]`` (spconv 2.x), transposed."""
    ndim = w.dim() - 2
    c_out, kernel, c_in = w.shape[0], w.shape[1:-1], w.shape[-1]
    if conv1x1:
        return w.reshape(c_in, c_out).t().reshape(c_out, c_in, *kernel)
    return w.permute(0, ndim + 1, *range(1, ndim + 1))


def conv_t_weight(w: Tensor, conv1x1: bool = False) -> Tensor:
    """spconv ``[C_out, *k, C_in]`` -> torch conv_transpose ``[C_in, C_out, *k]``; a 1x1
    layer's weight is its memory viewed as ``[C_in, C_out]`` (spconv 2.x)."""
    ndim = w.dim() - 2
    c_out, kernel, c_in = w.shape[0], w.shape[1:-1], w.shape[-1]
    if conv1x1:
        return w.reshape(c_in, c_out, *kernel)
    return w.permute(ndim + 1, 0, *range(1, ndim + 1))


def kio_weight(w: Tensor) -> Tensor:
    """spconv ``[C_out, *k, C_in]`` -> the ``[K, C_in, C_out]`` layout of ``ops.sparse_conv``."""
    return w.reshape(w.shape[0], -1, w.shape[-1]).permute(1, 2, 0)


def dense_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
               groups: int = 1) -> Tensor:
    """Dense cross-correlation for D in 1..4 (torch weight layout ``[C_out, C_in/g, *k]``)."""
    ndim = x.dim() - 2
    s, p, d = (ntuple(v, ndim) for v in (stride, padding, dilation))
    if ndim <= 3:
        return CONV[ndim](x, weight, bias, s, p, d, groups)
    # torch has no conv4d: sum 3D convs over the taps of the first spatial dimension.
    x = F.pad(x, (0, 0) * 3 + (p[0], p[0]))
    taps = weight.shape[2]
    n_out = (x.shape[2] - d[0] * (taps - 1) - 1) // s[0] + 1
    slices = [sum(F.conv3d(x[:, :, o * s[0] + j * d[0]], weight[:, :, j], None, s[1:], p[1:],
                           d[1:], groups) for j in range(taps)) for o in range(n_out)]
    out = torch.stack(slices, 2)
    return out if bias is None else out + bias.view(1, -1, *([1] * ndim))


def ones_kernel(k: Sequence[int]) -> Tensor:
    return torch.ones(1, 1, *k, dtype=torch.float64)


def conv_support(indices: Tensor, shape, batch_size, k, s, p, d) -> Tensor:
    """Exact output sites of a regular conv: the support of occupancy (*) ones."""
    count = dense_conv(occupancy(indices, shape, batch_size), ones_kernel(k), None, s, p, d)
    return support_sites(count)


def transpose_support(indices: Tensor, shape, batch_size, k, s, p, d, op) -> Tensor:
    """Exact output sites of a transposed conv: the support of occupancy (*)^T ones."""
    count = CONV_T[len(shape)](occupancy(indices, shape, batch_size), ones_kernel(k), None, s, p,
                               op, 1, d)
    return support_sites(count)


def dense_inverse_conv(features: Tensor, mid_indices: Tensor, mid_shape, shape, batch_size,
                       weight: Tensor, bias: Optional[Tensor], k, s, p, d) -> Tensor:
    """Dense inverse conv, ``[B, C_out, *shape]``: the conv_transpose of ``features`` at the
    strided conv's output sites ``mid_indices``, landing on the conv's input shape ``shape``
    (spconv weight layout ``[C_out, *k, C_in]``)."""
    ndim = len(shape)
    # output_padding makes the transpose land exactly on the conv's input shape.
    op = [n - m for n, m in zip(shape, transpose_shape(mid_shape, k, s, p, d, (0,) * ndim))]
    dense = CONV_T[ndim](densify(features, mid_indices, mid_shape, batch_size),
                         conv_t_weight(weight, is_1x1(k)), bias, s, p, op, 1, d)
    assert list(dense.shape[2:]) == list(shape)
    return dense


def dense_max_pool(features: Tensor, indices: Tensor, shape, batch_size, k, s, p, d) -> Tensor:
    """Dense max pool where inactive sites and padding are -inf (max over active inputs)."""
    x = densify(features, indices, shape, batch_size, fill=-math.inf)
    x = F.pad(x, [q for pp in reversed(p) for q in (pp, pp)], value=-math.inf)
    return MAX_POOL[len(shape)](x, k, s, 0, d)


def dense_avg_pool(features: Tensor, indices: Tensor, shape, batch_size, k, s, p, d) -> Tensor:
    """Dense sum over each window / number of active sites in the window."""
    c = features.shape[1]
    ones = ones_kernel(k).to(features.dtype)
    sums = dense_conv(densify(features, indices, shape, batch_size), ones.expand(c, 1, *k),
                      None, s, p, d, groups=c)
    count = dense_conv(occupancy(indices, shape, batch_size).to(features.dtype), ones, None,
                       s, p, d)
    return sums / count.clamp(min=1)


def dense_global_pool(kind: str, features: Tensor, indices: Tensor, shape, batch_size) -> Tensor:
    """``[B, C]`` per batch item: the max over its active sites (0 for an item without sites)
    for kind "max", else their mean."""
    if kind == "max":
        dense = densify(features, indices, shape, batch_size, fill=-math.inf).flatten(2).amax(2)
        return torch.where(dense == -math.inf, torch.zeros_like(dense), dense)
    sums = densify(features, indices, shape, batch_size).flatten(2).sum(2)
    return sums / occupancy(indices, shape, batch_size).flatten(2).sum(2).clamp(min=1)


@dataclass
class DenseRun:
    """One sparse op run, and dense torch (float64) evaluated at the expected sites."""

    sparse: Tensor
    dense: Tensor
    leaves: list
    out_indices: Optional[Tensor] = None
    expected_indices: Optional[Tensor] = None
    out_shape: Optional[list] = None
    expected_shape: Optional[list] = None


def check_values(run: DenseRun, dtype: torch.dtype = torch.float64) -> None:
    """Output sites (same rows, sorted), spatial shape, dtype and values of a run."""
    if run.expected_indices is not None:
        assert run.out_indices.dtype == torch.int32
        assert torch.equal(run.out_indices.cpu(), run.expected_indices)
    if run.expected_shape is not None:
        assert isinstance(run.out_shape, list) and run.out_shape == run.expected_shape
    assert run.sparse.dtype == dtype and run.sparse.shape == run.dense.shape
    torch.testing.assert_close(run.sparse.detach().cpu(), run.dense.detach().to(dtype),
                               **TOL[dtype])


def assert_close_non_finite(got: Tensor, want: Tensor, rtol: float, atol: float) -> None:
    """Same dtype, shape and inf / NaN entries (signs included); the finite entries close
    relative to the largest finite one (``got`` may be on another device)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(got), kind(want)), f"{kind.__name__} entries differ"
    finite = torch.isfinite(want)
    scale = max(want[finite].abs().max().item(), 1.0) if finite.any() else 1.0
    torch.testing.assert_close(got[finite] / scale, want[finite] / scale, rtol=rtol, atol=atol)


def check_gradients(run: DenseRun, dtype: torch.dtype, *key) -> None:
    """Gradients of every leaf under one random upstream gradient (seeded from ``key``) match
    dense autograd."""
    upstream = randn(make_gen(*key), *run.sparse.shape)
    got = torch.autograd.grad((run.sparse * upstream.to(run.sparse.device, dtype)).sum(),
                              run.leaves)
    want = torch.autograd.grad((run.dense * upstream).sum(), run.leaves)
    for leaf, g, w in zip(run.leaves, got, want):
        assert g.shape == leaf.shape and g.dtype == dtype
        torch.testing.assert_close(g, w, **TOL[dtype])


def layer_class(kind: str, ndim: int):
    """The public module class of a kind ("subm", "conv", "transpose", "inverse", "max",
    "avg") and dimension."""
    import spconv_lite as sp

    names = {"subm": "SubMConv{}d", "conv": "SparseConv{}d",
             "transpose": "SparseConvTranspose{}d", "inverse": "SparseInverseConv{}d",
             "max": "SparseMaxPool{}d", "avg": "SparseAvgPool{}d"}
    return getattr(sp, names[kind].format(ndim))


def init_layer(layer: torch.nn.Module, gen: torch.Generator, dtype=torch.float64):
    """Casts a conv layer to ``dtype`` and fills weight (and bias) with seeded values of the
    size of a default init (so outputs are O(1) whatever the fan-in)."""
    layer.to(dtype)
    fan_in = layer.weight[0].numel()
    with torch.no_grad():
        layer.weight.copy_(randn(gen, *layer.weight.shape, scale=fan_in ** -0.5))
        if layer.bias is not None:
            layer.bias.copy_(randn(gen, *layer.bias.shape))
    return layer


def sparse_tensor(features: Tensor, indices: Tensor, shape, batch_size: int,
                  device: Optional[str] = None):
    """A SparseConvTensor; with ``device``, features (differentiably) and indices moved there."""
    if device is not None:
        features, indices = features.to(device), indices.to(device)
    import spconv_lite as sp

    return sp.SparseConvTensor(features, indices, list(shape), batch_size)


def run_on(device: str, layer: torch.nn.Module, x):
    """``layer(x)`` with the layer's parameters and buffers used on ``device``.

    The layer itself stays on the CPU: on another device it runs with differentiable copies of
    its tensors (``torch.func.functional_call``), so gradients reach the same CPU leaves on
    every device and can be compared with a dense CPU computation.
    """
    if torch.device(device).type == "cpu":
        return layer(x)
    tensors = {name: t.to(device)
               for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers())}
    return torch.func.functional_call(layer, tensors, (x,))


def nbr_pairs(nbr: Tensor) -> set[tuple[int, int, int]]:
    """The pairs ``(in_row, out_row, k)`` of a neighbour table ``nbr [N_out, K]``."""
    out_rows, ks = (nbr >= 0).nonzero(as_tuple=True)
    return set(zip(nbr[out_rows, ks].tolist(), out_rows.tolist(), ks.tolist()))


def nbr_t_pairs(nbr_t: Tensor) -> set[tuple[int, int, int]]:
    """The pairs ``(in_row, out_row, k)`` of a transposed table ``nbr_t [N_in, K]``."""
    in_rows, ks = (nbr_t >= 0).nonzero(as_tuple=True)
    return set(zip(in_rows.tolist(), nbr_t[in_rows, ks].tolist(), ks.tolist()))


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(n)`` and restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_ci() -> bool:
    """True when the environment variable ``CI`` says so (``true`` or ``1``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(condition: bool, reason: str) -> None:
    """Skips the test when ``condition`` is false, but fails it under CI, where every
    optional dependency (spconv, the shared LiDAR data) must be present."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def lidar_data_dir() -> Path:
    """The shared real LiDAR frames: ``$SPCONV_LITE_DATA``, else ``../shared/data/lidar``
    beside the repository root."""
    env = os.environ.get("SPCONV_LITE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lidar"


def lidar_file(name: str) -> Path:
    """Path of one shared frame; skips (fails under CI) when it is missing."""
    path = lidar_data_dir() / name
    require(path.is_file(), f"LiDAR test data {path} not found (set SPCONV_LITE_DATA)")
    return path


def require_spconv():
    """``spconv.pytorch`` (2.3.8, the reference); skips (fails under CI) without it."""
    try:
        import spconv.pytorch as spconv_ref
    except ImportError as exc:
        require(False, f"spconv is not installed ({exc})")
    return spconv_ref
