"""CUDA against CPU on identical inputs: kernel maps (bitwise), convolution forward and
gradients with both CUDA algorithms, pooling, whole networks, float16 / bfloat16 against
float32, voxelization (bitwise), determinism, errors, and inputs with more than 2^31
neighbour-table entries.

Skipped without a GPU. The rest of the suite also runs on CUDA through helpers.DEVICES; this
file holds what only makes sense with two devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_close_non_finite,
    case_id,
    distinct_values,
    kio_weight,
    make_gen,
    many_offsets_case,
    misaligned,
    randn,
    random_sites,
    voxel_cloud,
)
from torch import nn

import spconv_lite as sp
from spconv_lite import ops

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

CUDA = torch.device("cuda")
OPS = torch.ops.spconv_lite

# CUDA against CPU in the same dtype: the sums run in another order (and with FMA).
PARITY_TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10},
              torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
# Half types against float32 on the same (representable) inputs, relative to max |value|.
HALF_TOL = {torch.float16: {"rtol": 1e-2, "atol": 1e-2},
            torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2}}


def assert_close_to_scale(got, want, dtype):
    """``got`` close to ``want`` at ``dtype``'s tolerance, relative to the largest value (at
    least 1): weight gradients are long sums (thousands of rows) that the devices add in
    different orders."""
    scale = max(want.abs().max().item(), 1.0)
    tol = PARITY_TOL.get(dtype, HALF_TOL.get(dtype))
    torch.testing.assert_close(got / scale, want / scale, **tol)


def both(fn, *tensors):
    """``fn`` on the CPU tensors and on CUDA copies; the CUDA results brought back."""
    cpu = fn(*tensors)
    gpu = fn(*(t.to(CUDA) if isinstance(t, torch.Tensor) else t for t in tensors))
    as_tuple = isinstance(cpu, (tuple, list))
    cpu, gpu = (cpu, gpu) if as_tuple else ((cpu,), (gpu,))
    return list(cpu), [g.cpu() for g in gpu]


def assert_equal_lists(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- kernel maps

# (mode, batch, spatial_shape, sites, kernel, stride, padding, dilation)
MAP_CASES = [
    ("subm", 2, (40, 40, 40), 20_000, 3, 1, 0, 1),
    ("subm", 1, (16, 24, 12), 1500, (3, 5, 1), 1, 0, (1, 2, 1)),
    ("subm", 3, (50, 50), 900, 5, 1, 0, 2),
    ("subm", 2, (8, 8, 8, 8), 1500, 3, 1, 0, 1),
    ("conv", 2, (40, 40, 40), 20_000, 3, 2, 1, 1),
    ("conv", 1, (30, 20, 10), 1000, (2, 3, 1), (2, 1, 3), (0, 1, 0), (1, 2, 1)),
    ("conv", 2, (41, 160, 140), 30_000, (3, 1, 1), (2, 1, 1), 0, 1),  # VoxelBackBone's last
    ("conv", 2, (40, 40, 40), 20_000, 2, 2, 0, 1),  # 2x2x2 pooling
    ("conv", 3, (800,), 600, 3, 2, 1, 1),
    ("transpose", 2, (12, 12, 12), 800, 3, 2, 1, 1),
    ("transpose", 1, (7, 6, 7, 6), 400, (2, 3, 1, 2), (2, 1, 3, 2), (0, 1, 0, 1), 1),
    ("subm", 2, (2**20, 2**20, 2**20), 3000, 3, 1, 0, 1),  # packed keys far beyond 2^31
    ("conv", 2, (2**20, 2**20, 2**20), 3000, 3, 2, 1, 1),
]


def map_args(case):
    mode, batch, shape, _, k, s, p, d = case
    ndim = len(shape)
    k, s, p, d = ([v] * ndim if isinstance(v, int) else list(v) for v in (k, s, p, d))
    if mode == "subm":
        return (list(shape), batch, k, d)
    if mode == "conv":
        out = [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1
               for n, kk, ss, pp, dd in zip(shape, k, s, p, d)]
    else:
        out = [(n - 1) * ss - 2 * pp + dd * (kk - 1) + 1
               for n, kk, ss, pp, dd in zip(shape, k, s, p, d)]
    return (list(shape), batch, out, k, s, p, d, mode == "transpose")


def sites_for(case):
    _, batch, shape, n = case[:4]
    if min(shape) > 2**16:  # huge grid: clustered sites (randperm over the grid is too big)
        gen = make_gen("huge_sites", case)
        coords = torch.randint(0, 64, (n, len(shape)), generator=gen) * (shape[0] // 64)
        coords += torch.randint(0, 3, (n, len(shape)), generator=gen)
        idx = torch.cat([torch.randint(0, batch, (n, 1), generator=gen), coords], 1)
        return torch.unique(idx, dim=0).int()[torch.randperm(n, generator=gen)[:n // 2]]
    return random_sites(make_gen("parity_map", case), batch, shape, count=n)


@pytest.mark.parametrize("case", MAP_CASES, ids=case_id)
def test_kernel_maps_are_identical(case):
    idx = sites_for(case)
    args = map_args(case)
    op = OPS.build_subm_map if case[0] == "subm" else OPS.build_conv_map
    cpu, gpu = both(lambda i: op(i, *args), idx)
    assert_equal_lists(gpu, cpu)


@pytest.mark.parametrize("case", [c for c in MAP_CASES if c[0] == "subm"][:2], ids=case_id)
def test_subm_maps_without_the_site_check_are_identical(case):
    idx = sites_for(case)
    args = map_args(case)
    cpu, gpu = both(lambda i: OPS.build_subm_map(i, *args, False), idx)
    assert_equal_lists(gpu, cpu)


def test_kernel_maps_are_deterministic():
    idx = random_sites(make_gen("det_map"), 2, (40, 40, 40), count=20_000).to(CUDA)
    args = ([40, 40, 40], 2, [20, 20, 20], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], False)
    assert_equal_lists(list(OPS.build_conv_map(idx, *args)), list(OPS.build_conv_map(idx, *args)))


def test_zero_sites_maps():
    idx = torch.zeros(0, 4, dtype=torch.int32)
    assert_equal_lists(*both(lambda i: OPS.build_subm_map(i, [4, 4, 4], 1, [3, 3, 3], [1, 1, 1]),
                             idx))
    args = ([4, 4, 4], 1, [2, 2, 2], [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], False)
    assert_equal_lists(*both(lambda i: OPS.build_conv_map(i, *args), idx))


# ----------------------------------------------------------------------------- convolution

def a_map(kind, n=3000, shape=(24, 24, 24)):
    idx = random_sites(make_gen("parity_conv_map", kind, n), 2, shape, count=n)
    if kind == "subm":
        return ops.build_subm_map(idx, shape, 2, (3, 3, 3), (1, 1, 1))
    if kind == "strided":
        out = [(s - 1) // 2 + 1 for s in shape]
        return OPS.build_conv_map(idx, list(shape), 2, out, [3, 3, 3], [2, 2, 2], [1, 1, 1],
                                  [1, 1, 1], False)[1:]
    out = [2 * s for s in shape]
    return OPS.build_conv_map(idx, list(shape), 2, out, [2, 2, 2], [2, 2, 2], [0, 0, 0],
                              [1, 1, 1], True)[1:]


def conv_results(x, w, nbr, nbr_t, upstream):
    """Forward, input gradient and weight gradient through autograd."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = ops.sparse_conv(x, w, nbr, nbr_t)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), upstream)
    return [out, grad_x, grad_w]


CONV_SHAPES = [("subm", 4, 16), ("subm", 16, 16), ("subm", 32, 32), ("strided", 16, 32),
               ("subm", 64, 64), ("strided", 64, 128), ("transposed", 13, 70), ("subm", 3, 5)]


@pytest.mark.parametrize("algo", ["auto", "fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=case_id)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=case_id)
def test_conv_matches_cpu(shape, dtype, algo, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    kind, c_in, c_out = shape
    nbr, nbr_t = a_map(kind)
    gen = make_gen("parity_conv", shape)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    w = randn(gen, nbr.shape[1], c_in, c_out, dtype=dtype, scale=(27 * c_in) ** -0.5)
    up = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    cpu, gpu = both(conv_results, x, w, nbr, nbr_t, up)
    for g, c in zip(gpu, cpu):
        assert_close_to_scale(g, c, dtype)


@pytest.mark.parametrize("algo", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=case_id)
def test_half_precision_close_to_float32(shape, dtype, algo, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    kind, c_in, c_out = shape
    nbr, nbr_t = (t.to(CUDA) for t in a_map(kind))
    gen = make_gen("parity_half", shape)
    # The same representable values in both runs: only the op's rounding differs.
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype).to(CUDA)
    w = randn(gen, nbr.shape[1], c_in, c_out, dtype=dtype, scale=(27 * c_in) ** -0.5).to(CUDA)
    up = randn(gen, nbr.shape[0], c_out, dtype=dtype).to(CUDA)
    low = conv_results(x, w, nbr, nbr_t, up)
    high = conv_results(x.float(), w.float(), nbr, nbr_t, up.float())
    for lo, hi in zip(low, high):
        assert lo.dtype == dtype
        scale = hi.abs().max().clamp_min(1.0)
        torch.testing.assert_close(lo.float() / scale, hi / scale, **HALF_TOL[dtype])


@pytest.mark.parametrize("algo", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=case_id)
@pytest.mark.parametrize("channels", [(16, 24), (5, 3)], ids=case_id)  # 16-byte loads or not
def test_non_finite_weights_reach_only_real_pairs(channels, dtype, algo, monkeypatch):
    # As on the CPU, an inf / NaN weight of offset k reaches only the rows with a neighbour at
    # k; the zero-filled rows of a fused tile must not turn into NaN.
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    nbr, nbr_t = a_map("strided", n=2000)
    c_in, c_out = channels
    gen = make_gen("parity_non_finite", channels)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    w = randn(gen, 27, c_in, c_out, dtype=dtype, scale=(27 * c_in) ** -0.5)
    w[0, 1, 2], w[26, c_in - 1, 0], w[13, 0, c_out - 1] = float("inf"), -float("inf"), float("nan")
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    wt = w.transpose(1, 2)
    tol = HALF_TOL.get(dtype, PARITY_TOL.get(dtype))
    for args in ((x, w, nbr, nbr_t), (g, wt, nbr_t, nbr)):  # forward, input gradient
        (want,), (got,) = both(OPS.sparse_conv, *args)
        assert not torch.isfinite(want).all() and torch.isfinite(want).all(1).any()
        assert_close_non_finite(got, want, **tol)


@pytest.mark.parametrize("algo", ["fused", "gemm"])
def test_conv_with_an_empty_kernel(algo, monkeypatch):
    # A [N, 0] table: the fused weight gradient used to divide by zero (SIGFPE).
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    x, g = torch.randn(5, 3), torch.randn(4, 2)
    nbr, nbr_t = torch.zeros(4, 0, dtype=torch.int32), torch.zeros(5, 0, dtype=torch.int32)
    cpu, gpu = both(lambda x, g, w, nbr, nbr_t: [OPS.sparse_conv_weight_grad(x, g, nbr),
                                                  OPS.sparse_conv(x, w, nbr, nbr_t)],
                    x, g, torch.zeros(0, 3, 2), nbr, nbr_t)
    assert_equal_lists(gpu, cpu)


@pytest.mark.parametrize("variants", ["", "wgrad=compact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=case_id)
def test_conv_with_more_offsets_than_a_grid_dimension_holds(dtype, variants, monkeypatch):
    # 65537 offsets: the fused weight gradient's blocks put the offsets along the grid's x,
    # whose y and z hold at most 65535 blocks (tests/cuda_emu has the same case).
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", "fused")
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", variants)
    x, w, g, nbr, nbr_t = many_offsets_case(dtype, variants)
    # The CPU on the same values in float64 (the CPU's half types sum in float too).
    want = [OPS.sparse_conv(x.double(), w.double(), nbr, nbr_t),
            OPS.sparse_conv_weight_grad(x.double(), g.double(), nbr)]
    x, w, g, nbr, nbr_t = (t.to(CUDA) for t in (x, w, g, nbr, nbr_t))
    got = [OPS.sparse_conv(x, w, nbr, nbr_t), OPS.sparse_conv_weight_grad(x, g, nbr)]
    for result, reference in zip(got, want):
        assert_close_to_scale(result.double().cpu(), reference, dtype)


@pytest.mark.parametrize("switch", ["allow_tf32", "matmul_precision_high"])
@pytest.mark.parametrize("algo", ["fused", "gemm"])
def test_float32_stays_exact_when_torch_allows_tf32(algo, switch, monkeypatch):
    # float32 convolutions are exact float32 on both algorithms, whatever torch's TF32 switches
    # say (cuBLAS would round the gemm path's inputs to 10 mantissa bits: ~1e-3 off).
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    nbr, nbr_t = a_map("subm")
    gen = make_gen("parity_tf32")
    x = randn(gen, nbr_t.shape[0], 64, dtype=torch.float32)
    w = randn(gen, 27, 64, 64, dtype=torch.float32, scale=(27 * 64) ** -0.5)
    up = randn(gen, nbr.shape[0], 64, dtype=torch.float32)
    cpu = conv_results(x, w, nbr, nbr_t, up)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    try:
        if switch == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.set_float32_matmul_precision("high")
        gpu = conv_results(*(t.to(CUDA) for t in (x, w, nbr, nbr_t, up)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])
    for g, c in zip(gpu, cpu):
        assert_close_to_scale(g.cpu(), c, torch.float32)


@pytest.mark.parametrize("algo", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=case_id)
def test_conv_is_deterministic(dtype, algo, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    nbr, nbr_t = (t.to(CUDA) for t in a_map("subm", n=20_000, shape=(40, 40, 40)))
    gen = make_gen("parity_det")
    x = randn(gen, nbr_t.shape[0], 32, dtype=dtype).to(CUDA)
    w = randn(gen, 27, 32, 32, dtype=dtype, scale=0.03).to(CUDA)
    up = randn(gen, nbr.shape[0], 32, dtype=dtype).to(CUDA)
    assert_equal_lists(conv_results(x, w, nbr, nbr_t, up), conv_results(x, w, nbr, nbr_t, up))


# ----------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=case_id)
@pytest.mark.parametrize("kind", ["strided", "transposed"])
def test_pooling_is_identical(kind, dtype):
    nbr, nbr_t = a_map(kind)
    gen = make_gen("parity_pool", kind)
    x = distinct_values(gen, nbr_t.shape[0], 8, dtype=dtype)
    up = randn(gen, nbr.shape[0], 8, dtype=dtype)

    def pools(x, nbr, nbr_t, up):
        out, argmax = OPS.sparse_max_pool(x, nbr, nbr_t)
        return [out, argmax, OPS.sparse_max_pool_backward(up, argmax, nbr_t),
                OPS.sparse_sum_pool(x, nbr, nbr_t)]

    cpu, gpu = both(pools, x, nbr, nbr_t, up)
    # Same values summed in the same order: bitwise equal, the sums included.
    assert_equal_lists(gpu, cpu)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_global_pools_match_cpu(kind):
    gen = make_gen("parity_global", kind)
    idx = random_sites(gen, 4, (20, 20, 20), count=3000)
    idx = idx[idx[:, 0] != 2]
    f = randn(gen, len(idx), 8)
    layer = sp.SparseGlobalMaxPool() if kind == "max" else sp.SparseGlobalAvgPool()
    cpu, gpu = both(lambda f, i: layer(sp.SparseConvTensor(f, i, [20, 20, 20], 4)), f, idx)
    torch.testing.assert_close(gpu[0], cpu[0], **PARITY_TOL[torch.float64])


# ----------------------------------------------------------------------------- networks

class Backbone(nn.Module):
    """VoxelBackBone8x's layer pattern at reduced width (SubM, strided, (3,1,1) head)."""

    def __init__(self):
        super().__init__()

        def block(c_in, c_out, key, stride=1, padding=1, kernel=3, subm=True):
            conv = (sp.SubMConv3d(c_in, c_out, kernel, bias=False, indice_key=key) if subm else
                    sp.SparseConv3d(c_in, c_out, kernel, stride, padding, bias=False,
                                    indice_key=key))
            return [conv, nn.BatchNorm1d(c_out), nn.ReLU()]

        self.net = sp.SparseSequential(
            *block(4, 16, "subm1"), *block(16, 16, "subm1"),
            *block(16, 32, "spconv2", 2, subm=False), *block(32, 32, "subm2"),
            *block(32, 64, "spconv3", 2, subm=False), *block(64, 64, "subm3"),
            *block(64, 64, "spconv4", 2, (0, 1, 1), subm=False), *block(64, 64, "subm4"),
            *block(64, 128, "out", (2, 1, 1), 0, (3, 1, 1), subm=False),
        )

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("algo", ["auto", "gemm"])
def test_network_forward_and_backward_match_cpu(algo, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    check_network_matches_cpu()


def check_network_matches_cpu():
    """Backbone's output, input gradient and weight gradients on CUDA against the CPU's."""
    torch.manual_seed(0)
    net = Backbone().train()
    shape = [41, 160, 140]
    gen = make_gen("parity_net")
    idx = random_sites(gen, 2, shape, count=20_000)
    f = randn(gen, len(idx), 4, dtype=torch.float32)
    results = {}
    for device in ("cpu", "cuda"):
        model = Backbone().train()
        model.load_state_dict(net.state_dict())
        model.to(device)
        x = f.to(device).requires_grad_()
        out = model(sp.SparseConvTensor(x, idx.to(device), shape, 2))
        dense = out.dense()
        loss = (dense * torch.linspace(-1, 1, dense.numel(), device=device).view_as(dense)).sum()
        loss.backward()
        results[device] = [out.indices, out.features, x.grad,
                           *(p.grad for p in model.parameters())]
    cpu, gpu = results["cpu"], [t.cpu() for t in results["cuda"]]
    assert torch.equal(gpu[0], cpu[0])
    for g, c in zip(gpu[1:], cpu[1:]):
        scale = max(c.abs().max().item(), 1.0)  # gradients are long sums in other orders
        torch.testing.assert_close(g / scale, c / scale, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- kernel variants
# SPCONV_LITE_CUDA_VARIANTS (include/spconv_lite/cuda_utils.cuh), prepared for the speed work and
# checked here on the hardware: row orders and pipelined tiles move rows between tiles and data
# into shared memory differently but add the same products in the same order, so they must give
# the default kernels' results bitwise (up to the sign of zero sums).

def ordered_conv_results(x, w, nbr, nbr_t, up, splits):
    """conv_results with row orders of ``splits`` splits (0: none)."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    orders = ({} if splits == 0 else
              {"order": ops.conv_row_order(nbr, splits), "order_t": ops.conv_row_order(nbr_t,
                                                                                      splits)})
    out = ops.sparse_conv(x, w, nbr, nbr_t, **orders)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), up)
    return [out, grad_x, grad_w]


# (variants, splits)
CONV_VARIANTS = [("", 1), ("", 3), ("tiles=pipelined", 0), ("tiles=pipelined", 2),
                 ("tiles=pipelined,wgrad=compact", 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize("variant", CONV_VARIANTS, ids=case_id)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=case_id)
def test_conv_variants_equal_the_default_kernels(shape, variant, dtype, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", "fused")
    variants, splits = variant
    kind, c_in, c_out = shape
    nbr, nbr_t = (t.to(CUDA) for t in a_map(kind))  # small: compute-sanitizer runs it too
    gen = make_gen("parity_variants", shape, dtype)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype).to(CUDA)
    w = randn(gen, nbr.shape[1], c_in, c_out, dtype=dtype, scale=(27 * c_in) ** -0.5).to(CUDA)
    up = randn(gen, nbr.shape[0], c_out, dtype=dtype).to(CUDA)
    want = conv_results(x, w, nbr, nbr_t, up)
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", variants)
    got = ordered_conv_results(x, w, nbr, nbr_t, up, splits)
    for g, e in zip(got[:2], want[:2]):  # forward and input gradient: the same sums
        assert torch.equal(g + 0, e + 0)
    # The weight gradient: bitwise with the default kernel, else the same sum in other steps.
    if "wgrad=compact" in variants:
        scale = want[2].abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[2] / scale, want[2] / scale, rtol=1e-2 if dtype !=
                                   torch.float32 else 1e-5, atol=1e-2 if dtype !=
                                   torch.float32 else 1e-5)
        assert torch.equal(got[2], ordered_conv_results(x, w, nbr, nbr_t, up, splits)[2])
    else:
        assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=case_id)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=case_id)
def test_sync_mma_sums_as_wmma(shape, dtype, monkeypatch):
    # ldmatrix + mma.sync (mma=sync) in place of WMMA fragments in the pipelined tiles and the
    # compacted weight gradient: the same HMMA instruction over the same steps, so the same
    # sums. The emulator runs the fragments' lane layouts as the kernels and emu.h read the PTX
    # ISA; only the hardware can say that reading is right.
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", "fused")
    kind, c_in, c_out = shape
    nbr, nbr_t = (t.to(CUDA) for t in a_map(kind))
    gen = make_gen("parity_sync_mma", shape, dtype)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype).to(CUDA)
    w = randn(gen, nbr.shape[1], c_in, c_out, dtype=dtype, scale=(27 * c_in) ** -0.5).to(CUDA)
    up = randn(gen, nbr.shape[0], c_out, dtype=dtype).to(CUDA)
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "tiles=pipelined,wgrad=compact")
    want = ordered_conv_results(x, w, nbr, nbr_t, up, 2)
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "tiles=pipelined,wgrad=compact,mma=sync")
    got = ordered_conv_results(x, w, nbr, nbr_t, up, 2)
    for g, e in zip(got, want):
        assert torch.equal(g + 0, e + 0)


@pytest.mark.parametrize("case", [(torch.float16, 128, 128), (torch.float16, 3, 64),
                                  (torch.float32, 128, 128), (torch.float32, 36, 28),
                                  (torch.float32, 4, 16)], ids=case_id)
def test_compact_weight_grad_pipelined_sums_as_unpipelined(case, monkeypatch):
    # 16-byte aligned rows: cp.async gathers in two stages (float32: float4 reads); one element
    # off: register-staged steps. Same tiles, steps and order, so the same sums (a race between
    # a stage's copies and its multiplication would show here). float16 3 -> 64: the 16-input
    # tiles, the inputs padded to 8 channels when aligned.
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", "fused")
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "wgrad=compact")
    dtype, c_in, c_out = case
    nbr, nbr_t = (t.to(CUDA) for t in a_map("subm"))
    gen = make_gen("parity_pipelined_wgrad", case)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype).to(CUDA)
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype).to(CUDA)
    pipelined = OPS.sparse_conv_weight_grad(x, g, nbr)
    staged = OPS.sparse_conv_weight_grad(misaligned(x), misaligned(g), nbr)
    assert torch.equal(pipelined, staged)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=case_id)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=case_id)
def test_compact_weight_grad_matches_cpu(shape, dtype, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", "fused")
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "wgrad=compact")
    kind, c_in, c_out = shape
    nbr, nbr_t = a_map(kind)
    gen = make_gen("parity_compact", shape)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    want = OPS.sparse_conv_weight_grad(x.double(), g.double(), nbr)  # the same values, exactly
    got = OPS.sparse_conv_weight_grad(x.to(CUDA), g.to(CUDA), nbr.to(CUDA)).double().cpu()
    assert_close_to_scale(got, want, dtype)


@pytest.mark.parametrize("case", [c for c in MAP_CASES if c[0] != "subm"], ids=case_id)
def test_kernel_maps_with_radix_sort_are_identical(case, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "mapsort=radix")
    idx = sites_for(case)
    args = map_args(case)
    cpu, gpu = both(lambda i: OPS.build_conv_map(i, *args), idx)
    assert_equal_lists(gpu, cpu)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_row_orders_are_identical(splits):
    nbr, nbr_t = a_map("strided", n=20_000, shape=(40, 40, 40))
    for table in (nbr, nbr_t):
        assert_equal_lists(*both(lambda t: OPS.conv_row_order(t, splits), table))


@pytest.mark.parametrize("variants", ["rows=2", "rows=3,tiles=pipelined,wgrad=compact"])
def test_network_with_variants_matches_cpu(variants, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", variants)
    check_network_matches_cpu()


# ----------------------------------------------------------------------------- errors

def test_bad_indices_raise_the_cpu_error():
    idx = random_sites(make_gen("parity_bad"), 2, (6, 6, 6), count=40)
    outside, duplicate = idx.clone(), idx.clone()
    outside[17, 2] = 6
    duplicate[30] = duplicate[11]
    for bad in (outside, duplicate):
        messages = []
        for device in ("cpu", "cuda"):
            with pytest.raises(ValueError) as info:
                ops.build_conv_map(bad.to(device), [6, 6, 6], 2, [3, 3, 3], [3, 3, 3], [2, 2, 2],
                                   [1, 1, 1], [1, 1, 1])
            messages.append(str(info.value).splitlines()[0])
        assert messages[0] == messages[1]


def test_inputs_on_two_devices_are_rejected():
    nbr, nbr_t = a_map("subm", n=50, shape=(6, 6, 6))
    x = torch.randn(50, 3, device=CUDA)
    w = torch.randn(27, 3, 2, device=CUDA)
    with pytest.raises(ValueError, match="nbr is on cpu"):
        ops.sparse_conv(x, w, nbr, nbr_t.to(CUDA))
    with pytest.raises(ValueError, match="features is on cuda"):
        sp.SparseConvTensor(x, torch.zeros(50, 4, dtype=torch.int32), [6, 6, 6], 1)


BAD_TABLES_SCRIPT = """
import torch
from spconv_lite import ops
idx = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [0, 2, 2, 2]], dtype=torch.int32).cuda()
nbr, nbr_t = ops.build_subm_map(idx, [4, 4, 4], 1, [3, 3, 3], [1, 1, 1])
x, w = torch.randn(3, 2, device="cuda"), torch.randn(27, 2, 4, device="cuda")
bad, bad_t = nbr.clone(), nbr_t.clone()
bad[1, 4], bad_t[2, 0] = 3, -7
calls = [lambda: ops.sparse_conv(x, w, bad, nbr_t), lambda: ops.sparse_conv(x, w, nbr, bad_t),
         lambda: ops.sparse_max_pool(x, bad, nbr_t), lambda: ops.sparse_sum_pool(x, nbr, bad_t)]
for call in calls:
    try:
        call()
        raise SystemExit("no error for a bad table")
    except ValueError as exc:
        print(exc)
print(ops.sparse_conv(x, w, nbr, nbr_t).sum().item())  # the process's CUDA state is intact
"""


def test_bad_hand_made_tables_raise_without_the_switch():
    # Without SPCONV_LITE_CUDA_CHECK_TABLES, tables given to the ops directly are checked by the
    # Python functions: a ValueError, not a device-side assertion. In a fresh process, since such
    # an assertion would break every later CUDA call of this one.
    env = {k: v for k, v in os.environ.items() if k != "SPCONV_LITE_CUDA_CHECK_TABLES"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", BAD_TABLES_SCRIPT], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5 and all("has entries outside" in line for line in lines[:4]), lines


def test_bad_tables_raise_with_eager_checks(monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CHECK_TABLES", "1")
    nbr, nbr_t = (t.to(CUDA) for t in a_map("subm", n=50, shape=(6, 6, 6)))
    bad = nbr.clone()
    bad[3, 4] = 50
    x = torch.randn(50, 3, device=CUDA)
    with pytest.raises(ValueError, match=r"nbr has entries outside \[-1, 50\)"):
        ops.sparse_conv(x, torch.randn(27, 3, 2, device=CUDA), bad, nbr_t)
    with pytest.raises(ValueError, match=r"nbr has entries outside"):
        ops.sparse_max_pool(x, bad, nbr_t)


# ----------------------------------------------------------------------------- large inputs

@pytest.mark.slow
def test_tables_with_more_than_2_pow_31_entries():
    # 1D line of n sites with a K-wide submanifold kernel: n * K > 2^31 table entries, and an
    # analytic answer: site o has min(o, h) + min(n - 1 - o, h) + 1 neighbours, h = (K - 1) / 2.
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    volume, n = 4097, 530_000
    assert n * volume > 2**31
    idx = torch.stack([torch.zeros(n, dtype=torch.int32),
                       torch.arange(n, dtype=torch.int32)], 1).to(CUDA)
    nbr, nbr_t = ops.build_subm_map(idx, [n], 1, [volume], [1])
    half = (volume - 1) // 2
    o = torch.arange(n, device=CUDA)
    expected = (torch.clamp(o, max=half) + torch.clamp(n - 1 - o, max=half) + 1).float()
    ones = torch.ones(n, 1, device=CUDA)
    torch.testing.assert_close(ops.sparse_sum_pool(ones, nbr, nbr_t)[:, 0], expected)
    last = n - 1  # its row starts past entry 2^31
    assert last * volume > 2**31
    row = nbr[last].cpu()
    assert torch.equal(row[: half + 1], torch.arange(last - half, last + 1, dtype=torch.int32))
    assert torch.equal(row[half + 1:], torch.full((half,), -1, dtype=torch.int32))
    del nbr_t
    weight = torch.ones(volume, 1, 1, device=CUDA)
    out = OPS.sparse_conv(ones, weight, nbr, nbr)  # symmetric kernel: nbr is its own transpose
    torch.testing.assert_close(out[:, 0], expected)
    grad_w = OPS.sparse_conv_weight_grad(ones, ones, nbr)
    per_offset = torch.tensor([n - abs(k - half) for k in range(volume)], dtype=torch.float32)
    torch.testing.assert_close(grad_w[:, 0, 0].cpu(), per_offset)


def test_kio_weight_layout_on_cuda():
    # ops.sparse_conv takes [K, C_in, C_out] on CUDA too.
    gen = make_gen("parity_kio")
    idx = random_sites(gen, 1, (5, 5, 5), count=30)
    layer = sp.SubMConv3d(3, 2, 3, bias=False).double()
    f = randn(gen, 30, 3)
    want = layer(sp.SparseConvTensor(f, idx, [5, 5, 5], 1)).features
    nbr, nbr_t = ops.build_subm_map(idx.to(CUDA), [5, 5, 5], 1, [3, 3, 3], [1, 1, 1])
    got = ops.sparse_conv(f.to(CUDA), kio_weight(layer.weight).to(CUDA), nbr, nbr_t)
    torch.testing.assert_close(got.cpu(), want, **PARITY_TOL[torch.float64])


# ----------------------------------------------------------------------------- voxelization

# (voxel_size, range_min, grid_size, columns, points, max_points_per_voxel, max_voxels)
VOXEL_CASES = [
    ((0.05, 0.05, 0.1), (0.0, -40.0, -3.0), (1408, 1600, 40), 4, 200_000, 5, 40_000),
    ((0.5, 0.5, 0.5), (-2.0, -2.0, -2.0), (8, 8, 8), 3, 20_000, 1, 1000),
    ((0.25, 0.25, 0.25), (0.0, 0.0, 0.0), (8, 8, 8), 5, 20_000, 35, 50),
    ((0.25, 0.5), (0.0, 0.0), (16, 8), 3, 5000, 3, 1000),
    ((0.5, 0.5, 0.5, 1.0), (0.0, 0.0, 0.0, -2.0), (4, 4, 4, 4), 5, 5000, 5, 1000),
]


@pytest.mark.parametrize("case", VOXEL_CASES, ids=case_id)
def test_voxelize_is_identical(case):
    size, low, grid, columns, n, max_points, max_voxels = case
    points = voxel_cloud(make_gen("parity_voxelize", case), n, columns, size, low, grid)
    geometry = (list(size), list(low), list(grid))
    for empty_mean in (False, True):
        assert_equal_lists(*both(lambda p: OPS.voxelize(p, *geometry, max_points, max_voxels,
                                                        empty_mean), points))
    assert_equal_lists(*both(lambda p: OPS.voxelize_mean(p, *geometry, max_voxels), points))


def test_point_to_voxel_on_cuda_matches_cpu_on_a_lidar_frame():
    from lidar_frames import FRAMES

    frame = FRAMES[0]  # KITTI object frame 000000
    points = frame.points()
    cpu, gpu = (sp.PointToVoxel(frame.vsize, frame.coors_range, points.shape[1],
                                frame.max_voxels, frame.max_points, device=device)
                for device in ("cpu", CUDA))
    want = cpu.generate_voxel_with_id(points)
    got = gpu.generate_voxel_with_id(points)  # a numpy cloud goes to the voxelizer's device
    assert all(t.device.type == "cuda" for t in got)
    assert_equal_lists(list(want), [t.cpu() for t in got])
    assert_equal_lists(list(cpu.generate_voxel_mean(points)),
                       [t.cpu() for t in gpu.generate_voxel_mean(points)])


def test_voxelize_is_deterministic():
    points = voxel_cloud(make_gen("parity_voxel_det"), 300_000, 4, (0.1, 0.1, 0.2),
                         (0.0, 0.0, 0.0), (500, 500, 20)).to(CUDA)
    geometry = ([0.1, 0.1, 0.2], [0.0, 0.0, 0.0], [500, 500, 20])
    first = OPS.voxelize(points, *geometry, 5, 100_000, True)
    assert_equal_lists(list(first), list(OPS.voxelize(points, *geometry, 5, 100_000, True)))


def test_voxelize_bad_arguments_raise_like_cpu():
    points = torch.zeros(4, 3, device=CUDA)
    with pytest.raises(ValueError, match="voxel_size must be finite and positive"):
        OPS.voxelize(points, [0.1, 0.0, 0.1], [0.0] * 3, [10] * 3, 5, 10, False)
    with pytest.raises(ValueError, match="points must be"):
        OPS.voxelize_mean(points[:, :2], [0.1] * 3, [0.0] * 3, [10] * 3, 10)
    with pytest.raises(TypeError, match="points must be float32 or float64, got Half"):
        OPS.voxelize_mean(points.half(), [0.1] * 3, [0.0] * 3, [10] * 3, 10)
