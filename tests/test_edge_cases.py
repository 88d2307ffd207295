"""Edge cases of the fast path: empty inputs, single sites, batch items sharing coordinates,
sites on the grid border, non-contiguous inputs, huge grids (packed keys beyond 2^31, 4D) and
reduced precision.

Where no dense counterpart is practical, the fast result is compared with reference.py (itself
checked against dense PyTorch in test_reference.py). The tests run on each device of
helpers.DEVICES (reference and dense results on the CPU).
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DEVICES,
    TOL,
    case_id,
    conv_support,
    conv_weight,
    dense_conv,
    densify,
    gather,
    init_layer,
    kio_weight,
    layer_class,
    make_gen,
    randn,
    random_sites,
    run_on,
    sparse_tensor,
)
from torch import nn

import spconv_lite as sp
from spconv_lite import ops
from spconv_lite import reference as ref

TOL64 = TOL[torch.float64]


def make_layer(kind: str, ndim: int, c_in: int = 3, c_out: int = 4, **kwargs):
    """A layer of each kind with a representative geometry; pools keep ``c_in`` channels."""
    if kind == "subm":
        return getattr(sp, f"SubMConv{ndim}d")(c_in, c_out, 3, **kwargs)
    if kind == "conv":
        return getattr(sp, f"SparseConv{ndim}d")(c_in, c_out, 3, stride=2, padding=1, **kwargs)
    if kind == "transpose":
        return getattr(sp, f"SparseConvTranspose{ndim}d")(c_in, c_out, 3, stride=2, padding=1,
                                                          output_padding=1, **kwargs)
    if kind in ("max", "avg"):
        return layer_class(kind, ndim)(2, stride=2, padding=1)
    if kind == "global_max":
        return sp.SparseGlobalMaxPool()
    if kind == "global_avg":
        return sp.SparseGlobalAvgPool()
    raise AssertionError(kind)


def run_reference(kind, layer, x: sp.SparseConvTensor):
    """reference.py's result for the layer, as (features, indices or None, spatial shape)."""
    f, idx, shape, batch = x.features.cpu(), x.indices.cpu(), x.spatial_shape, x.batch_size
    if kind == "subm":
        return ref.subm_conv(f, idx, shape, layer.weight, layer.dilation, layer.bias), idx, shape
    if kind == "conv":
        return ref.sparse_conv(f, idx, shape, batch, layer.weight, layer.stride, layer.padding,
                               layer.dilation, layer.bias)
    if kind == "transpose":
        return ref.sparse_conv_transpose(f, idx, shape, batch, layer.weight, layer.stride,
                                         layer.padding, layer.dilation, layer.output_padding,
                                         layer.bias)
    if kind in ("max", "avg"):
        pool = ref.max_pool if kind == "max" else ref.avg_pool
        return pool(f, idx, shape, batch, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation)
    if kind == "global_max":
        return ref.global_max_pool(f, idx, batch), None, None
    return ref.global_avg_pool(f, idx, batch), None, None


def assert_matches_reference(kind, layer, x, key, device="cpu"):
    """Forward and feature/parameter gradients of the layer run on ``device`` with the (CPU)
    sparse tensor ``x`` equal reference.py's (on the CPU)."""
    x_dev = x if device == "cpu" else sparse_tensor(x.features, x.indices, x.spatial_shape,
                                                    x.batch_size, device)
    out = run_on(device, layer, x_dev)
    want, want_idx, want_shape = run_reference(kind, layer, x)
    fast = (out if isinstance(out, torch.Tensor) else out.features).cpu()
    if want_idx is not None:
        assert torch.equal(out.indices.cpu(), want_idx) and out.spatial_shape == list(want_shape)
    torch.testing.assert_close(fast, want, **TOL64)
    leaves = [t for t in (x.features, *layer.parameters()) if t.requires_grad]
    upstream = randn(make_gen("upstream", key), *fast.shape)
    got = torch.autograd.grad((fast * upstream).sum(), leaves, allow_unused=True)
    expected = torch.autograd.grad((want * upstream).sum(), leaves, allow_unused=True)
    for g, w in zip(got, expected):
        if w is None:  # reference has no path (e.g. no pairs at all): fast grad must be zero
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, **TOL64)
    return out


KINDS = ["subm", "conv", "transpose", "max", "avg", "global_max", "global_avg"]

# ----------------------------------------------------------------------------- empty input

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ndim", [1, 3])
@pytest.mark.parametrize("kind", KINDS + ["inverse"])
def test_zero_active_sites(kind, ndim, device):
    shape = [5] * ndim
    features = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    x = sparse_tensor(features, torch.zeros(0, ndim + 1, dtype=torch.int32), shape, 2, device)
    if kind == "inverse":
        x = make_layer("conv", ndim, 3, 3, indice_key="down").double().to(device)(x)
        layer = getattr(sp, f"SparseInverseConv{ndim}d")(3, 4, 3, indice_key="down").double()
    else:
        layer = make_layer(kind, ndim).double()
    layer.to(device)
    out = layer(x)
    if kind.startswith("global"):
        assert out.shape == (2, 3) and not out.any()  # zeros for items without sites
        loss = out.sum()
    else:
        channels = 3 if kind in ("max", "avg") else 4
        assert out.features.shape == (0, channels) and out.features.dtype == torch.float64
        assert out.indices.shape == (0, ndim + 1) and out.indices.dtype == torch.int32
        expected_shape = {"conv": [3] * ndim, "max": [3] * ndim, "avg": [3] * ndim,
                          "transpose": [10] * ndim}.get(kind, shape)
        assert out.spatial_shape == expected_shape
        assert out.dense().shape == (2, channels, *expected_shape)
        loss = out.features.sum()
    loss.backward()
    assert features.grad.shape == (0, 3)
    for p in layer.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()


def test_empty_input_skips_batchnorm_in_sparse_sequential():
    # As spconv: a training BatchNorm does not count an empty batch (with momentum=None its
    # running statistics are the mean over the batches counted).
    norm = nn.BatchNorm1d(3, momentum=None)
    net = sp.SparseSequential(norm, nn.Linear(3, 5)).train()
    full = sp.SparseConvTensor(torch.arange(6.0).view(2, 3),
                               torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2]], dtype=torch.int32),
                               [4, 4, 4], 1)
    empty = sp.SparseConvTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32),
                                [4, 4, 4], 1)
    net(full)
    assert net(empty).features.shape == (0, 5)  # other modules still apply (Linear: 3 -> 5)
    assert int(norm.num_batches_tracked) == 1
    torch.testing.assert_close(norm.running_mean, torch.tensor([1.5, 2.5, 3.5]))


def test_empty_input_still_reaches_sync_batchnorm(monkeypatch):
    # SyncBatchNorm must join its collective on an empty input too, or the other processes
    # wait forever: it is not skipped (nor SparseBatchNorm, which spconv runs).
    calls = []
    for norm in (nn.SyncBatchNorm(3), sp.SparseBatchNorm(3)):
        monkeypatch.setattr(norm, "forward", lambda features, norm=norm: calls.append(norm)
                            or features)
        empty = sp.SparseConvTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32),
                                    [4, 4, 4], 1)
        sp.SparseSequential(norm)(empty)
    assert len(calls) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_zero_sites_through_ops(device):
    idx = torch.zeros(0, 4, dtype=torch.int32, device=device)
    nbr, nbr_t = ops.build_subm_map(idx, [4, 4, 4], 1, [3, 3, 3], [1, 1, 1])
    assert nbr.shape == nbr_t.shape == (0, 27)
    out_idx, nbr, nbr_t = ops.build_conv_map(idx, [4, 4, 4], 1, [2, 2, 2], [2, 2, 2], [2, 2, 2],
                                             [0, 0, 0], [1, 1, 1])
    assert out_idx.shape == (0, 4) and nbr.shape == (0, 8) and nbr_t.shape == (0, 8)
    f = torch.zeros(0, 3, device=device, requires_grad=True)
    w = torch.randn(8, 3, 5, device=device, requires_grad=True)
    out = ops.sparse_conv(f, w, nbr, nbr_t)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert f.grad.shape == (0, 3) and torch.equal(w.grad, torch.zeros_like(w))
    assert ops.sparse_max_pool(f, nbr, nbr_t).shape == (0, 3)
    assert ops.sparse_sum_pool(f, nbr, nbr_t).shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_that_reach_no_output_site(device):
    # Stride 2 with a 1-kernel only reads even coordinates: odd-only inputs give no output.
    idx = torch.tensor([[0, 1], [0, 3], [1, 5]], dtype=torch.int32)
    f = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    layer = sp.SparseConv1d(2, 3, 1, stride=2).double().to(device)
    out = layer(sparse_tensor(f, idx, [7], 2, device))
    assert out.features.shape == (0, 3) and out.indices.shape == (0, 2)
    assert out.spatial_shape == [4]
    out.features.sum().backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


# ----------------------------------------------------------------------------- tiny inputs

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_single_site(kind, device):
    gen = make_gen("single", kind)
    idx = torch.tensor([[1, 2, 0, 4]], dtype=torch.int32)
    x = sparse_tensor(randn(gen, 1, 3).requires_grad_(), idx, [5, 6, 5], 3)
    layer = make_layer(kind, 3)
    if list(layer.parameters()):
        init_layer(layer, gen)
    out = assert_matches_reference(kind, layer, x, ("single", kind), device)
    if kind == "subm":
        # Only the centre tap sees a neighbour: out = f @ W[:, centre, :].T + b.
        w = layer.weight.reshape(4, 27, 3)[:, 13, :]
        torch.testing.assert_close(out.features.cpu(), x.features @ w.t() + layer.bias, **TOL64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_batch_items_with_the_same_coordinates_are_not_neighbours(kind, device):
    # Three batch items hold the same sites; each item alone must give the same rows.
    gen = make_gen("same_coords", kind)
    coords = random_sites(gen, 1, (6, 5, 6), count=25)[:, 1:]
    batch = 3
    idx = torch.cat([torch.cat([torch.full((25, 1), b, dtype=torch.int32), coords], 1)
                     for b in range(batch)])
    features = randn(gen, len(idx), 3)
    layer = make_layer(kind, 3)
    if list(layer.parameters()):
        init_layer(layer, gen)
    together = run_on(device, layer, sparse_tensor(features, idx, (6, 5, 6), batch, device))
    for b in range(batch):
        rows = slice(25 * b, 25 * (b + 1))
        alone_idx = idx[rows].clone()
        alone_idx[:, 0] = 0
        alone = run_on(device, layer,
                       sparse_tensor(features[rows], alone_idx, (6, 5, 6), 1, device))
        if kind.startswith("global"):
            torch.testing.assert_close(together[b], alone[0], **TOL64)
            continue
        mine = together.indices[:, 0] == b
        got_idx = together.indices[mine].clone()
        got_idx[:, 0] = 0
        assert torch.equal(got_idx, alone.indices)
        torch.testing.assert_close(together.features[mine], alone.features, **TOL64)


# (kind, spatial_shape); every corner and edge midpoint of the grid is active.
BORDER_CASES = [(kind, shape) for kind in KINDS[:5] for shape in [(6, 5, 7), (9,)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, shape", BORDER_CASES, ids=case_id)
def test_sites_on_the_grid_border(kind, shape, device):
    ndim = len(shape)
    gen = make_gen("border", kind, shape)
    coords = sorted(set(itertools.product(*[(0, n // 2, n - 1) for n in shape])))
    idx = torch.tensor([(b, *c) for b in range(2) for c in coords], dtype=torch.int32)
    x = sparse_tensor(randn(gen, len(idx), 3).requires_grad_(), idx, shape, 2)
    layer = make_layer(kind, ndim)
    if list(layer.parameters()):
        init_layer(layer, gen)
    out = assert_matches_reference(kind, layer, x, ("border", kind, shape), device)
    if kind == "conv":
        # The dense support too, as the border is where padding matters.
        assert torch.equal(out.indices.cpu(), conv_support(idx, shape, 2, (3,) * ndim, (2,) * ndim,
                                                     (1,) * ndim, (1,) * ndim))


# ----------------------------------------------------------------------------- layouts

def noncontiguous(kind: str, t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout."""
    if kind == "column_slice":  # columns of a wider tensor
        wide = torch.cat([t, t[:, :1], t], 1)
        out = wide[:, : t.shape[1]]
    elif kind == "transposed_copy":
        out = t.t().contiguous().t()
    elif kind == "row_step":  # every other row of a taller tensor
        out = torch.stack([t, torch.zeros_like(t)], 1).reshape(-1, t.shape[1])[::2]
    else:
        raise AssertionError(kind)
    assert torch.equal(out, t) and (t.shape[0] < 2 or not out.is_contiguous())
    return out


LAYOUTS = ["column_slice", "transposed_copy", "row_step"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_noncontiguous_indices_and_features(kind, layout, device):
    gen = make_gen("layout", kind)
    idx = random_sites(gen, 2, (7, 6, 8), count=120).to(device)
    features = randn(gen, 120, 3).to(device)
    layer = make_layer(kind, 3)
    if list(layer.parameters()):
        init_layer(layer, gen)
    layer.to(device)
    base = layer(sparse_tensor(features, idx, (7, 6, 8), 2))
    f_nc = noncontiguous(layout, features).requires_grad_()
    other = layer(sparse_tensor(f_nc, noncontiguous(layout, idx), (7, 6, 8), 2))
    if kind.startswith("global"):
        assert torch.equal(base, other)
        return
    assert torch.equal(base.indices, other.indices)
    assert torch.equal(base.features, other.features)
    other.features.sum().backward()
    assert f_nc.grad.shape == f_nc.shape


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs_to_ops(device):
    gen = make_gen("layout_ops")
    idx = random_sites(gen, 2, (7, 6, 8), count=150).to(device)
    idx_nc = noncontiguous("column_slice", idx)
    for a, b in zip(ops.build_subm_map(idx, [7, 6, 8], 2, [3, 3, 3], [1, 1, 1]),
                    ops.build_subm_map(idx_nc, [7, 6, 8], 2, [3, 3, 3], [1, 1, 1])):
        assert torch.equal(a, b)
    args = ([7, 6, 8], 2, [4, 3, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1])
    base_map = ops.build_conv_map(idx, *args)
    for a, b in zip(base_map, ops.build_conv_map(idx_nc, *args)):
        assert torch.equal(a, b)
    _, nbr, nbr_t = base_map
    f = randn(gen, 150, 4).to(device)
    w = randn(gen, 27, 4, 5).to(device)
    want = ops.sparse_conv(f, w, nbr, nbr_t)
    # Non-contiguous features, weight and tables (a transposed copy of each).
    got = ops.sparse_conv(noncontiguous("transposed_copy", f), w.transpose(1, 2).contiguous()
                          .transpose(1, 2), noncontiguous("transposed_copy", nbr),
                          noncontiguous("column_slice", nbr_t))
    assert torch.equal(got, want)
    assert torch.equal(ops.sparse_max_pool(noncontiguous("row_step", f), nbr, nbr_t),
                       ops.sparse_max_pool(f, nbr, nbr_t))
    # A broadcast (stride 0) feature tensor.
    row = randn(gen, 1, 4).to(device)
    torch.testing.assert_close(ops.sparse_sum_pool(row.expand(150, 4), nbr, nbr_t),
                               ops.sparse_sum_pool(row.repeat(150, 1), nbr, nbr_t), **TOL64)


# ----------------------------------------------------------------------------- huge grids

# (kind, batch, spatial_shape): batch * prod(shape) far beyond 2^31 (up to 2^61).
HUGE_CASES = [
    ("subm", 2, (2**20, 2**20, 2**20)),
    ("conv", 2, (2**20, 2**20, 2**20)),
    ("max", 2, (2**20, 2**20, 2**20)),
    ("avg", 3, (2**20 - 3, 2**19 + 1, 2**20)),
    ("transpose", 1, (2**19, 2**20, 2**20)),
    ("subm", 2, (2**15, 2**15, 2**15, 2**15)),
    ("conv", 3, (2**15, 2**14 + 5, 2**15, 2**15)),
    ("subm", 3, (2**31 - 1,)),
    ("conv", 2, (2**31 - 1,)),
]


def huge_sites(gen, batch, shape, n=80):
    """Clusters of sites near the origin, near the far corner and at coordinates that differ
    only in high bits, so that a key overflow would create false neighbours."""
    ndim = len(shape)
    anchors = [[0] * ndim, [s - 5 for s in shape], [s // 2 for s in shape],
               [(s // 2) ^ (1 << 13) for s in shape]]
    sites = set()
    n = min(n, batch * len(anchors) * 5**ndim // 2)  # well below the number of candidates
    while len(sites) < n:
        b = int(torch.randint(batch, (1,), generator=gen))
        anchor = anchors[int(torch.randint(len(anchors), (1,), generator=gen))]
        offset = torch.randint(0, 5, (ndim,), generator=gen).tolist()
        sites.add((b, *(a + o for a, o in zip(anchor, offset))))
    idx = torch.tensor(sorted(sites), dtype=torch.int32)
    return idx[torch.randperm(len(idx), generator=gen)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, batch, shape", HUGE_CASES, ids=case_id)
def test_huge_spatial_shapes(kind, batch, shape, device):
    gen = make_gen("huge", kind, shape)
    idx = huge_sites(gen, batch, shape)
    x = sparse_tensor(randn(gen, len(idx), 3).requires_grad_(), idx, shape, batch)
    ndim = len(shape)
    if kind == "transpose":
        layer = getattr(sp, f"SparseConvTranspose{ndim}d")(3, 4, 3, stride=2, padding=1)
    else:
        layer = make_layer(kind, ndim)
    if list(layer.parameters()):
        init_layer(layer, gen)
    assert_matches_reference(kind, layer, x, ("huge", kind, shape), device)


def test_large_kernel_over_isolated_sites_fills_large_tables():
    # 1,500 sites 8 apart through a kernel-5 regular conv: each output site has exactly one
    # neighbour, so it holds f[i] @ W[k] for the one (site i, offset k) that reaches it. The
    # table, [187,500, 125] int32 (94 MB), and the output pass the size from which the CPU
    # allocates them on huge pages.
    gen = make_gen("isolated k5")
    cells = torch.randperm(20 ** 3, generator=gen)[:1500]
    sites = torch.stack([cells // 400, cells // 20 % 20, cells % 20], 1) * 8 + 2
    idx = torch.cat([torch.zeros(1500, 1, dtype=torch.long), sites], 1).int()
    x = sparse_tensor(randn(gen, 1500, 3), idx, [160, 160, 160], 1)
    layer = sp.SparseConv3d(3, 4, 5, padding=2, bias=False).double()
    init_layer(layer, gen)
    with torch.no_grad():
        out = layer(x)
        offsets = torch.tensor(ref.kernel_offsets((5, 5, 5)))
        # Output o reads input o - padding + k: o = site + 2 - k.
        coords = (sites[:, None, :] + 2 - offsets[None]).reshape(-1, 3)
        values = torch.einsum("ic,kcd->ikd", x.features, layer.kernel_weight()).reshape(-1, 4)
    order = torch.argsort((coords[:, 0] * 160 + coords[:, 1]) * 160 + coords[:, 2])
    assert torch.equal(out.indices[:, 1:].long(), coords[order])
    assert (out.indices[:, 0] == 0).all()
    torch.testing.assert_close(out.features, values[order], **TOL64)


# Run in a fresh process: there no memory has been advised yet (in a long test process the
# allocator may hand back memory an earlier call advised, whose mapping keeps the flag).
HUGE_PAGE_PROBE = r'''
import os
import re
from pathlib import Path

import torch
from spconv_lite import ops


def vm_flags(address):
    """The VmFlags of this process's memory mapping that holds ``address``, or None."""
    holds = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        mapping = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if mapping:
            holds = int(mapping[1], 16) <= address < int(mapping[2], 16)
        elif holds and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def advised(switch):
    """Whether the middle of a fresh 77 MB conv output is advised onto huge pages ("hg")."""
    os.environ["SPCONV_LITE_HUGE_PAGES"] = switch
    out = ops.sparse_conv(torch.ones(1, 1), torch.ones(1, 1, 64),
                          torch.full((300_000, 1), -1, dtype=torch.int32),
                          torch.full((1, 1), -1, dtype=torch.int32))
    return "hg" in vm_flags(out.data_ptr() + out.nbytes // 2)


print("advised with 0, empty, 1:", advised("0"), advised(""), advised("1"))
'''


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="no /proc/self/smaps")
def test_the_huge_page_advice_follows_its_switch(monkeypatch):
    monkeypatch.delenv("SPCONV_LITE_HUGE_PAGES", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # this checkout
    done = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if "True" not in done.stdout:
        pytest.skip("a kernel that takes no huge-page advice")
    assert "advised with 0, empty, 1: False True True" in done.stdout
    monkeypatch.setenv("SPCONV_LITE_HUGE_PAGES", "off")
    message = "SPCONV_LITE_HUGE_PAGES must be 0 or 1 (or unset), got 'off'"
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.sparse_conv(torch.ones(1, 1), torch.ones(1, 1, 1),
                        torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_global_pool_of_a_large_batch_size(kind, device):
    # Memory follows sites + batch items: a [batch_size, sites] comparison would need 100 GB.
    gen = make_gen("large batch", kind)
    batch_size, n = 1_000_000, 100_000
    idx = torch.zeros(n, 4, dtype=torch.int32)
    idx[:, 0] = torch.randperm(batch_size, generator=gen)[:n // 2].int().repeat(2)
    idx[n // 2:, 3] = 1
    f = randn(gen, n, 2)
    x = sparse_tensor(f, idx, (1, 1, 2), batch_size, device)
    out = (sp.SparseGlobalMaxPool() if kind == "max" else sp.SparseGlobalAvgPool())(x).cpu()
    assert out.shape == (batch_size, 2)
    first, second = f[: n // 2], f[n // 2:]  # each used item holds one row of each half
    pooled = torch.maximum(first, second) if kind == "max" else (first + second) / 2
    items = idx[: n // 2, 0].long()
    torch.testing.assert_close(out[items], pooled)
    unused = torch.ones(batch_size, dtype=torch.bool)
    unused[items] = False
    assert out[unused].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_global_max_pool_shares_the_gradient_of_tied_maxima(device):
    # Ties are common after overlapping max pools, ReLUs or integer features. A negative gradient
    # must be shared out too (torch.segment_reduce's backward gave each tie all of it), and a
    # max of 0 or -inf takes no share for scatter_reduce's start value.
    idx = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 1]],
                       dtype=torch.int32)
    f = torch.tensor([[3.0, 0.0], [3.0, 0.0], [1.0, -2.0], [5.0, -math.inf], [4.0, -math.inf]],
                     dtype=torch.float64)
    upstream = torch.tensor([[-1.0, -3.0], [2.0, -1.0]], dtype=torch.float64)
    ours = f.clone().to(device).requires_grad_()
    pooled = sp.SparseGlobalMaxPool()(sparse_tensor(ours, idx, (2, 2, 2), 2, device))
    pooled.backward(upstream.to(device))
    want = f.clone().requires_grad_()
    ref.global_max_pool(want, idx, 2).backward(upstream)
    torch.testing.assert_close(ours.grad.cpu(), want.grad, rtol=0, atol=0)
    torch.testing.assert_close(want.grad, torch.tensor(
        [[-0.5, -1.5], [-0.5, -1.5], [0.0, 0.0], [2.0, -0.5], [0.0, -0.5]], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_window_pool_with_a_max_of_zero_or_minus_inf_keeps_the_whole_gradient(kind):
    # The reference's max pool start value must not take a share of the gradient either.
    idx = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.int32)
    f = torch.tensor([[0.0, -math.inf], [0.0, -math.inf], [-1.0, -math.inf]],
                     dtype=torch.float64, requires_grad=True)
    pool = ref.max_pool if kind == "max" else ref.avg_pool
    out, _, _ = pool(f, idx, [2, 2, 2], 1, 2, 2)
    out.backward(-torch.ones_like(out))
    assert f.grad.sum(0).tolist() == [-1.0, -1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_avg_pool_of_half_features_sums_in_float32(dtype, device):
    # A bfloat16 running sum stalls at 256 (the mean of 10,000 ones came out 0.0256), a float16
    # one overflows past 65504.
    idx = torch.zeros(10_000, 4, dtype=torch.int32)
    idx[:, 1:] = torch.stack(torch.meshgrid(*(torch.arange(22),) * 3, indexing="ij"), -1).reshape(
        -1, 3)[:10_000].int()
    f = torch.cat([torch.ones(10_000, 1), torch.full((10_000, 1), 20_000.0)], 1).to(dtype)
    out = sp.SparseGlobalAvgPool()(sparse_tensor(f, idx, (22, 22, 22), 1, device)).cpu()
    assert out.dtype == dtype
    assert out.float().tolist() == [[1.0, float(torch.tensor(20_000.0).to(dtype))]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_avg_pool_of_half_features_rounds_the_mean_once(dtype, device):
    # Summed and divided in the half type, a float16 window of 10,000s overflowed to inf, a
    # bfloat16 count of 343 became 344, and a quarter of the means were off by one rounding.
    idx = torch.stack(torch.meshgrid(*(torch.arange(7),) * 3, indexing="ij"), -1).reshape(-1, 3)
    idx = torch.cat([torch.zeros(343, 1, dtype=torch.long), idx], 1).int()
    gen = torch.Generator().manual_seed(3)
    f = torch.cat([torch.full((343, 1), 10_000.0), 1 + torch.rand(343, 40, generator=gen)], 1)
    f = f.to(dtype)
    for pool in (sp.SparseAvgPool3d(7), sp.SparseAvgPool3d(3, 2, 1)):
        out = pool(sparse_tensor(f, idx, (7, 7, 7), 1, device))
        want = pool(sparse_tensor(f.double(), idx, (7, 7, 7), 1, device)).features.to(dtype)
        assert torch.equal(out.features, want)


@pytest.mark.parametrize("device", DEVICES)
def test_huge_grid_with_too_many_sites_is_rejected(device):
    # batch * prod(shape) = 2^63 cannot be packed into an int64 key.
    idx = torch.zeros(1, 4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"spatial_shape .*2\^62"):
        ops.build_subm_map(idx, [2**21, 2**21, 2**21], 1, [3, 3, 3], [1, 1, 1])


# ----------------------------------------------------------------------------- precision

PRECISION_CASES = [
    ("subm", torch.bfloat16), ("conv", torch.bfloat16), ("transpose", torch.bfloat16),
    ("max", torch.bfloat16), ("avg", torch.bfloat16), ("subm", torch.float16),
    ("conv", torch.float16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, dtype", PRECISION_CASES, ids=case_id)
def test_reduced_precision_forward_close_to_float32(kind, dtype, device):
    gen = make_gen("precision", kind)
    idx = random_sites(gen, 2, (10, 9, 10), count=600).to(device)
    # The same (representable) values in both runs: only the op's rounding differs.
    features = randn(gen, 600, 16).to(device, dtype)
    layer = make_layer(kind, 3, 16, 16)
    if list(layer.parameters()):
        init_layer(layer, gen)
    layer.to(device)
    low = layer.to(dtype)(sparse_tensor(features, idx, (10, 9, 10), 2))
    high = layer.float()(sparse_tensor(features.float(), idx, (10, 9, 10), 2))
    assert low.features.dtype == dtype
    assert torch.equal(low.indices, high.indices)
    torch.testing.assert_close(low.features.float(), high.features, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_backward_close_to_float32(device):
    gen = make_gen("bf16_backward")
    idx = random_sites(gen, 2, (10, 9, 10), count=600).to(device)
    features = randn(gen, 600, 8).bfloat16().to(device)
    layer = init_layer(sp.SparseConv3d(8, 8, 3, stride=2, padding=1), gen).to(device)
    grads = {}
    for dtype in (torch.bfloat16, torch.float32):
        layer.zero_grad()
        layer.to(dtype)
        f = features.detach().to(dtype).clone().requires_grad_()
        out = layer(sparse_tensor(f, idx, (10, 9, 10), 2))
        out.features.float().square().sum().backward()
        grads[dtype] = (f.grad.float(), layer.weight.grad.float())
    for low, high in zip(grads[torch.bfloat16], grads[torch.float32]):
        torch.testing.assert_close(low, high, rtol=5e-2, atol=5e-2 * high.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_subm_dense_check_on_the_largest_channel_count(device):
    # 64 -> 64 channels with a 5^3 kernel: long float32 accumulations stay within 1e-5.
    gen = make_gen("channels64")
    idx = random_sites(gen, 1, (6, 6, 6), density=0.5)
    layer = init_layer(sp.SubMConv3d(64, 64, 5), gen, torch.float32)
    f = randn(gen, len(idx), 64, dtype=torch.float32)
    out = run_on(device, layer, sparse_tensor(f, idx, (6, 6, 6), 1, device))
    dense = dense_conv(densify(f.double(), idx, (6, 6, 6), 1), conv_weight(layer.weight.double()),
                       layer.bias.double(), 1, 2, 1)
    torch.testing.assert_close(out.features.cpu(), gather(dense, idx).float(),
                               **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_conv_weight_layout_kio(device):
    # ops.sparse_conv takes [K, C_in, C_out]; the module permutes [C_out, *k, C_in] to it.
    gen = make_gen("kio")
    idx = random_sites(gen, 1, (5, 5, 5), count=30).to(device)
    layer = init_layer(sp.SubMConv3d(3, 2, 3, bias=False), gen).to(device)
    f = randn(gen, 30, 3).to(device)
    nbr, nbr_t = ops.build_subm_map(idx, [5, 5, 5], 1, [3, 3, 3], [1, 1, 1])
    want = layer(sparse_tensor(f, idx, (5, 5, 5), 1)).features
    assert torch.equal(ops.sparse_conv(f, kio_weight(layer.weight), nbr, nbr_t), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)],
                         ids=case_id)
def test_half_weight_grad_sums_in_float32(dtype, tol, device):
    """Thousands of pairs per offset: summed in the half type itself, the weight gradient
    would drift by tens of percent (a float16 sum stops growing at 2048 times the addend)."""
    gen = make_gen("half_weight_grad")
    shape = [40, 40, 40]
    idx = random_sites(gen, 1, shape, count=6000)
    nbr, _ = ops.build_subm_map(idx, shape, 1, [3, 3, 3], [1, 1, 1])
    x = torch.rand(len(idx), 8, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.rand(len(idx), 8, generator=gen, dtype=torch.float64).to(dtype)
    want = torch.ops.spconv_lite.sparse_conv_weight_grad(x.double(), g.double(), nbr)
    got = torch.ops.spconv_lite.sparse_conv_weight_grad(x.to(device), g.to(device),
                                                         nbr.to(device))
    assert got.dtype == dtype
    error = (got.double().cpu() - want).abs().max() / want.abs().max()
    assert error < tol, error
