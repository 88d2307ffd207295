"""Fast path against the pure-PyTorch reference (spconv_lite/reference.py) at sizes where dense
comparisons get expensive: a few hundred to a few thousand sites, 1D to 4D, float64.

Output sites must be identical (same rows, same order), values and the gradients of features,
weight and bias equal to 1e-10, and the kernel maps hold exactly the reference's pairs. Every
test runs on each device of helpers.DEVICES (the reference always on the CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICES,
    TOL,
    case_id,
    distinct_values,
    init_layer,
    layer_class,
    make_gen,
    nbr_pairs,
    nbr_t_pairs,
    ntuple,
    randn,
    random_sites,
    run_on,
    sparse_tensor,
)

import spconv_lite as sp
from spconv_lite import ops
from spconv_lite import reference as ref

TOL64 = TOL[torch.float64]


def compare(fast, want, leaves, key) -> None:
    """Values, then the gradients of every leaf under one random upstream gradient."""
    fast = fast.cpu()
    assert fast.shape == want.shape
    torch.testing.assert_close(fast.detach(), want.detach(), **TOL64)
    upstream = randn(make_gen("upstream", key), *fast.shape)
    got = torch.autograd.grad((fast * upstream).sum(), leaves)
    expected = torch.autograd.grad((want * upstream).sum(), leaves)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, **TOL64)


def inputs(key, batch, shape, count, channels):
    gen = make_gen(*key)
    idx = random_sites(gen, batch, shape, count=count)
    f = randn(gen, count, channels).requires_grad_()
    return gen, idx, f


# (batch, c_in, c_out, spatial_shape, n_sites, kernel, dilation)
SUBM_CASES = [
    (2, 8, 16, (20, 20, 20), 2000, 3, 1),
    (1, 4, 4, (16, 24, 12), 1500, (3, 5, 1), (1, 2, 1)),
    (3, 5, 3, (40, 40), 1200, 5, 2),
    (2, 3, 6, (500,), 400, 3, 1),
    (2, 3, 4, (8, 8, 8, 8), 1500, 3, 1),
    (2, 8, 16, (20, 20, 20), 2000, 1, 1),  # 1x1: the weight's memory read as [C_in, C_out]
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", SUBM_CASES, ids=case_id)
def test_subm_conv_matches_reference(case, device):
    batch, c_in, c_out, shape, n, k, d = case
    gen, idx, f = inputs(("subm", case), batch, shape, n, c_in)
    layer = init_layer(layer_class("subm", len(shape))(c_in, c_out, k, dilation=d), gen)
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    want = ref.subm_conv(f, idx, list(shape), layer.weight, d, layer.bias)
    assert torch.equal(out.indices.cpu(), idx)
    compare(out.features, want, [f, layer.weight, layer.bias], case)


# (batch, c_in, c_out, spatial_shape, n_sites, kernel, stride, padding, dilation)
CONV_CASES = [
    (2, 16, 16, (24, 24, 24), 3000, 3, 2, 1, 1),
    (1, 4, 8, (30, 20, 10), 1000, (2, 3, 1), (2, 1, 3), (0, 1, 0), (1, 2, 1)),
    (2, 3, 5, (60, 50), 1000, 5, 3, 2, 2),
    (3, 2, 3, (800,), 600, 3, 2, 1, 1),
    (1, 3, 4, (10, 10, 10, 10), 1500, 2, 2, 0, 1),
    (2, 2, 2, (9, 8, 10, 9), 800, (3, 1, 2, 3), (1, 2, 2, 1), (1, 0, 1, 1), (2, 1, 1, 1)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_sparse_conv_matches_reference(case, device):
    batch, c_in, c_out, shape, n, k, s, p, d = case
    gen, idx, f = inputs(("conv", case), batch, shape, n, c_in)
    layer = init_layer(layer_class("conv", len(shape))(c_in, c_out, k, s, p, d), gen)
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    want, want_idx, want_shape = ref.sparse_conv(f, idx, list(shape), batch, layer.weight, s, p,
                                                 d, layer.bias)
    assert torch.equal(out.indices.cpu(), want_idx) and out.spatial_shape == want_shape
    compare(out.features, want, [f, layer.weight, layer.bias], case)


# (batch, c_in, c_out, spatial_shape, n_sites, kernel, stride, padding, dilation, output_padding)
TRANSPOSE_CASES = [
    (2, 8, 4, (12, 12, 12), 800, 3, 2, 1, 1, 1),
    (1, 3, 2, (30, 20), 300, (2, 3), (3, 1), (0, 1), (1, 2), (2, 0)),
    (2, 2, 3, (5, 6, 5, 6), 400, 2, 2, 0, 1, 0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=case_id)
def test_conv_transpose_matches_reference(case, device):
    batch, c_in, c_out, shape, n, k, s, p, d, op = case
    gen, idx, f = inputs(("transpose", case), batch, shape, n, c_in)
    layer = init_layer(
        layer_class("transpose", len(shape))(c_in, c_out, k, s, p, d, output_padding=op), gen)
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    want, want_idx, want_shape = ref.sparse_conv_transpose(
        f, idx, list(shape), batch, layer.weight, s, p, d, op, layer.bias)
    assert torch.equal(out.indices.cpu(), want_idx) and out.spatial_shape == want_shape
    compare(out.features, want, [f, layer.weight, layer.bias], case)


# (batch, c_in, c_out, spatial_shape, n_sites, kernel, stride, padding, dilation)
INVERSE_CASES = [
    (2, 8, 4, (20, 20, 20), 2000, 3, 2, 1, 1),
    (1, 3, 2, (40, 30), 700, (2, 5), (2, 3), (0, 2), (2, 1)),
    (2, 2, 3, (8, 8, 8, 8), 900, 3, 2, 1, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", INVERSE_CASES, ids=case_id)
def test_inverse_conv_matches_reference(case, device):
    batch, c_in, c_out, shape, n, k, s, p, d = case
    ndim = len(shape)
    gen, idx, f = inputs(("inverse", case), batch, shape, n, 2)
    down = layer_class("conv", ndim)(2, c_in, k, s, p, d, indice_key="down").double()
    mid = run_on(device, down, sparse_tensor(f.detach(), idx, shape, batch, device))
    g = randn(gen, *mid.features.shape).requires_grad_()
    layer = init_layer(layer_class("inverse", ndim)(c_in, c_out, k, indice_key="down"), gen)
    out = run_on(device, layer, mid.replace_feature(g.to(device)))
    want = ref.sparse_inverse_conv(g, mid.indices.cpu(), mid.spatial_shape, batch, layer.weight,
                                   idx, list(shape), s, p, d, layer.bias)
    assert torch.equal(out.indices.cpu(), idx) and out.spatial_shape == list(shape)
    compare(out.features, want, [g, layer.weight, layer.bias], case)


# (kind, batch, channels, spatial_shape, n_sites, kernel, stride, padding, dilation)
POOL_CASES = [
    ("max", 2, 16, (24, 24, 24), 3000, 3, 2, 1, 1),
    ("avg", 2, 16, (24, 24, 24), 3000, 3, 2, 1, 1),
    ("max", 1, 4, (50, 40), 900, (2, 3), None, (0, 1), (2, 1)),
    ("avg", 3, 4, (50, 40), 900, 5, 3, 2, 1),
    ("max", 2, 3, (9, 9, 9, 9), 1200, 2, None, 0, 1),
    ("max", 2, 5, (600,), 500, 3, 2, 1, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool_matches_reference(case, device):
    kind, batch, c, shape, n, k, s, p, d = case
    gen = make_gen("pool", case)
    idx = random_sites(gen, batch, shape, count=n)
    f = distinct_values(gen, n, c).requires_grad_()  # no ties: unique max gradients
    layer_cls = getattr(sp, f"Sparse{kind.capitalize()}Pool{len(shape)}d")
    out = layer_cls(k, s, p, d)(sparse_tensor(f, idx, shape, batch, device))
    ref_pool = ref.max_pool if kind == "max" else ref.avg_pool
    want, want_idx, want_shape = ref_pool(f, idx, list(shape), batch, k, s, p, d)
    assert torch.equal(out.indices.cpu(), want_idx) and out.spatial_shape == want_shape
    compare(out.features, want, [f], case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_global_pool_matches_reference(kind, device):
    gen = make_gen("global", kind)
    idx = random_sites(gen, 4, (20, 20, 20), count=3000)
    idx = idx[idx[:, 0] != 2]  # one batch item without sites
    f = distinct_values(gen, len(idx), 8).requires_grad_()
    x = sparse_tensor(f, idx, (20, 20, 20), 4, device)
    if kind == "max":
        out, want = sp.SparseGlobalMaxPool()(x), ref.global_max_pool(f, idx, 4)
    else:
        out, want = sp.SparseGlobalAvgPool()(x), ref.global_avg_pool(f, idx, 4)
    compare(out, want, [f], kind)


# (mode, batch, spatial_shape, n_sites, kernel, stride, padding, dilation)
MAP_CASES = [
    ("subm", 2, (20, 20, 20), 2500, (3, 5, 3), 1, 0, (1, 1, 2)),
    # nearly dense rows, dilated along the last axis: windows hold many sites between the
    # kernel positions, which the CPU map search skips over
    ("subm", 2, (3, 4, 60), 600, (3, 3, 5), 1, 0, (1, 2, 7)),
    ("conv", 2, (20, 20, 20), 2500, 3, 2, 1, 1),
    ("conv", 1, (40, 30), 800, (4, 3), (3, 2), (2, 0), (1, 2)),
    ("transpose", 2, (10, 10, 10), 600, 3, 2, 1, 1),
    ("transpose", 1, (7, 6, 7, 6), 400, (2, 3, 1, 2), (2, 1, 3, 2), (0, 1, 0, 1), 1),
    # ~150k pairs: the CPU sort and map walk split them into several chunks
    ("conv", 1, (40, 40, 40), 6000, 3, 1, 1, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MAP_CASES, ids=case_id)
def test_kernel_maps_hold_the_reference_pairs(case, device):
    mode, batch, shape, n, k, s, p, d = case
    ndim = len(shape)
    k, s, p, d = (ntuple(v, ndim) for v in (k, s, p, d))
    idx = random_sites(make_gen("map", case), batch, shape, count=n)
    if mode == "subm":
        nbr, nbr_t = (t.cpu() for t in ops.build_subm_map(idx.to(device), shape, batch, k, d))
        out_idx = idx
        want_idx, pairs = ref.kernel_pairs(idx, shape, k, 1, 0, d, "subm")
    else:
        if mode == "conv":
            out_shape = ref.conv_output_shape(shape, k, s, p, d)
        else:
            out_shape = ref.conv_transpose_output_shape(shape, k, s, p, d, 0)
        out_idx, nbr, nbr_t = (t.cpu() for t in ops.build_conv_map(
            idx.to(device), shape, batch, out_shape, k, s, p, d, mode == "transpose"))
        want_idx, pairs = ref.kernel_pairs(idx, out_shape, k, s, p, d, mode)
    assert torch.equal(out_idx, want_idx)
    volume = math.prod(k)
    assert nbr.dtype == nbr_t.dtype == torch.int32
    assert nbr.shape == (len(out_idx), volume) and nbr_t.shape == (len(idx), volume)
    assert nbr_pairs(nbr) == set(pairs)
    assert nbr_t_pairs(nbr_t) == set(pairs)
