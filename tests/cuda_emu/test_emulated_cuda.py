"""The CUDA kernels of src/cuda, run on the CPU under emulation (emu.h), against the CPU ops.

This runs the code of every CUDA kernel and of its host-side launch logic (tile loops, bounds,
offsets, chunking, the hash table's atomics, compaction, sorting, both conv algorithms, the
tensor-core kernels through an emulated WMMA) without a GPU. Races between the threads of a
block show when the kernels are built with ThreadSanitizer (scripts/emu_race_check.sh runs these
tests so); memory-ordering bugs of real hardware and performance do not:
tests/test_cuda_parity.py checks the kernels on a GPU.

Skipped unless SPCONV_LITE_CUDA_EMULATION=1 (building the emulation takes a minute or two):
    SPCONV_LITE_CUDA_EMULATION=1 python -m pytest tests/cuda_emu -q
"""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py

from helpers import (
    assert_close_non_finite,
    case_id,
    distinct_values,
    make_gen,
    many_offsets_case,
    misaligned,
    randn,
    random_sites,
    voxel_cloud,
)

from spconv_lite.voxelize import GridGeometry

if os.environ.get("SPCONV_LITE_CUDA_EMULATION", "0") in ("", "0"):
    pytest.skip("CUDA emulation tests run with SPCONV_LITE_CUDA_EMULATION=1",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build

build.load_library()
EMU = torch.ops.spconv_lite_emu
CPU = torch.ops.spconv_lite

TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def assert_same(a, b, context=""):
    assert len(a) == len(b), context
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, context
        assert torch.equal(x, y), context


def assert_close_to_scale(got, want, dtype, context=""):
    """``got`` close to ``want`` at ``dtype``'s tolerance, relative to the largest value (at
    least 1): weight gradients are long sums, added in another order."""
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    torch.testing.assert_close(got.double() / scale, want.double() / scale, **TOL[dtype],
                               msg=(lambda m: f"{context}: {m}") if context else None)


def ntuple(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


# ----------------------------------------------------------------------------- kernel maps

# (batch, spatial_shape, sites, kernel, dilation)
SUBM_CASES = [
    (2, (9, 8, 10), 300, 3, 1),
    (1, (12, 10, 9), 250, (3, 5, 1), (1, 2, 1)),
    (3, (30, 25), 200, 5, 2),
    (2, (200,), 120, 3, 1),
    (2, (6, 6, 6, 6), 250, 3, 1),
    (2, (1, 6, 6), 40, 5, 1),  # the kernel reaches past the thin z axis
]


@pytest.mark.parametrize("case", SUBM_CASES, ids=case_id)
def test_subm_map(case):
    batch, shape, n, k, d = case
    idx = random_sites(make_gen("subm", case), batch, shape, count=n)
    args = (list(shape), batch, list(ntuple(k, len(shape))), list(ntuple(d, len(shape))))
    assert_same(EMU.build_subm_map(idx, *args), CPU.build_subm_map(idx, *args))


@pytest.mark.parametrize("case", SUBM_CASES[:2], ids=case_id)
def test_subm_map_without_the_site_check(case):
    # check_sites=False (sites a conv map produced) skips only the host synchronisation.
    batch, shape, n, k, d = case
    idx = random_sites(make_gen("subm", case), batch, shape, count=n)
    args = (list(shape), batch, list(ntuple(k, len(shape))), list(ntuple(d, len(shape))))
    assert_same(EMU.build_subm_map(idx, *args, False), CPU.build_subm_map(idx, *args))


# (transposed, batch, spatial_shape, sites, kernel, stride, padding, dilation)
CONV_CASES = [
    (False, 2, (12, 12, 12), 400, 3, 2, 1, 1),
    (False, 1, (20, 15, 8), 300, (2, 3, 1), (2, 1, 3), (0, 1, 0), (1, 2, 1)),
    (False, 2, (40, 30), 250, 5, 3, 2, 2),
    (False, 2, (16, 16, 16), 500, 2, 2, 0, 1),  # pooling-like: one output per input
    (False, 3, (300,), 150, 3, 2, 1, 1),
    (False, 2, (7, 8, 7, 8), 250, (3, 1, 2, 3), (1, 2, 2, 1), (1, 0, 1, 1), (2, 1, 1, 1)),
    (True, 2, (8, 8, 8), 200, 3, 2, 1, 1),
    (True, 1, (15, 10), 120, (2, 3), (3, 1), (0, 1), (1, 2)),
    (True, 2, (4, 5, 4, 5), 100, 2, 2, 0, 1),
]


def conv_args(case):
    transposed, batch, shape, _, k, s, p, d = case
    ndim = len(shape)
    k, s, p, d = (list(ntuple(v, ndim)) for v in (k, s, p, d))
    if transposed:
        out = [(n_ - 1) * s_ - 2 * p_ + d_ * (k_ - 1) + 1
               for n_, k_, s_, p_, d_ in zip(shape, k, s, p, d)]
    else:
        out = [(n_ + 2 * p_ - d_ * (k_ - 1) - 1) // s_ + 1
               for n_, k_, s_, p_, d_ in zip(shape, k, s, p, d)]
    return list(shape), batch, out, k, s, p, d, transposed


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_map(case):
    idx = random_sites(make_gen("conv", case), case[1], case[2], count=case[3])
    args = conv_args(case)
    assert_same(EMU.build_conv_map(idx, *args), CPU.build_conv_map(idx, *args))


def test_conv_map_with_more_output_sites_than_expected():
    # Sites 4 apart at odd coordinates each reach 8 outputs of a k3 s2 conv, none shared: 8 x
    # the inputs, more than the first output-site set holds (sized for 2 x the inputs, at least
    # twice the emulated device's 4 x 2048 threads), so the op collects again into a larger set.
    axis = torch.arange(1, 56, 4)
    zyx = torch.cartesian_prod(axis, axis, axis)
    idx = torch.cat([torch.zeros(len(zyx), 1, dtype=torch.long), zyx], 1).int()
    args = ([56, 56, 56], 1, [28, 28, 28], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], False)
    got = EMU.build_conv_map(idx, *args)
    assert len(got[0]) == 8 * len(idx) > 2 * 4 * 2048
    assert_same(got, CPU.build_conv_map(idx, *args))


def test_maps_of_zero_sites():
    idx = torch.zeros(0, 4, dtype=torch.int32)
    args = ([4, 4, 4], 1, [3, 3, 3], [1, 1, 1])
    assert_same(EMU.build_subm_map(idx, *args), CPU.build_subm_map(idx, *args))
    args = ([4, 4, 4], 1, [2, 2, 2], [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], False)
    assert_same(EMU.build_conv_map(idx, *args), CPU.build_conv_map(idx, *args))


def test_maps_of_noncontiguous_indices():
    idx = random_sites(make_gen("nc"), 2, (7, 6, 8), count=150)
    wide = torch.cat([idx, idx[:, :1]], 1)[:, :4]
    assert not wide.is_contiguous()
    args = ([7, 6, 8], 2, [4, 3, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], False)
    assert_same(EMU.build_conv_map(wide, *args), CPU.build_conv_map(idx, *args))


@pytest.mark.parametrize("mode", ["subm", "conv", "transposed"])
def test_maps_on_huge_grids(mode):
    # Packed keys far beyond 2^31, sites that differ only in high bits.
    shape = [2**19, 2**19, 2**18] if mode == "transposed" else [2**20, 2**20, 2**19]
    gen = make_gen("huge", mode)
    size = torch.tensor(shape)
    base = torch.stack([size * 0, size - 6, size // 2, (size // 2) ^ 2**13])
    sites = {(int(b), *(int(c) for c in base[a] + torch.randint(0, 5, (3,), generator=gen)))
             for b, a in zip(torch.randint(0, 2, (200,), generator=gen),
                             torch.randint(0, 4, (200,), generator=gen))}
    idx = torch.tensor(sorted(sites), dtype=torch.int32)
    if mode == "subm":
        args = (shape, 2, [3, 3, 3], [1, 1, 1])
        assert_same(EMU.build_subm_map(idx, *args), CPU.build_subm_map(idx, *args))
        return
    transposed = mode == "transposed"
    out = [2 * n - 1 for n in shape] if transposed else [(n - 1) // 2 + 1 for n in shape]
    args = (shape, 2, out, [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], transposed)
    assert_same(EMU.build_conv_map(idx, *args), CPU.build_conv_map(idx, *args))


@pytest.mark.parametrize("problem", ["outside", "negative_batch", "duplicate"])
@pytest.mark.parametrize("op", ["subm", "conv"])
def test_bad_indices_raise_the_cpu_error(op, problem):
    idx = random_sites(make_gen("bad", op), 2, (6, 6, 6), count=40)
    if problem == "outside":
        idx[17, 2] = 6
    elif problem == "negative_batch":
        idx[5, 0] = -1
    else:
        idx[30] = idx[11]
    if op == "subm":
        args = ([6, 6, 6], 2, [3, 3, 3], [1, 1, 1])
        calls = [lambda t: EMU.build_subm_map(t, *args), lambda t: CPU.build_subm_map(t, *args)]
    else:
        args = ([6, 6, 6], 2, [3, 3, 3], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], False)
        calls = [lambda t: EMU.build_conv_map(t, *args), lambda t: CPU.build_conv_map(t, *args)]
    messages = []
    for call in calls:
        with pytest.raises(ValueError) as info:
            call(idx)
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1]


# ----------------------------------------------------------------------------- convolution

def a_map(kind, n=300, seed="map"):
    """(nbr, nbr_t) of a subm, strided or transposed conv over seeded 3D sites."""
    idx = random_sites(make_gen(seed, kind), 2, (10, 11, 12), count=n)
    if kind == "subm":
        return CPU.build_subm_map(idx, [10, 11, 12], 2, [3, 3, 3], [1, 1, 1])
    if kind == "strided":
        return CPU.build_conv_map(idx, [10, 11, 12], 2, [5, 6, 6], [3, 3, 3], [2, 2, 2],
                                  [1, 1, 1], [1, 1, 1], False)[1:]
    return CPU.build_conv_map(idx, [10, 11, 12], 2, [20, 22, 24], [2, 2, 2], [2, 2, 2],
                              [0, 0, 0], [1, 1, 1], True)[1:]


# (map kind, c_in, c_out): narrow and wide, multiples of 8 (16-byte loads) and odd counts,
# c_in above one reduction step, c_out above one 64-column tile.
CONV_SHAPES = [("subm", 4, 16), ("subm", 16, 32), ("strided", 64, 64), ("transposed", 13, 70),
               ("subm", 40, 24), ("strided", 3, 5)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("sm_major", ["9", "7"])  # tensor-core kernels, then SIMT fallbacks
@pytest.mark.parametrize("algo", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=case_id)
def test_conv_forward_and_gradients(shape, dtype, algo, sm_major, monkeypatch):
    if sm_major == "7" and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("the compute capability only changes the half-precision kernels")
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    monkeypatch.setenv("SPCONV_LITE_EMU_SM_MAJOR", sm_major)
    kind, c_in, c_out = shape
    nbr, nbr_t = a_map(kind)
    volume = nbr.shape[1]
    gen = make_gen("conv", shape, dtype)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    w = randn(gen, volume, c_in, c_out, dtype=dtype, scale=(c_in * volume) ** -0.5)
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    wt = w.transpose(1, 2)  # the input gradient's weight, non-contiguous as ops.py passes it
    results = [
        (EMU.sparse_conv(x, w, nbr, nbr_t), CPU.sparse_conv(x, w, nbr, nbr_t)),
        (EMU.sparse_conv(g, wt, nbr_t, nbr), CPU.sparse_conv(g, wt, nbr_t, nbr)),
        (EMU.sparse_conv_weight_grad(x, g, nbr), CPU.sparse_conv_weight_grad(x, g, nbr)),
    ]
    for got, want in results:
        assert got.dtype == dtype and got.shape == want.shape
        assert_close_to_scale(got, want, dtype)


@pytest.mark.parametrize("variants", ["", "tiles=pipelined,wgrad=compact"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=case_id)
def test_build_for_older_gpus_runs_the_simt_kernels(dtype, variants, monkeypatch):
    """Built for compute_75 alone (TORCH_CUDA_ARCH_LIST="7.5+PTX"), the code an sm_90 GPU
    JIT-compiles has the tensor-core kernels as their device assert only (the emulator aborts
    if one runs): the launchers ask the code's PTX version, not the device, and take the SIMT
    kernels."""
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", variants)
    monkeypatch.setenv("SPCONV_LITE_EMU_SM_MAJOR", "9")
    monkeypatch.setenv("SPCONV_LITE_EMU_PTX_VERSION", "75")
    nbr, nbr_t = a_map("subm")
    gen = make_gen("compute_75", dtype)
    x = randn(gen, nbr_t.shape[0], 16, dtype=dtype)
    w = randn(gen, nbr.shape[1], 16, 32, dtype=dtype, scale=(16 * 27) ** -0.5)
    g = randn(gen, nbr.shape[0], 32, dtype=dtype)

    def forward_and_weight_grad(ops):
        return [ops.sparse_conv(x, w, nbr, nbr_t), ops.sparse_conv_weight_grad(x, g, nbr)]

    for got, want in zip(forward_and_weight_grad(EMU), forward_and_weight_grad(CPU)):
        assert_close_to_scale(got, want, dtype)


@pytest.mark.parametrize("algo", ["fused", "gemm"])
def test_conv_is_deterministic(algo, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    nbr, nbr_t = a_map("subm", n=400, seed="det")
    gen = make_gen("det")
    x = randn(gen, nbr_t.shape[0], 16, dtype=torch.float32)
    w = randn(gen, 27, 16, 16, dtype=torch.float32, scale=0.05)
    g = randn(gen, nbr.shape[0], 16, dtype=torch.float32)
    first = [EMU.sparse_conv(x, w, nbr, nbr_t), EMU.sparse_conv_weight_grad(x, g, nbr)]
    second = [EMU.sparse_conv(x, w, nbr, nbr_t), EMU.sparse_conv_weight_grad(x, g, nbr)]
    assert_same(first, second)


@pytest.mark.parametrize("algo", ["fused", "gemm"])
def test_conv_edge_shapes(algo, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    empty = torch.zeros(0, 8, dtype=torch.int32)
    x0 = torch.zeros(0, 3)
    w = torch.randn(8, 3, 5)
    assert EMU.sparse_conv(x0, w, empty, empty).shape == (0, 5)
    assert torch.equal(EMU.sparse_conv_weight_grad(x0, torch.zeros(0, 5), empty),
                       torch.zeros(8, 3, 5))
    # Output rows without any neighbour are zero.
    nbr = torch.full((4, 8), -1, dtype=torch.int32)
    nbr[1, 3] = 0
    x = torch.randn(1, 3)
    nbr_t = torch.full((1, 8), -1, dtype=torch.int32)
    nbr_t[0, 3] = 1
    torch.testing.assert_close(EMU.sparse_conv(x, w, nbr, nbr_t), CPU.sparse_conv(x, w, nbr, nbr_t))
    torch.testing.assert_close(EMU.sparse_conv_weight_grad(x, torch.ones(4, 5), nbr),
                               CPU.sparse_conv_weight_grad(x, torch.ones(4, 5), nbr))


@pytest.mark.parametrize("variants", ["", "tiles=pipelined"])
@pytest.mark.parametrize("algo", ["fused", "gemm"])
def test_conv_without_input_rows_or_channels_gives_zeros(algo, variants, monkeypatch):
    # Output sites but nothing to gather (the input gradient of a conv with no output sites):
    # zeros, as on the CPU. (The op returns them before any kernel, so none is handed an empty
    # tensor's null pointer; the emulator aborts on a null cp.async source.)
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", variants)
    nbr = torch.full((4, 27), -1, dtype=torch.int32)
    for x, w in ((torch.zeros(0, 16), torch.randn(27, 16, 16)),
                 (torch.zeros(3, 0), torch.randn(27, 0, 16))):
        nbr_t = torch.full((x.shape[0], 27), -1, dtype=torch.int32)
        assert torch.equal(EMU.sparse_conv(x, w, nbr, nbr_t), torch.zeros(4, 16))


@pytest.mark.parametrize("algo", ["fused", "gemm"])
def test_conv_with_an_empty_kernel(algo, monkeypatch):
    # A [N, 0] table (a kernel of volume 0): nothing to sum; the fused weight gradient used to
    # divide by zero splitting zero offsets into chunks (SIGFPE).
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    x, g = torch.randn(5, 3), torch.randn(4, 2)
    nbr, nbr_t = torch.zeros(4, 0, dtype=torch.int32), torch.zeros(5, 0, dtype=torch.int32)
    w = torch.zeros(0, 3, 2)
    assert_same([EMU.sparse_conv_weight_grad(x, g, nbr), EMU.sparse_conv(x, w, nbr, nbr_t)],
                [CPU.sparse_conv_weight_grad(x, g, nbr), CPU.sparse_conv(x, w, nbr, nbr_t)])


# The two launches of the fused weight gradient: tensor-core tiles, then SIMT tiles (with
# 128-thread blocks: 65537 blocks of 256 emulated threads take minutes).
@pytest.mark.parametrize("dtype, variants", [(torch.float16, ""),
                                             (torch.float32, "wgrad=compact")], ids=case_id)
def test_conv_with_more_offsets_than_a_grid_dimension_holds(dtype, variants, monkeypatch):
    # A 1D kernel of 65537 offsets (reach 32768 to each side, within a 40000-cell grid), as the
    # CPU takes it. The fused weight gradient's blocks, one per (offset, row chunk, channel
    # tile), used to put the offsets along the grid's y, which holds at most 65535 blocks: the
    # op refused more offsets (ValueError), where a GPU would have refused the launch.
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", "fused")
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", variants)
    x, w, g, nbr, nbr_t = many_offsets_case(dtype, variants)
    for got, want in [(EMU.sparse_conv(x, w, nbr, nbr_t), CPU.sparse_conv(x, w, nbr, nbr_t)),
                      (EMU.sparse_conv_weight_grad(x, g, nbr),
                       CPU.sparse_conv_weight_grad(x, g, nbr))]:
        assert_close_to_scale(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=case_id)
def test_conv_with_more_output_channel_tiles_than_a_grid_dimension_holds(dtype, monkeypatch):
    # One site, 1 -> 65535 * 64 + 1 output channels (the CPU computes it): the fused kernels'
    # 64-channel tiles along the grid's y would be 65536 blocks, which a GPU refuses, so such a
    # layer takes the GEMMs even when the fused kernels are forced.
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", "fused")
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "tiles=pipelined" if dtype == torch.float32
                       else "")
    gen = make_gen("wide_layer", dtype)
    x = randn(gen, 1, 1, dtype=dtype)
    w = randn(gen, 1, 1, 65535 * 64 + 1, dtype=dtype)
    nbr = torch.zeros(1, 1, dtype=torch.int32)
    assert_same([EMU.sparse_conv(x, w, nbr, nbr)], [CPU.sparse_conv(x, w, nbr, nbr)])


@pytest.mark.parametrize("sm_major", ["9", "7"])  # tensor-core kernels, then SIMT fallbacks
@pytest.mark.parametrize("algo", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("channels", [(16, 24), (5, 3)], ids=case_id)  # 16-byte loads or not
def test_conv_with_non_finite_weights(channels, dtype, algo, sm_major, monkeypatch):
    # Only real pairs contribute, as on the CPU: an inf / NaN weight of offset k reaches only
    # the rows with a neighbour at k, not the zero-filled rows of a tile.
    if sm_major == "7" and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("the compute capability only changes the half-precision kernels")
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    monkeypatch.setenv("SPCONV_LITE_EMU_SM_MAJOR", sm_major)
    c_in, c_out = channels
    nbr, nbr_t = a_map("strided", seed="non_finite")
    gen = make_gen("non_finite", channels, dtype)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    w = randn(gen, 27, c_in, c_out, dtype=dtype, scale=(27 * c_in) ** -0.5)
    w[0, 1, 2] = math.inf  # offset 0: few rows have a neighbour there
    w[26, c_in - 1, 0] = -math.inf
    w[13, 0, c_out - 1] = math.nan
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    wt = w.transpose(1, 2)
    for got, want in [(EMU.sparse_conv(x, w, nbr, nbr_t), CPU.sparse_conv(x, w, nbr, nbr_t)),
                      (EMU.sparse_conv(g, wt, nbr_t, nbr), CPU.sparse_conv(g, wt, nbr_t, nbr))]:
        # The case means something: some outputs are hit, whole rows are not.
        assert not torch.isfinite(want).all() and torch.isfinite(want).all(1).any()
        assert_close_non_finite(got, want, **TOL[dtype])


def test_bad_tables_raise_with_eager_checks(monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CHECK_TABLES", "1")
    nbr, nbr_t = a_map("subm", n=50, seed="badtable")
    bad = nbr.clone()
    bad[3, 4] = nbr_t.shape[0]
    x = torch.randn(nbr_t.shape[0], 3)
    w = torch.randn(27, 3, 2)
    for op in (EMU, CPU):
        with pytest.raises(ValueError, match=r"nbr has entries outside \[-1, 50\)"):
            op.sparse_conv(x, w, bad, nbr_t)
        with pytest.raises(ValueError, match=r"nbr has entries outside"):
            op.sparse_max_pool(x, bad, nbr_t)


# ----------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("kind", ["strided", "transposed"])
def test_pooling(kind, dtype):
    nbr, nbr_t = a_map(kind, n=250, seed="pool")
    gen = make_gen("pool", kind, dtype)
    x = distinct_values(gen, nbr_t.shape[0], 5, dtype=dtype)
    assert_same([EMU.sparse_sum_pool(x, nbr, nbr_t)], [CPU.sparse_sum_pool(x, nbr, nbr_t)])
    got, want = EMU.sparse_max_pool(x, nbr, nbr_t), CPU.sparse_max_pool(x, nbr, nbr_t)
    assert_same(got, want)
    g = randn(gen, nbr.shape[0], 5, dtype=dtype)
    assert_same([EMU.sparse_max_pool_backward(g, got[1], nbr_t)],
                [CPU.sparse_max_pool_backward(g, want[1], nbr_t)])


def test_max_pool_ties_and_nan():
    nbr, nbr_t = a_map("strided", n=250, seed="ties")
    x = torch.randint(0, 3, (nbr_t.shape[0], 4)).float()
    x[::7, 1] = math.nan
    (got, got_arg), (want, want_arg) = (EMU.sparse_max_pool(x, nbr, nbr_t),
                                        CPU.sparse_max_pool(x, nbr, nbr_t))
    assert torch.isnan(want).any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got_arg, want_arg)


def test_pooling_of_zero_rows():
    empty = torch.zeros(0, 8, dtype=torch.int32)
    x = torch.zeros(0, 3)
    assert EMU.sparse_sum_pool(x, empty, empty).shape == (0, 3)
    out, arg = EMU.sparse_max_pool(x, empty, empty)
    assert out.shape == arg.shape == (0, 3)
    assert EMU.sparse_max_pool_backward(out, arg, empty).shape == (0, 3)


# ----------------------------------------------------------------------------- voxelization

# (name, voxel_size, range_min, grid_size, columns, points, max_points_per_voxel, max_voxels)
VOXEL_CASES = [
    ("kitti-like", (0.05, 0.05, 0.1), (0.0, -40.0, -3.0), (1408, 1600, 40), 4, 3000, 5, 40000),
    ("coarse-p1", (0.5, 0.5, 0.5), (-2.0, -2.0, -2.0), (8, 8, 8), 3, 2000, 1, 1000),
    ("voxel-cap", (0.25, 0.25, 0.25), (0.0, 0.0, 0.0), (8, 8, 8), 5, 2000, 5, 37),
    ("no-voxels", (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (4, 4, 4), 4, 300, 5, 0),
    ("odd-sizes", (0.3, 0.07, 0.9), (-1.1, 2.0, -3.0), (7, 31, 3), 4, 2500, 5, 100000),
    ("1d", (0.1,), (-1.0,), (40,), 3, 1000, 5, 1000),
    ("2d", (0.25, 0.5), (0.0, 0.0), (16, 8), 3, 1500, 1, 1000),
    ("4d", (0.5, 0.5, 0.5, 1.0), (0.0, 0.0, 0.0, -2.0), (4, 4, 4, 4), 5, 2000, 5, 1000),
    ("huge-grid", (1e-4, 1e-4, 1e-4), (-1.0, -1.0, -1.0), (20000, 20000, 20000), 4, 1500, 5,
     1000),
]


def voxel_case_args(case):
    _, size, low, grid, columns, n, max_points, max_voxels = case
    points = voxel_cloud(make_gen("voxelize", case), n, columns, size, low, grid)
    return points, (list(size), list(low), list(grid)), max_points, max_voxels


@pytest.mark.parametrize("empty_mean", [False, True], ids=["zeros", "empty_mean"])
@pytest.mark.parametrize("case", VOXEL_CASES, ids=lambda c: c[0])
def test_voxelize(case, empty_mean):
    points, grid, max_points, max_voxels = voxel_case_args(case)
    args = (*grid, max_points, max_voxels, empty_mean)
    want = CPU.voxelize(points, *args)
    assert_same(EMU.voxelize(points, *args), want)
    if case[0] != "no-voxels":  # the cloud has dropped points and voxels of several points
        assert (want[3] == -1).any() and int(want[2].max()) > 1 or max_points == 1


@pytest.mark.parametrize("case", VOXEL_CASES, ids=lambda c: c[0])
def test_voxelize_mean(case):
    points, grid, _, max_voxels = voxel_case_args(case)
    want = CPU.voxelize_mean(points, *grid, max_voxels)
    assert_same(EMU.voxelize_mean(points, *grid, max_voxels), want)


@pytest.mark.parametrize("name", ["kitti-like", "odd-sizes"])
def test_voxelize_float64_points(name):
    # Moved into a UTM frame, where float64 points must not be rounded to float32 first.
    points, (size, low, grid), max_points, max_voxels = voxel_case_args(
        next(c for c in VOXEL_CASES if c[0] == name))
    offset = [512345.3, 4102345.7, 0.0]
    points = points.double()
    points[:, :3] += torch.tensor(offset, dtype=torch.float64)
    low = [v + o for v, o in zip(low, offset)]
    for empty_mean in (False, True):
        args = (size, low, grid, max_points, max_voxels, empty_mean)
        want = CPU.voxelize(points, *args)
        assert_same(EMU.voxelize(points, *args), want)
    assert not torch.equal(CPU.voxelize(points.float(), *args)[3], want[3])
    assert_same(EMU.voxelize_mean(points, size, low, grid, max_voxels),
                CPU.voxelize_mean(points, size, low, grid, max_voxels))


def test_voxelize_empty_and_non_contiguous_clouds():
    grid = ([0.5] * 3, [0.0] * 3, [4] * 3)
    empty = torch.zeros(0, 4)
    assert_same(EMU.voxelize(empty, *grid, 5, 10, False), CPU.voxelize(empty, *grid, 5, 10, False))
    assert_same(EMU.voxelize_mean(empty, *grid, 10), CPU.voxelize_mean(empty, *grid, 10))
    points = voxel_cloud(make_gen("strided"), 500, 4, *grid)
    wide = torch.zeros(500, 8)
    wide[:, ::2] = points
    assert_same(EMU.voxelize(wide[:, ::2], *grid, 3, 100, True),
                CPU.voxelize(points, *grid, 3, 100, True))


def test_voxelize_lidar_frame():
    from lidar_frames import FRAMES

    frame = FRAMES[0]  # KITTI object frame 000000
    points = torch.from_numpy(frame.points())
    g = GridGeometry.from_spconv_args(frame.vsize, frame.coors_range)
    args = (g.voxel_size, g.range_min, g.grid_size)
    want = CPU.voxelize(points, *args, frame.max_points, frame.max_voxels, False)
    assert len(want[1]) == frame.voxels
    assert_same(EMU.voxelize(points, *args, frame.max_points, frame.max_voxels, False), want)
    assert_same(EMU.voxelize_mean(points, *args, 1000), CPU.voxelize_mean(points, *args, 1000))


# (argument overrides, exception type): each raised with the CPU op's message.
BAD_VOXELIZE_ARGS = [
    (dict(voxel_size=[0.1, 0.0, 0.1]), ValueError),
    (dict(voxel_size=[0.1, 1e-50, 0.1]), ValueError),  # zero in float32
    (dict(voxel_size=[0.1] * 5, range_min=[0.0] * 5, grid_size=[10] * 5), ValueError),
    (dict(range_min=[0.0, math.inf, 0.0]), ValueError),
    (dict(grid_size=[10, 0, 10]), ValueError),
    (dict(grid_size=[2**31, 1, 1]), ValueError),
    (dict(grid_size=[2**30, 2**30, 2**30]), ValueError),
    (dict(grid_size=[10, 10]), ValueError),
    (dict(max_points_per_voxel=0), ValueError),
    (dict(max_voxels=-1), ValueError),
    (dict(points=torch.zeros(4, 2)), ValueError),
    (dict(points=torch.zeros(4)), ValueError),
    (dict(points=torch.zeros(4, 3, dtype=torch.float16)), TypeError),
]


@pytest.mark.parametrize("op", ["voxelize", "voxelize_mean"])
@pytest.mark.parametrize("bad", BAD_VOXELIZE_ARGS, ids=case_id)
def test_voxelize_bad_arguments_raise_the_cpu_error(bad, op):
    overrides, error = bad
    if op == "voxelize_mean" and "max_points_per_voxel" in overrides:
        pytest.skip("voxelize_mean has no max_points_per_voxel")
    args = dict(points=torch.zeros(4, 3), voxel_size=[0.1] * 3, range_min=[0.0] * 3,
                grid_size=[10] * 3, max_points_per_voxel=5, max_voxels=10, empty_mean=False)
    args.update(overrides)
    if op == "voxelize_mean":
        del args["max_points_per_voxel"], args["empty_mean"]
    messages = []
    for ops in (EMU, CPU):
        with pytest.raises(error) as info:
            getattr(ops, op)(*args.values())
        messages.append(str(info.value).splitlines()[0])
    assert messages[0] == messages[1]


# ----------------------------------------------------------------------------- kernel variants
# SPCONV_LITE_CUDA_VARIANTS (include/spconv_lite/cuda_utils.cuh): prepared for the GPU speed work
# and not yet measured on a GPU. Row orders and pipelined tiles change which tile a row is in and
# how a tile's data reaches shared memory, not the arithmetic of an output element: their
# results equal the default kernels' bitwise, up to the sign of zero sums (an offset without a
# neighbour adds +0 in one and nothing in the other).

def same_values(got, want):
    """Bitwise equal, except -0.0 == +0.0; NaN where NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got + 0, want + 0, rtol=0, atol=0, equal_nan=True)


# (kind, splits): every table kind, one pass and several.
ORDER_CASES = [("subm", 1), ("subm", 2), ("subm", 3), ("strided", 1), ("strided", 2),
               ("transposed", 1), ("transposed", 3)]


@pytest.mark.parametrize("case", ORDER_CASES, ids=case_id)
def test_row_order_matches_cpu(case):
    kind, splits = case
    nbr, nbr_t = a_map(kind, seed="order")
    for table in (nbr, nbr_t):
        assert_same([EMU.conv_row_order(table, splits)], [CPU.conv_row_order(table, splits)])


@pytest.mark.parametrize("shape", [(0, 27), (5, 1), (40, 70)], ids=case_id)
def test_row_order_edge_tables_match_cpu(shape):
    # No rows, one offset, more offsets than a 64-bit mask holds.
    table = torch.randint(-1, 3, shape, generator=make_gen("order_edge", shape),
                          dtype=torch.int32)
    for splits in sorted({1, min(2, shape[1])}):
        assert_same([EMU.conv_row_order(table, splits)], [CPU.conv_row_order(table, splits)])


def variant_env(monkeypatch, variants, algo="fused", sm_major="9"):
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", variants)
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", algo)
    monkeypatch.setenv("SPCONV_LITE_EMU_SM_MAJOR", sm_major)


def conv_calls(kind, c_in, c_out, dtype, splits, key, n=300):
    """The forward and the input gradient of a conv (as ops.py runs them) over a map of ``n``
    sites, with row orders of ``splits`` splits (0: none)."""
    nbr, nbr_t = a_map(kind, n=n, seed="variants")
    volume = nbr.shape[1]
    gen = make_gen("variants", kind, c_in, c_out, dtype, key)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    w = randn(gen, volume, c_in, c_out, dtype=dtype, scale=(c_in * volume) ** -0.5)
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    order = CPU.conv_row_order(nbr, splits) if splits else None
    order_t = CPU.conv_row_order(nbr_t, splits) if splits else None
    return [lambda ops: ops.sparse_conv(x, w, nbr, nbr_t, order, order_t),
            lambda ops: ops.sparse_conv(g, w.transpose(1, 2), nbr_t, nbr, order_t, order)]


# (kind, c_in, c_out): narrow (BN 16 / 32, BK 16), wide, channel counts that are not multiples
# of 8 (padded by the pipelined launcher), c_in above one step, c_out above one 64-column tile.
VARIANT_SHAPES = [("subm", 16, 16), ("subm", 4, 16), ("strided", 40, 32), ("transposed", 13, 70)]
# (variants, splits of the row orders)
VARIANTS = [("tiles=wmma64", 3), ("tiles=pipelined", 0), ("tiles=pipelined", 1),
            ("tiles=pipelined", 2), ("tiles=pipelined,mma=sync", 0),
            ("tiles=pipelined,mma=sync", 2)]
HALF_TYPES = (torch.float16, torch.bfloat16)


def skip_unless_mma_applies(variants, dtype):
    # mma=sync changes the tensor-core kernels only.
    if "mma=sync" in variants and dtype not in HALF_TYPES:
        pytest.skip("mma=sync only changes the float16 / bfloat16 kernels")


@pytest.mark.parametrize("sm_major", ["9", "7"])  # tensor-core kernels, then SIMT fallbacks
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=case_id)  # float64: float32's SIMT code
@pytest.mark.parametrize("variant", VARIANTS, ids=case_id)
@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=case_id)
def test_conv_variants_equal_the_default_kernels(shape, variant, dtype, sm_major, monkeypatch):
    if sm_major == "7" and (dtype not in HALF_TYPES or "tiles=pipelined" in variant[0]):
        pytest.skip("the compute capability only changes the half-precision kernels, and "
                    "below sm_80 the pipelined tiles fall back to the SIMT ones")
    variants, splits = variant
    skip_unless_mma_applies(variants, dtype)
    kind, c_in, c_out = shape
    variant_env(monkeypatch, "", sm_major=sm_major)
    want = [call(EMU) for call in conv_calls(kind, c_in, c_out, dtype, 0, "equal")]
    variant_env(monkeypatch, variants, sm_major=sm_major)
    got = [call(EMU) for call in conv_calls(kind, c_in, c_out, dtype, splits, "equal")]
    for a, b in zip(got, want):
        same_values(a, b)
    cpu = [call(CPU) for call in conv_calls(kind, c_in, c_out, dtype, 0, "equal")]
    assert_close_to_scale(got[0], cpu[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("variant", [("tiles=pipelined", 0), ("tiles=pipelined", 2),
                                     ("tiles=wmma64", 2), ("tiles=pipelined,mma=sync", 2)],
                         ids=case_id)
@pytest.mark.parametrize("channels", [(16, 24), (5, 3)], ids=case_id)
def test_conv_variants_with_non_finite_weights(channels, variant, dtype, monkeypatch):
    # As the default kernels: an inf / NaN weight reaches only the rows with a neighbour at its
    # offset, including when a pipelined step's weights are cleaned on their way to shared
    # memory and their products added in the epilogue.
    variants, splits = variant
    skip_unless_mma_applies(variants, dtype)
    c_in, c_out = channels
    nbr, nbr_t = a_map("strided", seed="non_finite")
    gen = make_gen("variant_non_finite", channels, dtype)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    w = randn(gen, 27, c_in, c_out, dtype=dtype, scale=(27 * c_in) ** -0.5)
    w[0, 1, 2] = math.inf
    w[26, c_in - 1, 0] = -math.inf
    w[13, 0, c_out - 1] = math.nan
    w[14, 0, c_out - 1] = -math.inf  # with the NaN of offset 13: one pass or two
    variant_env(monkeypatch, "")
    want = EMU.sparse_conv(x, w, nbr, nbr_t)
    variant_env(monkeypatch, variants)
    order = CPU.conv_row_order(nbr, splits) if splits else None
    got = EMU.sparse_conv(x, w, nbr, nbr_t, order)
    cpu = CPU.sparse_conv(x, w, nbr, nbr_t)
    assert not torch.isfinite(cpu).all() and torch.isfinite(cpu).all(1).any()
    same_values(got, want)
    assert_close_non_finite(got, cpu, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=case_id)
@pytest.mark.parametrize("variant", [("tiles=pipelined", 0), ("tiles=pipelined", 2),
                                     ("tiles=pipelined,mma=sync", 2)], ids=case_id)
@pytest.mark.parametrize("shape", [("subm", 16, 16), ("subm", 4, 70)], ids=case_id)
def test_pipelined_tiles_of_128_rows(shape, variant, dtype, monkeypatch):
    # The maps of the tests above (300 sites) give the pipelined launcher fewer 128-row blocks
    # than two per emulated multiprocessor (4), so it takes 64-row tiles; 1500 sites are enough
    # for the 128-row tiles a large cloud gets.
    variants, splits = variant
    skip_unless_mma_applies(variants, dtype)
    variant_env(monkeypatch, "")
    want = [call(EMU) for call in conv_calls(*shape, dtype, 0, "tall", n=1500)]
    variant_env(monkeypatch, variants)
    got = [call(EMU) for call in conv_calls(*shape, dtype, splits, "tall", n=1500)]
    for a, b in zip(got, want):
        same_values(a, b)


@pytest.mark.parametrize("splits", [0, 2])
def test_pipelined_tiles_take_the_wide_float32_layers_off_the_gemms(splits, monkeypatch):
    # Under the auto algorithm a float32 layer of more than 32 x 64 channels runs per-offset
    # GEMMs, which round differently; with tiles=pipelined it runs the pipelined SIMT tiles, whose
    # sums are the default fused kernel's bit for bit.
    shape = ("subm", 64, 48)
    variant_env(monkeypatch, "", algo="fused")
    fused = [call(EMU) for call in conv_calls(*shape, torch.float32, 0, "wide")]
    variant_env(monkeypatch, "", algo="auto")
    gemm = [call(EMU) for call in conv_calls(*shape, torch.float32, 0, "wide")]
    assert not torch.equal(gemm[0], fused[0])  # else this test could not tell the paths apart
    variant_env(monkeypatch, "tiles=pipelined", algo="auto")
    got = [call(EMU) for call in conv_calls(*shape, torch.float32, splits, "wide")]
    for a, b in zip(got, fused):
        same_values(a, b)


@pytest.mark.parametrize("sm_major", ["9", "7"])
@pytest.mark.parametrize("dtype", DTYPES, ids=case_id)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=case_id)
def test_compact_weight_grad(shape, dtype, sm_major, monkeypatch):
    if sm_major == "7" and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("the compute capability only changes the half-precision kernels")
    kind, c_in, c_out = shape
    variant_env(monkeypatch, "wgrad=compact", sm_major=sm_major)
    nbr, nbr_t = a_map(kind)
    gen = make_gen("compact", shape, dtype)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    got = EMU.sparse_conv_weight_grad(x, g, nbr)
    want = CPU.sparse_conv_weight_grad(x, g, nbr)
    assert_close_to_scale(got, want, dtype)
    assert_same([EMU.sparse_conv_weight_grad(x, g, nbr)], [got])  # deterministic


def test_compact_weight_grad_of_rows_without_pairs(monkeypatch):
    # Chunks without a single pair, a queue emptied exactly, offsets without pairs.
    variant_env(monkeypatch, "wgrad=compact")
    nbr = torch.full((700, 4), -1, dtype=torch.int32)
    nbr[::7, 1] = torch.arange(100, dtype=torch.int32)
    nbr[600:664, 2] = torch.arange(64, dtype=torch.int32)
    x, g = torch.randn(100, 8), torch.randn(700, 16)
    got = EMU.sparse_conv_weight_grad(x, g, nbr)
    torch.testing.assert_close(got, CPU.sparse_conv_weight_grad(x, g, nbr))
    assert torch.equal(got[0], torch.zeros(8, 16)) and torch.equal(got[3], torch.zeros(8, 16))


@pytest.mark.parametrize("case", [(torch.float16, 128, 128), (torch.bfloat16, 128, 128),
                                  (torch.float16, 3, 64), (torch.bfloat16, 16, 24),
                                  (torch.float32, 128, 128), (torch.float32, 36, 28),
                                  (torch.float32, 4, 16)], ids=case_id)
@pytest.mark.parametrize("kind", ["subm", "strided"])
def test_compact_weight_grad_pipelined_sums_as_unpipelined(kind, case, monkeypatch):
    # With 16-byte copies the kernels gather each step by cp.async while the step before it is
    # multiplied (float32: 8 x 4 outputs a thread read as float4); one element off alignment
    # they stage them through registers, one step at a time (float32: 4 x 4 outputs a thread,
    # scalar reads). The tiles, the steps and their order are the same, so the sums are too.
    # 128 channels: several channel tiles, and chunks of several steps with queue refills
    # between them; float32 also has tiles of 32 and 16 columns (128 and 256 rows). Half types
    # with at most 16 inputs take the 16-input tiles; 3 inputs are padded to 8 for the copies.
    dtype, c_in, c_out = case
    variant_env(monkeypatch, "wgrad=compact")
    nbr, nbr_t = a_map(kind, n=900, seed="pipelined_wgrad")
    gen = make_gen("pipelined_wgrad", kind, dtype, c_in, c_out)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    pipelined = EMU.sparse_conv_weight_grad(x, g, nbr)
    staged = EMU.sparse_conv_weight_grad(misaligned(x), misaligned(g), nbr)
    assert torch.equal(pipelined, staged)
    want = CPU.sparse_conv_weight_grad(x.double(), g.double(), nbr)
    assert_close_to_scale(pipelined, want, dtype)


@pytest.mark.parametrize("aligned", [True, False], ids=["copies", "staged"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=case_id)
@pytest.mark.parametrize("case", [("subm", 128, 128), ("strided", 40, 24), ("subm", 3, 64),
                                  ("strided", 16, 16)], ids=case_id)
def test_compact_weight_grad_with_sync_mma_sums_as_wmma(case, dtype, aligned, monkeypatch):
    # ldmatrix + mma.sync in place of WMMA: the same steps in the same order, each element's
    # products added in the same order, so the same sums, with 16-byte copies (pipelined) and
    # without (staged through registers). X^T, the A operand, is read column-major
    # (ldmatrix.trans); 128 channels: several channel tiles and all four warps' parts; at most
    # 16 inputs: the 16-input tiles.
    kind, c_in, c_out = case
    nbr, nbr_t = a_map(kind, n=900, seed="sync_mma_wgrad")
    gen = make_gen("sync_mma_wgrad", kind, dtype, c_in, c_out)
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    if not aligned:
        x, g = misaligned(x), misaligned(g)
    variant_env(monkeypatch, "wgrad=compact")
    want = EMU.sparse_conv_weight_grad(x, g, nbr)
    variant_env(monkeypatch, "wgrad=compact,mma=sync")
    got = EMU.sparse_conv_weight_grad(x, g, nbr)
    same_values(got, want)
    cpu = CPU.sparse_conv_weight_grad(x.double(), g.double(), nbr)
    assert_close_to_scale(got, cpu, dtype)


EARLY_COPY_CASES = (
    [("conv", shape, variant, dtype) for shape in VARIANT_SHAPES
     for variant in [("tiles=pipelined", 0), ("tiles=pipelined", 2)]
     for dtype in (torch.float32, torch.float16)]
    + [("conv", shape, ("tiles=pipelined,mma=sync", 2), torch.bfloat16)
       for shape in VARIANT_SHAPES[:2]]
    + [("conv_128_rows", ("subm", 16, 16), ("tiles=pipelined", 2), dtype)
       for dtype in (torch.float32, torch.float16)]
    + [("weight_grad", "subm", (dtype, 128, 128)) for dtype in (torch.float32, torch.float16)]
    + [("weight_grad_sync_mma", ("subm", 128, 128), torch.float16, True)])


@pytest.mark.parametrize("case", EARLY_COPY_CASES, ids=case_id)
def test_pipelines_with_copies_landing_early(case, monkeypatch):
    # The pipelined kernels again, their cp.async copies landing as soon as they are issued (as
    # early as a GPU may land them) instead of at the wait: a step's copies into a stage that
    # slower threads still multiply (a missing barrier before the refill) would change their
    # sums, which copies landing at the wait hide.
    monkeypatch.setenv("SPCONV_LITE_EMU_CP_ASYNC", "early")
    kind, *args = case
    if kind == "conv":
        test_conv_variants_equal_the_default_kernels(*args, "9", monkeypatch)
    elif kind == "conv_128_rows":
        test_pipelined_tiles_of_128_rows(*args, monkeypatch)
    elif kind == "weight_grad_sync_mma":
        test_compact_weight_grad_with_sync_mma_sums_as_wmma(*args, monkeypatch)
    else:
        test_compact_weight_grad_pipelined_sums_as_unpipelined(*args, monkeypatch)


def test_compact_weight_grad_takes_the_wide_float32_layers_off_the_gemms(monkeypatch):
    # As the pipelined conv tiles in the forward: under the auto algorithm a float32 layer of
    # more than 32 x 64 channels takes per-offset GEMMs for its weight gradient, which round
    # differently; with wgrad=compact it takes the compacted kernel.
    nbr, nbr_t = a_map("subm", seed="wide_wgrad")
    gen = make_gen("wide_wgrad")
    x = randn(gen, nbr_t.shape[0], 64, dtype=torch.float32)
    g = randn(gen, nbr.shape[0], 48, dtype=torch.float32)
    variant_env(monkeypatch, "wgrad=compact", algo="fused")
    fused = EMU.sparse_conv_weight_grad(x, g, nbr)
    variant_env(monkeypatch, "", algo="auto")
    gemm = EMU.sparse_conv_weight_grad(x, g, nbr)
    assert not torch.equal(gemm, fused)  # else this test could not tell the paths apart
    variant_env(monkeypatch, "wgrad=compact", algo="auto")
    assert torch.equal(EMU.sparse_conv_weight_grad(x, g, nbr), fused)


@pytest.mark.parametrize("case", CONV_CASES[:4] + CONV_CASES[6:7], ids=case_id)
def test_conv_map_with_radix_sort(case, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "mapsort=radix")
    idx = random_sites(make_gen("conv", case), case[1], case[2], count=case[3])
    args = conv_args(case)
    assert_same(EMU.build_conv_map(idx, *args), CPU.build_conv_map(idx, *args))


@pytest.mark.parametrize("mode", ["conv", "transposed"])
def test_conv_map_with_radix_sort_on_huge_grids(mode, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "mapsort=radix")
    test_maps_on_huge_grids(mode)


@pytest.mark.parametrize("value", ["tiles=fast", "rows", "wgrad", "rows=9", "pipelined",
                                   "mma=mma"])
def test_unknown_variants_raise(value, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", value)
    nbr, nbr_t = a_map("subm", n=20, seed="unknown")
    x, w = torch.randn(nbr_t.shape[0], 3), torch.randn(27, 3, 2)
    with pytest.raises(ValueError, match="SPCONV_LITE_CUDA_VARIANTS: unknown entry"):
        EMU.sparse_conv(x, w, nbr, nbr_t)


@pytest.mark.parametrize("variants", ["", "tiles=pipelined", "wgrad=compact",
                                      "tiles=pipelined,wgrad=compact,mma=sync"])
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=case_id)
def test_conv_of_misaligned_tensors(dtype, variants, monkeypatch):
    # Channel counts that allow the 16-byte loads, on tensors where they would be misaligned
    # (on a GPU: "misaligned address"; here emu.h aborts): the launchers must fall back.
    variant_env(monkeypatch, variants)
    nbr, nbr_t = a_map("subm", seed="misaligned")
    gen = make_gen("misaligned", dtype)
    x = randn(gen, nbr_t.shape[0], 16, dtype=dtype)
    w = randn(gen, nbr.shape[1], 16, 32, dtype=dtype, scale=(16 * 27) ** -0.5)
    g = randn(gen, nbr.shape[0], 32, dtype=dtype)
    calls = [lambda ops, x, w, g: ops.sparse_conv(x, w, nbr, nbr_t),
             lambda ops, x, w, g: ops.sparse_conv(g, w.transpose(1, 2), nbr_t, nbr),
             lambda ops, x, w, g: ops.sparse_conv_weight_grad(x, g, nbr)]
    for call in calls:
        got = call(EMU, misaligned(x), misaligned(w), misaligned(g))
        want = call(CPU, x, w, g)
        assert_close_to_scale(got, want, dtype)


# ----------------------------------------------------------------------------- random cases
# Geometries, row counts, channel counts, dtypes and kernel variants drawn at random (seeded, so
# a failure reproduces): what the fixed cases above do not combine, such as 1D / 2D / 4D maps,
# row counts around the tile sizes and channels past one tile, under every variant; and clouds
# voxelized on random grids with random caps. More cases, or others:
# SPCONV_LITE_EMU_RANDOM_CASES=N SPCONV_LITE_EMU_RANDOM_SEED=S (defaults 24, 0).

RANDOM_CASES = int(os.environ.get("SPCONV_LITE_EMU_RANDOM_CASES", "24"))
RANDOM_SEED = os.environ.get("SPCONV_LITE_EMU_RANDOM_SEED", "0")
RANDOM_VARIANTS = ["", "tiles=wmma64", "tiles=pipelined", "tiles=pipelined,mma=sync",
                   "wgrad=compact", "tiles=pipelined,wgrad=compact",
                   "tiles=pipelined,wgrad=compact,mma=sync"]
RANDOM_CHANNELS = [1, 3, 4, 5, 8, 13, 16, 24, 32, 40, 64, 65, 96, 128, 136]


def random_map(rng: random.Random, gen: torch.Generator):
    """(description, map args, map op name, nbr, nbr_t) of a random subm, strided or transposed
    map in 1 to 4 dimensions; None when the draw has no valid output grid, or more than 125
    kernel offsets or 600 output sites (the emulation would take minutes)."""
    ndim = rng.choice([1, 2, 3, 3, 4])
    shape = [rng.randint(3, 12) for _ in range(ndim)]
    batch = rng.randint(1, 3)
    count = min(rng.choice([0, 1, 63, 64, 65, 129, 300, 500]), batch * math.prod(shape))
    idx = random_sites(gen, batch, shape, count=count)
    kind = rng.choice(["subm", "strided", "transposed"])
    if kind == "subm":
        kernel = [rng.choice([1, 3, 5] if ndim < 4 else [1, 3]) for _ in range(ndim)]
        dilation = [rng.choice([1, 2]) for _ in range(ndim)]
        if any((k - 1) // 2 * d > s for k, d, s in zip(kernel, dilation, shape)):
            return None
        args = (idx, shape, batch, kernel, dilation)
        return f"subm {args[1:]}, {count} sites", args, "build_subm_map", *CPU.build_subm_map(*args)
    kernel = [rng.randint(1, 4 if ndim < 4 else 3) for _ in range(ndim)]
    stride = [rng.randint(1, 3) for _ in range(ndim)]
    padding = [rng.randint(0, 1) for _ in range(ndim)]
    transposed = kind == "transposed"
    if transposed:
        out = [(s - 1) * st - 2 * p + k for s, k, st, p in zip(shape, kernel, stride, padding)]
    else:
        out = [(s + 2 * p - k) // st + 1 for s, k, st, p in zip(shape, kernel, stride, padding)]
    if min(out) < 1:
        return None
    args = (idx, shape, batch, out, kernel, stride, padding, [1] * ndim, transposed)
    _, nbr, nbr_t = CPU.build_conv_map(*args)
    if nbr.shape[0] > 600:
        return None
    return f"{kind} {args[1:]}, {count} sites", args, "build_conv_map", nbr, nbr_t


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_random_cases(case, monkeypatch):
    rng = random.Random(f"{RANDOM_SEED}-{case}")
    gen = make_gen("random", RANDOM_SEED, case)
    drawn = None
    while drawn is None:
        drawn = random_map(rng, gen)
    where, map_args, map_op, nbr, nbr_t = drawn

    # The map, with either sort of the output keys.
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", rng.choice(["", "mapsort=radix"]))
    assert_same(getattr(EMU, map_op)(*map_args), getattr(CPU, map_op)(*map_args),
                f"{map_op}, {where}")

    volume = nbr.shape[1]
    c_in, c_out = rng.choice(RANDOM_CHANNELS), rng.choice(RANDOM_CHANNELS)
    dtype = rng.choice(DTYPES)
    variants = rng.choice(RANDOM_VARIANTS)
    splits = min(rng.choice([0, 0, 1, 2, 3]), volume) if volume > 1 else 0
    algo, sm_major = rng.choice(["fused", "auto"]), rng.choice(["9", "9", "7"])
    where += f"; {c_in} -> {c_out} {dtype} '{variants}' rows={splits} {algo} sm {sm_major}"
    x = randn(gen, nbr_t.shape[0], c_in, dtype=dtype)
    w = randn(gen, volume, c_in, c_out, dtype=dtype, scale=(c_in * volume) ** -0.5)
    g = randn(gen, nbr.shape[0], c_out, dtype=dtype)
    order = CPU.conv_row_order(nbr, splits) if splits else None
    order_t = CPU.conv_row_order(nbr_t, splits) if splits else None
    if splits:
        assert_same([EMU.conv_row_order(nbr, splits), EMU.conv_row_order(nbr_t, splits)],
                    [order, order_t], f"conv_row_order, {where}")

    def conv_ops(ops, *orders):
        return [ops.sparse_conv(x, w, nbr, nbr_t, *orders),
                ops.sparse_conv(g, w.transpose(1, 2), nbr_t, nbr, *orders[::-1]),
                ops.sparse_conv_weight_grad(x, g, nbr)]

    variant_env(monkeypatch, variants, algo, sm_major)
    got = conv_ops(EMU, order, order_t)
    for op, a, b in zip(["forward", "input gradient", "weight gradient"], got, conv_ops(CPU)):
        assert a.dtype == dtype and a.shape == b.shape, where
        assert_close_to_scale(a, b, dtype, f"{op}, {where}")
    if algo == "fused" and "wgrad" not in variants:
        # Tiles and row orders change where products are computed, not the sums.
        variant_env(monkeypatch, "", "fused", sm_major)
        for a, b in zip(got[:2], conv_ops(EMU, None, None)[:2]):
            same_values(a, b)

    pooled = distinct_values(gen, nbr_t.shape[0], c_in, dtype=dtype)
    grad = randn(gen, nbr.shape[0], c_in, dtype=dtype)

    def pool_ops(ops):
        out, argmax = ops.sparse_max_pool(pooled, nbr, nbr_t)
        return [ops.sparse_sum_pool(pooled, nbr, nbr_t), out, argmax,
                ops.sparse_max_pool_backward(grad, argmax, nbr_t)]

    assert_same(pool_ops(EMU), pool_ops(CPU), f"pooling, {where}")


@pytest.mark.parametrize("case", range(RANDOM_CASES))
def test_random_voxelizations(case):
    rng = random.Random(f"{RANDOM_SEED}-voxels-{case}")
    ndim = rng.choice([1, 2, 3, 3, 4])
    grid = ([rng.choice([0.05, 0.07, 0.1, 0.3, 0.5, 1.0]) for _ in range(ndim)],
            [rng.uniform(-5.0, 1.0) for _ in range(ndim)],
            [rng.randint(1, 60) for _ in range(ndim)])  # voxel size, range minimum, grid size
    columns, n = ndim + rng.randint(0, 3), rng.choice([1, 10, 500, 3000])
    max_points, max_voxels = rng.choice([1, 2, 5, 35]), rng.choice([0, 1, 10, 100, 100000])
    points = voxel_cloud(make_gen("random voxels", RANDOM_SEED, case), n, columns, *grid)
    for args in [(*grid, max_points, max_voxels, empty_mean) for empty_mean in (False, True)]:
        assert_same(EMU.voxelize(points, *args), CPU.voxelize(points, *args))
    assert_same(EMU.voxelize_mean(points, *grid, max_voxels),
                CPU.voxelize_mean(points, *grid, max_voxels))
