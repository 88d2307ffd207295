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
from functools import partial
from typing import Optional

import pytest
import torch
from cases import DENSE_CASES, POOL_INVERSE_CASES, op_cases
from helpers import (
    CONV_T,
    DEVICES,
    DenseRun,
    case_id,
    case_sites,
    check_gradients,
    check_values,
    conv_geometry,
    conv_shape,
    conv_support,
    conv_t_weight,
    conv_weight,
    dense_avg_pool,
    dense_conv,
    dense_global_pool,
    dense_inverse_conv,
    dense_max_pool,
    densify,
    distinct_values,
    gather,
    init_layer,
    is_1x1,
    layer_class,
    ntuple,
    randn,
    run_on,
    skip_if_empty,
    sparse_tensor,
    transpose_shape,
    transpose_support,
)
from torch import Tensor

import spconv_lite as sp

DTYPES = [torch.float64, torch.float32]


def leaves_of(features: Tensor, layer) -> list:
    return [features] + [p for p in (layer.weight, layer.bias) if p is not None]


def g_device(x) -> str:
    return str(x.indices.device)


def as_double(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.double()


# ----------------------------------------------------------------------------- runners

def run_conv(case, dtype, device) -> DenseRun:
    batch, c_in, c_out, shape, k, s, p, d = case
    ndim = len(shape)
    kk, ss, pp, dd = conv_geometry(shape, k, s, p, d)
    gen, idx = case_sites(batch, shape, "conv", case)
    # The layer gets the case's ints or tuples as they are, like user code would pass them.
    layer = init_layer(layer_class("conv", ndim)(c_in, c_out, k, s, p, d), gen, dtype)
    f = randn(gen, len(idx), c_in, dtype=dtype).requires_grad_()
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    dense = dense_conv(densify(f.double(), idx, shape, batch),
                       conv_weight(layer.weight.double(), is_1x1(kk, ss)), as_double(layer.bias),
                       ss, pp, dd)
    expected = conv_support(idx, shape, batch, kk, ss, pp, dd)
    if is_1x1(kk, ss) and not any(pp):  # a 1x1 layer keeps its input's rows, as spconv's
        expected = idx
    return DenseRun(out.features, gather(dense, expected), leaves_of(f, layer), out.indices,
                    expected, out.spatial_shape, list(dense.shape[2:]))


def run_subm(case, dtype, device) -> DenseRun:
    batch, c_in, c_out, shape, k, d = case
    ndim = len(shape)
    kk, dd = ntuple(k, ndim), ntuple(d, ndim)
    gen, idx = case_sites(batch, shape, "subm", case)
    layer = init_layer(layer_class("subm", ndim)(c_in, c_out, k, dilation=d), gen, dtype)
    f = randn(gen, len(idx), c_in, dtype=dtype).requires_grad_()
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    pad = [d_ * (k_ - 1) // 2 for k_, d_ in zip(kk, dd)]
    dense = dense_conv(densify(f.double(), idx, shape, batch),
                       conv_weight(layer.weight.double(), is_1x1(kk, subm=True)),
                       as_double(layer.bias), 1, pad, dd)
    # Submanifold: the output rows are the input rows, same order.
    return DenseRun(out.features, gather(dense, idx), leaves_of(f, layer), out.indices, idx,
                    out.spatial_shape, list(shape))


def run_transpose(case, dtype, device) -> DenseRun:
    batch, c_in, c_out, shape, k, s, p, d, op = case
    ndim = len(shape)
    kk, ss, pp, dd, oo = (ntuple(v, ndim) for v in (k, s, p, d, op))
    skip_if_empty(transpose_shape(shape, kk, ss, pp, dd, oo))
    gen, idx = case_sites(batch, shape, "transpose", case)
    layer = init_layer(
        layer_class("transpose", ndim)(c_in, c_out, k, s, p, d, output_padding=op), gen, dtype)
    f = randn(gen, len(idx), c_in, dtype=dtype).requires_grad_()
    out = run_on(device, layer, sparse_tensor(f, idx, shape, batch, device))
    dense = CONV_T[ndim](densify(f.double(), idx, shape, batch),
                         conv_t_weight(layer.weight.double(), is_1x1(kk, ss)),
                         as_double(layer.bias), ss, pp, oo, 1, dd)
    expected = transpose_support(idx, shape, batch, kk, ss, pp, dd, oo)
    if is_1x1(kk, ss) and not any(pp) and not any(oo):
        expected = idx
    assert list(dense.shape[2:]) == transpose_shape(shape, kk, ss, pp, dd, oo)
    return DenseRun(out.features, gather(dense, expected), leaves_of(f, layer), out.indices,
                    expected, out.spatial_shape, list(dense.shape[2:]))


def inverse_run(g: Tensor, mid, idx: Tensor, shape, batch, layer, k, s, p, d) -> DenseRun:
    """The inverse layer on leaf features ``g`` at the sites of ``mid`` (the strided layer's
    output), against the dense conv_transpose at the strided layer's input sites."""
    out = run_on(g_device(mid), layer, mid.replace_feature(g.to(mid.indices.device)))
    dense = dense_inverse_conv(g.double(), mid.indices, mid.spatial_shape, shape, batch,
                               layer.weight.double(), as_double(layer.bias), k, s, p, d)
    return DenseRun(out.features, gather(dense, idx), leaves_of(g, layer), out.indices, idx,
                    out.spatial_shape, list(shape))


def run_inverse(case, dtype, device) -> DenseRun:
    batch, c_in, c_out, shape, k, s, p, d = case
    ndim = len(shape)
    kk, ss, pp, dd = conv_geometry(shape, k, s, p, d)
    gen, idx = case_sites(batch, shape, "inverse", case)
    down = layer_class("conv", ndim)(3, c_in, k, s, p, d, indice_key="down").to(dtype)
    x = sparse_tensor(randn(gen, len(idx), 3, dtype=dtype), idx, shape, batch, device)
    mid = run_on(device, down, x)
    # Fresh leaf features on the strided conv's output sites, so only the inverse is tested.
    g = randn(gen, *mid.features.shape, dtype=dtype).requires_grad_()
    layer = init_layer(layer_class("inverse", ndim)(c_in, c_out, k, indice_key="down"), gen,
                       dtype)
    return inverse_run(g, mid, idx, shape, batch, layer, kk, ss, pp, dd)


def run_pool_inverse(case, dtype, device) -> DenseRun:
    """Inverse conv keyed on a max pool (stride = kernel, the pool's default)."""
    batch, c_in, c_out, shape, k = case
    ndim = len(shape)
    kk = ntuple(k, ndim)
    gen, idx = case_sites(batch, shape, "pool_inverse", case)
    x = sparse_tensor(randn(gen, len(idx), c_in, dtype=dtype), idx, shape, batch, device)
    mid = layer_class("max", ndim)(k, indice_key="pool")(x)
    g = randn(gen, *mid.features.shape, dtype=dtype).requires_grad_()
    layer = init_layer(layer_class("inverse", ndim)(c_in, c_out, k, indice_key="pool"), gen, dtype)
    return inverse_run(g, mid, idx, shape, batch, layer, kk, kk, (0,) * ndim, (1,) * ndim)


def run_pool(kind, case, dtype, device) -> DenseRun:
    batch, c, shape, k, s, p, d = case
    kk, ss, pp, dd = conv_geometry(shape, k, s, p, d)
    gen, idx = case_sites(batch, shape, kind, case)
    # Distinct values: no ties, so the max pool gradient is well defined.
    f = distinct_values(gen, len(idx), c, dtype=dtype).requires_grad_()
    layer = layer_class(kind, len(shape))(k, s, p, d)
    out = layer(sparse_tensor(f, idx, shape, batch, device))
    dense_pool = dense_max_pool if kind == "max" else dense_avg_pool
    dense = dense_pool(f.double(), idx, shape, batch, kk, ss, pp, dd)
    expected = conv_support(idx, shape, batch, kk, ss, pp, dd)
    assert list(dense.shape[2:]) == conv_shape(shape, kk, ss, pp, dd)
    return DenseRun(out.features, gather(dense, expected), [f], out.indices, expected,
                    out.spatial_shape, list(dense.shape[2:]))


def run_global(kind, case, dtype, device) -> DenseRun:
    batch, c, shape, empty_item = case
    gen, idx = case_sites(batch, shape, "global", kind, case)
    if empty_item is not None:
        idx = idx[idx[:, 0] != empty_item]
    f = distinct_values(gen, len(idx), c, dtype=dtype).requires_grad_()
    layer = sp.SparseGlobalMaxPool() if kind == "max" else sp.SparseGlobalAvgPool()
    out = layer(sparse_tensor(f, idx, shape, batch, device))
    return DenseRun(out, dense_global_pool(kind, f.double(), idx, shape, batch), [f])


RUNNERS = {
    "conv": run_conv,
    "subm": run_subm,
    "transpose": run_transpose,
    "inverse": run_inverse,
    "pool_inverse": run_pool_inverse,
    "max_pool": partial(run_pool, "max"),
    "avg_pool": partial(run_pool, "avg"),
    "global_max": partial(run_global, "max"),
    "global_avg": partial(run_global, "avg"),
}

# ----------------------------------------------------------------------------- tests
# The shared tables (cases.py), plus the inverse conv keyed on a max pool.

CASES = op_cases({**DENSE_CASES, "pool_inverse": POOL_INVERSE_CASES})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("op, case", CASES)
def test_matches_dense(op, case, dtype, device):
    run = RUNNERS[op](case, dtype, device)
    check_values(run, dtype)
    check_gradients(run, dtype, "upstream", (op, case))


# Max pool on ties and NaN, which the tables avoid (distinct values): dense F.max_pool*d takes
# the first maximum in window order, which is the lowest offset, and a NaN wherever it lies.
TIE_POOLS = [(2, None, 0), (3, 2, 1), (3, 1, 1)]  # kernel, stride, padding
TIE_SHAPE, TIE_BATCH = [6, 5, 7], 2


def max_pools(f: Tensor, f_dense: Tensor, idx: Tensor, k, s, p, device) -> tuple[Tensor, Tensor]:
    """The features of the sparse max pool of ``f`` (checking its sites) and the dense max
    pool of ``f_dense`` at those sites."""
    kk, ss, pp, dd = conv_geometry(TIE_SHAPE, k, s, p, 1)
    out = sp.SparseMaxPool3d(k, s, p)(sparse_tensor(f, idx, TIE_SHAPE, TIE_BATCH, device))
    expected = conv_support(idx, TIE_SHAPE, TIE_BATCH, kk, ss, pp, dd)
    torch.testing.assert_close(out.indices.cpu(), expected)
    dense = dense_max_pool(f_dense, idx, TIE_SHAPE, TIE_BATCH, kk, ss, pp, dd)
    return out.features, gather(dense, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=case_id)
@pytest.mark.parametrize("k, s, p", TIE_POOLS)
def test_max_pool_ties_go_to_the_lowest_offset_as_dense(k, s, p, dtype, device):
    gen, idx = case_sites(TIE_BATCH, TIE_SHAPE, "pool_ties", k, s, p)
    f = torch.randint(1, 4, (len(idx), 3), generator=gen).to(dtype).requires_grad_()  # ties
    f_dense = f.detach().double().requires_grad_()
    out, dense = max_pools(f, f_dense, idx, k, s, p, device)
    torch.testing.assert_close(out.double().cpu(), dense, rtol=0, atol=0)
    upstream = randn(gen, *dense.shape)
    (out.double() * upstream.to(out.device)).sum().backward()
    (dense * upstream).sum().backward()
    torch.testing.assert_close(f.grad.double().cpu(), f_dense.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=case_id)
@pytest.mark.parametrize("k, s, p", TIE_POOLS)
def test_max_pool_of_a_window_with_nan_is_nan_as_dense(k, s, p, dtype, device):
    gen, idx = case_sites(TIE_BATCH, TIE_SHAPE, "pool_nan", k, s, p)
    f = randn(gen, len(idx), 3, dtype=dtype)
    f[torch.randperm(len(idx), generator=gen)[: len(idx) // 8], 1] = math.nan  # one channel
    out, dense = max_pools(f, f.double(), idx, k, s, p, device)
    assert dense[:, 1].isnan().any() and not dense[:, 1].isnan().all()
    torch.testing.assert_close(out.double().cpu(), dense, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=case_id)
def test_max_pool_gradient_goes_to_the_last_nan_as_dense(dtype):
    # F.max_pool3d takes every NaN it meets ((val > max) || isnan(val)): the last NaN in window
    # order receives the gradient and the forward-mode tangent.
    idx = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.int32)
    f = torch.tensor([[math.nan], [1.0], [math.nan], [2.0]], dtype=dtype, requires_grad=True)
    out = sp.SparseMaxPool3d((1, 2, 2), (1, 2, 2))(sp.SparseConvTensor(f, idx, [1, 2, 2], 1))
    (grad,) = torch.autograd.grad(out.features.sum(), f)
    f_dense = f.detach().double().requires_grad_()
    dense = sp.SparseConvTensor(f_dense, idx, [1, 2, 2], 1).dense()
    (want,) = torch.autograd.grad(torch.nn.functional.max_pool3d(dense, (1, 2, 2)).sum(), f_dense)
    assert want.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(grad.double(), want, rtol=0, atol=0)
