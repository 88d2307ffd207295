"""The CPU conv kernels' tile paths, on random neighbour tables, against float64.

float32 runs register tiles of AVX-512 or AVX2 (picked per call where the CPU has both; the
tests pin each through SPCONV_LITE_CPU_TILES, and the portable loops too): full tiles of 12
or 6 rows on strips of two vectors, the rows left over on wider strips, narrower strips and
lane-masked columns at the right edge, and the weight gradient's channel tiles. Which tile a
pair lands in depends on how many pairs an offset has in a block of rows and on the channel
counts, so the cases vary both, along with kernel volumes past 64 offsets (the pair buckets'
masks take more than one word) and of one offset (filled without masks). float64 runs the
portable loop and is the reference here, itself checked against plain torch products over the
same tables.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TOL, case_id, make_gen, num_threads, randn

from spconv_lite import ops

TILES_SWITCH = "SPCONV_LITE_CPU_TILES"


def cpu_has(tiles: str) -> bool:
    """Whether this CPU runs ``tiles`` (the op refuses a vector set the CPU lacks)."""
    previous = os.environ.get(TILES_SWITCH)
    os.environ[TILES_SWITCH] = tiles
    try:
        one = torch.ones(1, 1)
        ops.sparse_conv(one, one.view(1, 1, 1), torch.zeros(1, 1, dtype=torch.int32),
                        torch.zeros(1, 1, dtype=torch.int32))
        return True
    except ValueError as error:
        # Only the op's refusal of a vector set this CPU or build lacks means "no".
        if "but this CPU has no" in str(error) or "only the portable loops" in str(error):
            return False
        raise
    finally:
        if previous is None:
            del os.environ[TILES_SWITCH]
        else:
            os.environ[TILES_SWITCH] = previous


TILES = [pytest.param(t, marks=pytest.mark.skipif(not cpu_has(t), reason=f"no {t} on this CPU"))
         for t in ("avx512", "avx2", "none")]


def random_tables(gen: torch.Generator, n_in: int, n_out: int, volume: int,
                  density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid (nbr, nbr_t) pair: at each offset, a random fraction ``density`` of the output
    rows get distinct random input rows."""
    nbr = torch.full((n_out, volume), -1, dtype=torch.int32)
    nbr_t = torch.full((n_in, volume), -1, dtype=torch.int32)
    for k in range(volume):
        count = min(n_in, int(torch.binomial(torch.tensor(float(n_out)),
                                             torch.tensor(density), generator=gen)))
        outs = torch.randperm(n_out, generator=gen)[:count]
        ins = torch.randperm(n_in, generator=gen)[:count].int()
        nbr[outs, k] = ins
        nbr_t[ins.long(), k] = outs.int()
    return nbr, nbr_t


# (c_in, c_out, volume, density): channel counts across the strip widths (64, 32, 16, 8 and a
# masked remainder) and pair counts per block from 0-2 up to every row.
CASES = [
    (16, 16, 27, 0.05),
    (16, 16, 27, 1.0),
    (3, 5, 7, 0.5),
    (9, 1, 27, 0.3),
    (32, 24, 125, 0.1),
    (17, 40, 27, 0.02),
    (64, 56, 27, 0.04),
    (24, 72, 7, 0.7),
    (65, 136, 27, 0.03),
    (8, 12, 343, 0.05),
    (40, 20, 66, 0.4),
    (16, 16, 1, 1.0),
    (5, 70, 1, 0.4),
]


def conv_and_grads(x, w, nbr, nbr_t, upstream):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = ops.sparse_conv(x, w, nbr, nbr_t)
    grad_x, grad_w = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), (x, w))
    return out.detach(), grad_x, grad_w


def table_reference(x, w, nbr, nbr_t, upstream):
    """conv_and_grads from plain torch products, one offset at a time."""
    out = x.new_zeros(nbr.shape[0], w.shape[2])
    grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(w)
    for k in range(w.shape[0]):
        outs = (nbr[:, k] >= 0).nonzero().squeeze(1)
        ins = nbr[outs, k].long()
        out[outs] += x[ins] @ w[k]
        grad_w[k] = x[ins].T @ upstream[outs]
        ins_t = (nbr_t[:, k] >= 0).nonzero().squeeze(1)
        grad_x[ins_t] += upstream[nbr_t[ins_t, k].long()] @ w[k].T
    return out, grad_x, grad_w


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64_loop_matches_plain_products(case):
    c_in, c_out, volume, density = case
    gen = make_gen("loop", *case)
    nbr, nbr_t = random_tables(gen, 300, 280, volume, density)
    x, w = randn(gen, 300, c_in), randn(gen, volume, c_in, c_out)
    upstream = randn(gen, 280, c_out)
    want = table_reference(x, w, nbr, nbr_t, upstream)
    for name, g, e in zip(("output", "grad features", "grad weight"),
                          conv_and_grads(x, w, nbr, nbr_t, upstream), want):
        torch.testing.assert_close(g, e, **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_tiles_match_float64(case, tiles, monkeypatch):
    monkeypatch.setenv(TILES_SWITCH, tiles)
    c_in, c_out, volume, density = case
    gen = make_gen("tiles", *case)
    n_in, n_out = 700, 650
    nbr, nbr_t = random_tables(gen, n_in, n_out, volume, density)
    pairs_per_row = max(1.0, volume * density)
    x = randn(gen, n_in, c_in)
    w = randn(gen, volume, c_in, c_out, scale=(c_in * pairs_per_row) ** -0.5)
    # Scaled so that outputs and gradients are about 1, like the tolerance.
    upstream = randn(gen, n_out, c_out, scale=max(1.0, n_out * density) ** -0.5)
    want = conv_and_grads(x, w, nbr, nbr_t, upstream)
    got = conv_and_grads(x.float(), w.float(), nbr, nbr_t, upstream)
    for name, g, e in zip(("output", "grad features", "grad weight"), got, want):
        torch.testing.assert_close(g.double(), e, **TOL[torch.float32], msg=name)


def float32_conv_inputs(name: str, case, n_in: int, n_out: int):
    """(x, w, nbr, nbr_t, upstream) in float32 for a random table of ``case``."""
    c_in, c_out, volume, density = case
    gen = make_gen(name, *case)
    nbr, nbr_t = random_tables(gen, n_in, n_out, volume, density)
    x = randn(gen, n_in, c_in, dtype=torch.float32)
    w = randn(gen, volume, c_in, c_out, dtype=torch.float32, scale=0.1)
    return x, w, nbr, nbr_t, randn(gen, n_out, c_out, dtype=torch.float32)


@pytest.mark.parametrize("case", CASES[4:6] + CASES[-4:], ids=case_id)
def test_float32_tiles_give_the_same_bits_on_one_and_two_threads(case):
    # Two threads split the weight gradient's offsets, so one starts its pair buckets at an
    # offset past 0.
    inputs = float32_conv_inputs("tile threads", case, 500, 480)
    runs = []
    for threads in (1, 2):
        with num_threads(threads):
            runs.append(conv_and_grads(*inputs))
    for one, two in zip(*runs):
        assert torch.equal(one, two)


# Channel counts past each tile width of both vector sets (8 and 16 lanes, strips of 2 to 8
# vectors, masked remainders) and densities that leave every count of rows (1 to 11) over.
SAME_BITS_CASES = [(c_in, c_out, 27, density)
                   for c_in, c_out in ((1, 1), (7, 9), (16, 16), (13, 24), (31, 33), (12, 48),
                                       (64, 64), (25, 100), (130, 129), (200, 256))
                   for density in (0.01, 0.08, 0.6)]


@pytest.mark.skipif(not (cpu_has("avx512") and cpu_has("avx2")), reason="no AVX-512 here")
@pytest.mark.parametrize("case", SAME_BITS_CASES, ids=case_id)
def test_avx512_and_avx2_tiles_give_the_same_bits(case, monkeypatch):
    # Both run each output element as one FMA chain over the input channels, so the wider
    # vectors may only change the speed.
    inputs = float32_conv_inputs("same bits", case, 400, 380)
    runs = []
    for tiles in ("avx512", "avx2"):
        monkeypatch.setenv(TILES_SWITCH, tiles)
        runs.append(conv_and_grads(*inputs))
    for name, wide, narrow in zip(("output", "grad features", "grad weight"), *runs):
        assert torch.equal(wide, narrow), name


@pytest.mark.parametrize("value", ["avx", "AVX2", "sse", " "])
def test_the_tiles_switch_refuses_other_values(value, monkeypatch):
    monkeypatch.setenv(TILES_SWITCH, value)
    one = torch.ones(1, 1)
    table = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"{TILES_SWITCH} must be avx512, avx2 or none, got"):
        ops.sparse_conv(one, one.view(1, 1, 1), table, table)
    with pytest.raises(ValueError, match=TILES_SWITCH):
        torch.ops.spconv_lite.sparse_conv_weight_grad(one, one, table)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_are_summed_in_float_and_rounded_once(dtype, tiles, monkeypatch):
    # With vector tiles they run the float32 tiles on float copies; with the portable loops
    # they sum in a float buffer. Either way the result is the exact sum of the half values'
    # products rounded once, up to float32's own rounding.
    monkeypatch.setenv(TILES_SWITCH, tiles)
    gen = make_gen("half", str(dtype), tiles)
    nbr, nbr_t = random_tables(gen, 300, 280, 27, 0.2)
    x = randn(gen, 300, 24).to(dtype)
    w = randn(gen, 27, 24, 40, scale=0.05).to(dtype)
    exact = ops.sparse_conv(x.double(), w.double(), nbr, nbr_t)
    got = ops.sparse_conv(x, w, nbr, nbr_t)
    assert got.dtype == dtype
    half_step = torch.finfo(dtype).eps / 2  # a rounding moves a value by at most this much
    torch.testing.assert_close(got.double(), exact, rtol=half_step * 1.01, atol=1e-6)
