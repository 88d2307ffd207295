"""Fast path (C++ ops through the public modules) against dense PyTorch.

Every conv and pool layer runs on random sparse inputs and is compared with its dense
counterpart (F.conv*d, F.conv_transpose*d, F.max_pool*d with -inf at inactive sites, dense
sum / dense active count for average pooling):

* the output sites equal the dense output's support, computed exactly from an occupancy mask
  convolved with a ones kernel, in sorted order; the output spatial shape equals the dense one;
* the values at those sites match (float64: rtol 1e-10; float32: rtol/atol 1e-5, against the
  dense result computed in float64 from the same float32 values);
* the gradients of features, weight and bias match dense autograd.

Every test runs on each device of helpers.DEVICES; the dense side always runs on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor

import spconv_lite as sp
from helpers import (
    CONV_T, DEVICES, TOL, case_id, conv_shape, conv_support, conv_t_weight, conv_weight, dense_avg_pool,
    dense_conv, dense_max_pool, densify, distinct_values, gather, init_layer, layer_class,
    make_gen, ntuple, occupancy, ones_kernel, randn, random_sites, run_on, sparse_tensor,
    support_sites, transpose_shape,
)

DTYPES = [torch.float64, torch.float32]


@dataclass
class Run:
    """One layer run on the fast path, and dense torch evaluated at the expected sites."""

    sparse: Tensor
    dense: Tensor  # float64
    leaves: list
    out_indices: Optional[Tensor] = None
    expected_indices: Optional[Tensor] = None
    out_shape: Optional[list] = None
    expected_shape: Optional[list] = None


def check(run: Run, dtype: torch.dtype, key) -> None:
    """Sites, shape, values and (when there are leaves) gradients of a run."""
    run.sparse = run.sparse.cpu()
    if run.expected_indices is not None:
        assert run.out_indices.dtype == torch.int32
        assert torch.equal(run.out_indices.cpu(), run.expected_indices)
    if run.expected_shape is not None:
        assert isinstance(run.out_shape, list) and run.out_shape == run.expected_shape
    assert run.sparse.dtype == dtype and run.sparse.shape == run.dense.shape
    torch.testing.assert_close(run.sparse.detach(), run.dense.detach().to(dtype), **TOL[dtype])

    upstream = randn(make_gen("upstream", key), *run.sparse.shape)
    got = torch.autograd.grad((run.sparse * upstream.to(dtype)).sum(), run.leaves)
    want = torch.autograd.grad((run.dense * upstream).sum(), run.leaves)
    for leaf, g, w in zip(run.leaves, got, want):
        assert g.shape == leaf.shape and g.dtype == dtype
        torch.testing.assert_close(g, w, **TOL[dtype])


def leaves_of(features: Tensor, layer) -> list:
    return [features] + [p for p in (layer.weight, layer.bias) if p is not None]


def as_double(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.double()


# ----------------------------------------------------------------------------- runners

def run_conv(case, dtype, device) -> Run:
    batch, c_in, c_out, shape, k, s, p, d = case
    ndim = len(shape)
    kk, ss, pp, dd = (ntuple(v, ndim) for v in (k, s, p, d))
    gen = make_gen("conv", case)
    idx = random_sites(gen, batch, shape)
    # The layer gets the case's ints or tuples as they are, like user code would pass them.
    layer = init_layer(layer_class("conv", ndim)(c_in, c_out, k, s, p, d), gen, dtype)
    f = randn(gen, len(idx), c_in, dtype=dtype).requires_grad_()
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    dense = dense_conv(densify(f.double(), idx, shape, batch), conv_weight(layer.weight.double()),
                       as_double(layer.bias), ss, pp, dd)
    expected = conv_support(idx, shape, batch, kk, ss, pp, dd)
    return Run(out.features, gather(dense, expected), leaves_of(f, layer), out.indices, expected,
               out.spatial_shape, list(dense.shape[2:]))


def run_subm(case, dtype, device) -> Run:
    batch, c_in, c_out, shape, k, d = case
    ndim = len(shape)
    kk, dd = ntuple(k, ndim), ntuple(d, ndim)
    gen = make_gen("subm", case)
    idx = random_sites(gen, batch, shape)
    layer = init_layer(layer_class("subm", ndim)(c_in, c_out, k, dilation=d), gen, dtype)
    f = randn(gen, len(idx), c_in, dtype=dtype).requires_grad_()
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    pad = [d_ * (k_ - 1) // 2 for k_, d_ in zip(kk, dd)]
    dense = dense_conv(densify(f.double(), idx, shape, batch), conv_weight(layer.weight.double()),
                       as_double(layer.bias), 1, pad, dd)
    # Submanifold: the output rows are the input rows, same order.
    return Run(out.features, gather(dense, idx), leaves_of(f, layer), out.indices, idx,
               out.spatial_shape, list(shape))


def run_transpose(case, dtype, device) -> Run:
    batch, c_in, c_out, shape, k, s, p, d, op = case
    ndim = len(shape)
    kk, ss, pp, dd, oo = (ntuple(v, ndim) for v in (k, s, p, d, op))
    gen = make_gen("transpose", case)
    idx = random_sites(gen, batch, shape)
    layer = init_layer(
        layer_class("transpose", ndim)(c_in, c_out, k, s, p, d, output_padding=op), gen, dtype)
    f = randn(gen, len(idx), c_in, dtype=dtype).requires_grad_()
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    dense = CONV_T[ndim](densify(f.double(), idx, shape, batch),
                         conv_t_weight(layer.weight.double()), as_double(layer.bias), ss, pp, oo,
                         1, dd)
    count = CONV_T[ndim](occupancy(idx, shape, batch), ones_kernel(kk), None, ss, pp, oo, 1, dd)
    expected = support_sites(count)
    assert list(dense.shape[2:]) == transpose_shape(shape, kk, ss, pp, dd, oo)
    return Run(out.features, gather(dense, expected), leaves_of(f, layer), out.indices, expected,
               out.spatial_shape, list(dense.shape[2:]))


def inverse_expected(g: Tensor, mid_idx: Tensor, mid_shape, idx: Tensor, shape, batch, layer,
                     k, s, p, d) -> Tensor:
    """Dense conv_transpose of the strided conv's output, at the strided conv's input sites."""
    ndim = len(shape)
    # output_padding makes the transpose land exactly on the conv's input shape.
    op = [n - m for n, m in zip(shape, transpose_shape(mid_shape, k, s, p, d, (0,) * ndim))]
    dense = CONV_T[ndim](densify(g.double(), mid_idx, mid_shape, batch),
                         conv_t_weight(layer.weight.double()), as_double(layer.bias), s, p, op,
                         1, d)
    assert list(dense.shape[2:]) == list(shape)
    return gather(dense, idx)


def run_inverse(case, dtype, device) -> Run:
    batch, c_in, c_out, shape, k, s, p, d = case
    ndim = len(shape)
    kk, ss, pp, dd = (ntuple(v, ndim) for v in (k, s, p, d))
    gen = make_gen("inverse", case)
    idx = random_sites(gen, batch, shape)
    down = layer_class("conv", ndim)(3, c_in, k, s, p, d, indice_key="down").to(dtype)
    x = sparse_tensor(randn(gen, len(idx), 3, dtype=dtype), idx, shape, batch, device)
    mid = run_on(device, down, x)
    # Fresh leaf features on the strided conv's output sites, so only the inverse is tested.
    g = randn(gen, *mid.features.shape, dtype=dtype).requires_grad_()
    layer = init_layer(layer_class("inverse", ndim)(c_in, c_out, k, indice_key="down"), gen,
                       dtype)
    out = run_on(device, layer, mid.replace_feature(g.to(device)))
    want = inverse_expected(g, mid.indices.cpu(), mid.spatial_shape, idx, shape, batch, layer, kk, ss,
                            pp, dd)
    return Run(out.features, want, leaves_of(g, layer), out.indices, idx, out.spatial_shape,
               list(shape))


def run_pool_inverse(case, dtype, device) -> Run:
    """Inverse conv keyed on a max pool (stride = kernel, the pool's default)."""
    batch, c_in, c_out, shape, k = case
    ndim = len(shape)
    kk = ntuple(k, ndim)
    gen = make_gen("pool_inverse", case)
    idx = random_sites(gen, batch, shape)
    x = sparse_tensor(randn(gen, len(idx), c_in, dtype=dtype), idx, shape, batch, device)
    mid = layer_class("max", ndim)(k, indice_key="pool")(x)
    g = randn(gen, *mid.features.shape, dtype=dtype).requires_grad_()
    layer = init_layer(layer_class("inverse", ndim)(c_in, c_out, k, indice_key="pool"), gen, dtype)
    out = run_on(device, layer, mid.replace_feature(g.to(device)))
    want = inverse_expected(g, mid.indices.cpu(), mid.spatial_shape, idx, shape, batch, layer, kk, kk,
                            (0,) * ndim, (1,) * ndim)
    return Run(out.features, want, leaves_of(g, layer), out.indices, idx, out.spatial_shape,
               list(shape))


def run_pool(kind, case, dtype, device) -> Run:
    batch, c, shape, k, s, p, d = case
    ndim = len(shape)
    kk, pp, dd = ntuple(k, ndim), ntuple(p, ndim), ntuple(d, ndim)
    ss = kk if s is None else ntuple(s, ndim)
    gen = make_gen(kind, case)
    idx = random_sites(gen, batch, shape)
    # Distinct values: no ties, so the max pool gradient is well defined.
    f = distinct_values(gen, len(idx), c, dtype=dtype).requires_grad_()
    layer = layer_class(kind, ndim)(k, s, p, d)
    out = layer(sparse_tensor(f, idx, shape, batch, device))
    dense_pool = dense_max_pool if kind == "max" else dense_avg_pool
    dense = dense_pool(f.double(), idx, shape, batch, kk, ss, pp, dd)
    expected = conv_support(idx, shape, batch, kk, ss, pp, dd)
    assert list(dense.shape[2:]) == conv_shape(shape, kk, ss, pp, dd)
    return Run(out.features, gather(dense, expected), [f], out.indices, expected,
               out.spatial_shape, list(dense.shape[2:]))


def run_global(kind, case, dtype, device) -> Run:
    batch, c, shape, empty_item = case
    gen = make_gen("global", kind, case)
    idx = random_sites(gen, batch, shape)
    if empty_item is not None:
        idx = idx[idx[:, 0] != empty_item]
    f = distinct_values(gen, len(idx), c, dtype=dtype).requires_grad_()
    layer = sp.SparseGlobalMaxPool() if kind == "max" else sp.SparseGlobalAvgPool()
    out = layer(sparse_tensor(f, idx, shape, batch, device))
    fd = f.double()
    if kind == "max":
        dense = densify(fd, idx, shape, batch, fill=-math.inf).flatten(2).amax(2)
        dense = torch.where(dense == -math.inf, torch.zeros_like(dense), dense)
    else:
        sums = densify(fd, idx, shape, batch).flatten(2).sum(2)
        dense = sums / occupancy(idx, shape, batch).flatten(2).sum(2).clamp(min=1)
    return Run(out, dense, [f])


# ----------------------------------------------------------------------------- cases
# Together the cases cover kernel 1/2/3/5, stride 1..3, padding 0..2, dilation 1/2, batch 1..3,
# channels 1..64, per-dimension tuples, and 1D/2D/3D (4D where torch has a dense counterpart).

# (batch, c_in, c_out, spatial_shape, kernel, stride, padding, dilation)
CONV_CASES = [
    (1, 1, 1, (11,), 3, 1, 0, 1),
    (2, 3, 4, (10,), 5, 2, 2, 1),
    (3, 2, 3, (9,), 2, 3, 1, 2),
    (1, 4, 2, (7,), 1, 2, 0, 1),
    (2, 1, 2, (8,), 1, 1, 2, 1),  # padding with a 1-kernel: outputs on the border
    (1, 2, 3, (7, 8), 3, 2, 1, 1),
    (2, 3, 2, (8, 7), (3, 2), (1, 2), (0, 1), (2, 1)),
    (2, 1, 5, (9, 9), 5, 1, 2, 1),
    (3, 4, 4, (6, 9), 2, 2, 0, 1),
    (1, 3, 3, (9, 8), (5, 1), (3, 1), (2, 0), (1, 2)),
    (2, 2, 2, (7, 7), 3, 3, 2, 2),
    (1, 1, 1, (5, 6, 7), 3, 1, 1, 1),
    (2, 3, 4, (7, 7, 7), 3, 2, 1, 1),
    (2, 4, 3, (6, 7, 8), 2, 2, 0, 1),
    (3, 2, 2, (5, 5, 5), 1, 1, 0, 1),
    (1, 3, 5, (8, 7, 6), (3, 1, 2), (2, 1, 3), (1, 0, 2), (1, 2, 1)),
    (2, 2, 3, (9, 8, 7), 5, 2, 2, 1),
    (1, 2, 2, (9, 9, 9), 3, 3, 2, 2),
    (2, 5, 3, (7, 6, 5), (2, 3, 3), 1, (0, 1, 2), (2, 2, 1)),
    (3, 3, 2, (6, 6, 6), (5, 2, 1), (1, 3, 2), (2, 1, 0), (1, 1, 2)),
    (1, 64, 32, (5, 5, 5), 3, 2, 1, 1),
    (2, 16, 64, (6, 6, 6), 3, 1, 0, 1),
    (2, 2, 3, (4, 5, 4, 5), 3, (1, 2, 1, 2), 1, 1),
    (1, 3, 2, (5, 4, 4, 4), (2, 3, 1, 3), 2, (0, 1, 0, 1), (2, 1, 1, 1)),
]

# (batch, c_in, c_out, spatial_shape, kernel, dilation); submanifold kernels are odd.
SUBM_CASES = [
    (1, 1, 1, (11,), 3, 1),
    (2, 3, 2, (9,), 5, 2),
    (3, 2, 2, (8,), 1, 1),
    (2, 2, 3, (8, 7), 3, 1),
    (3, 3, 3, (9, 9), (5, 3), (1, 2)),
    (1, 4, 2, (7, 8), 1, 1),
    (2, 2, 4, (6, 7, 8), 3, 1),
    (1, 3, 2, (7, 7, 7), 3, 2),
    (2, 2, 2, (8, 7, 6), (1, 3, 5), (1, 2, 1)),
    (1, 2, 3, (6, 6, 6), 5, 1),
    (1, 64, 48, (5, 5, 5), 3, 1),
    (2, 2, 3, (4, 4, 5, 4), 3, (1, 1, 2, 1)),
]

# (batch, c_in, c_out, spatial_shape, kernel, stride, padding, dilation, output_padding)
TRANSPOSE_CASES = [
    (1, 2, 3, (5,), 3, 2, 1, 1, 1),
    (2, 1, 2, (6,), 2, 3, 0, 1, 2),
    (3, 3, 1, (5,), 1, 1, 0, 1, 0),
    (1, 3, 2, (5, 4), 3, 1, 0, 1, 0),
    (2, 2, 2, (4, 5), (3, 2), (2, 1), (1, 0), (1, 2), (1, 1)),
    (3, 2, 3, (4, 4), 5, 2, 2, 1, 0),
    (1, 2, 2, (4, 3, 5), 3, 2, 1, 1, 1),
    (2, 3, 2, (3, 4, 3), 2, 2, 0, 1, 0),
    (1, 2, 3, (4, 4, 4), (1, 3, 2), (3, 1, 2), (0, 1, 1), (1, 2, 2), (2, 0, 1)),
    (2, 1, 1, (3, 3, 3), 5, 3, 2, 2, 1),
    (1, 32, 16, (4, 4, 4), 3, 2, 1, 1, 1),
]

# (batch, c_in, c_out, conv input spatial_shape, kernel, stride, padding, dilation)
INVERSE_CASES = [
    (1, 2, 3, (9,), 3, 2, 1, 1),
    (3, 1, 2, (10,), 5, 3, 2, 2),
    (2, 3, 2, (8, 9), 2, 2, 0, 1),
    (1, 2, 2, (9, 8), (3, 5), (3, 2), (2, 1), (1, 2)),
    (2, 3, 4, (7, 7, 7), 3, 2, 1, 1),
    (1, 2, 2, (8, 7, 9), (2, 3, 1), (2, 3, 1), (0, 2, 0), (2, 1, 1)),
    (2, 1, 2, (6, 6, 6), 5, 1, 2, 1),
    (1, 16, 32, (6, 6, 6), 3, 2, 1, 1),
]

# (batch, c_in, c_out, spatial_shape, pool kernel)
POOL_INVERSE_CASES = [
    (2, 3, 2, (8, 9), 2),
    (1, 4, 3, (7, 7, 6), (2, 3, 2)),
]

# (batch, channels, spatial_shape, kernel, stride or None, padding, dilation)
POOL_CASES = [
    (2, 3, (9,), 2, None, 0, 1),
    (1, 2, (9,), 3, 2, 1, 2),
    (3, 1, (8,), 1, 3, 0, 1),
    (2, 2, (8, 7), 3, 2, 1, 1),
    (3, 1, (9, 9), (2, 3), (2, 1), (0, 1), (1, 2)),
    (1, 4, (7, 8), 5, 3, 2, 1),
    (2, 3, (6, 7, 8), 2, None, 0, 1),
    (1, 2, (7, 7, 7), 3, 2, 1, 1),
    (2, 2, (8, 7, 6), (3, 1, 2), (1, 2, 3), (1, 0, 2), (2, 1, 1)),
    (3, 5, (6, 6, 6), 3, 1, 1, 2),
    (1, 64, (5, 5, 5), 3, 1, 1, 1),
]

# (batch, channels, spatial_shape, batch item left without sites or None)
GLOBAL_CASES = [
    (1, 3, (9,), None),
    (3, 2, (7, 8), 1),
    (2, 5, (5, 6, 7), None),
    (3, 64, (4, 4, 4), 2),
]


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_sparse_conv_matches_dense(case, dtype, device):
    check(run_conv(case, dtype, device), dtype, ("conv", case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("case", SUBM_CASES, ids=case_id)
def test_subm_conv_matches_dense(case, dtype, device):
    check(run_subm(case, dtype, device), dtype, ("subm", case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=case_id)
def test_conv_transpose_matches_dense(case, dtype, device):
    check(run_transpose(case, dtype, device), dtype, ("transpose", case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("case", INVERSE_CASES, ids=case_id)
def test_inverse_conv_matches_dense_transpose(case, dtype, device):
    check(run_inverse(case, dtype, device), dtype, ("inverse", case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("case", POOL_INVERSE_CASES, ids=case_id)
def test_inverse_conv_of_max_pool_matches_dense_transpose(case, dtype, device):
    check(run_pool_inverse(case, dtype, device), dtype, ("pool_inverse", case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pool_matches_dense(case, kind, dtype, device):
    check(run_pool(kind, case, dtype, device), dtype, (kind, case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", GLOBAL_CASES, ids=case_id)
def test_global_pool_matches_dense(case, kind, dtype, device):
    check(run_global(kind, case, dtype, device), dtype, ("global", kind, case))
