"""Checks the pure-PyTorch reference (spconv_lite/reference.py) against dense PyTorch.

Every op is compared, in float64, with its dense counterpart on random sparse inputs:
output sites must equal the dense output's support (computed exactly from an occupancy mask
convolved with a ones kernel) in sorted order, and values must match at those sites.
"""

import importlib.util
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def _load_reference():
    """Imports spconv_lite.reference, or loads the file directly if the package can't import
    (e.g. the C++ extension is not built)."""
    try:
        from spconv_lite import reference
        return reference
    except Exception:
        path = Path(__file__).resolve().parents[1] / "spconv_lite" / "reference.py"
        spec = importlib.util.spec_from_file_location("_spconv_lite_reference", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ref = _load_reference()

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


# ----------------------------------------------------------------------------- helpers

def ntuple(value, ndim):
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def make_gen(*key) -> torch.Generator:
    """A generator seeded from the test case, so every case gets its own fixed data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_sites(gen, batch_size, shape, density=0.3) -> Tensor:
    """Unique random sites ``[N, D+1]`` int32 (batch first), in random row order."""
    cells = batch_size * math.prod(shape)
    flat = torch.randperm(cells, generator=gen)[: max(1, round(density * cells))]
    coords = []
    for size in reversed((batch_size, *shape)):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(coords[::-1], 1).to(torch.int32)


def randn(gen, *shape) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def leaf_features(gen, n, channels) -> Tensor:
    # Transposed storage: the reference must cope with non-contiguous features.
    return randn(gen, channels, n).t().requires_grad_()


def densify(features, indices, shape, batch_size, fill=0.0) -> Tensor:
    """Differentiable scatter of ``[N, C]`` features to dense ``[B, C, *shape]``."""
    dense = features.new_full((batch_size, *shape, features.shape[1]), fill)
    dense = dense.index_put(tuple(indices.long().t()), features)
    return dense.movedim(-1, 1)


def occupancy(indices, shape, batch_size) -> Tensor:
    ones = torch.ones(len(indices), 1, dtype=DTYPE)
    return densify(ones, indices, shape, batch_size)


def gather(dense, indices) -> Tensor:
    """Values ``[N, C]`` of dense ``[B, C, *S]`` at the given sites."""
    return dense.movedim(1, -1)[tuple(indices.long().t())]


def dense_conv(x, weight, bias, stride, padding, dilation, groups=1) -> Tensor:
    """Dense cross-correlation for D in 1..4 (torch weight layout [C_out, C_in/g, *k])."""
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


def conv_weight(w) -> Tensor:
    """spconv [C_out, *k, C_in] -> torch conv [C_out, C_in, *k]."""
    ndim = w.dim() - 2
    return w.permute(0, ndim + 1, *range(1, ndim + 1))


def conv_t_weight(w) -> Tensor:
    """spconv [C_out, *k, C_in] -> torch conv_transpose [C_in, C_out, *k]."""
    ndim = w.dim() - 2
    return w.permute(ndim + 1, 0, *range(1, ndim + 1))


def conv_shape(shape, k, s, p, d):
    return [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1
            for n, kk, ss, pp, dd in zip(shape, k, s, p, d)]


def support_sites(mask) -> Tensor:
    """Sites ``[M, D+1]`` int32 where a ``[B, 1, *S]`` count is positive, sorted row-major."""
    return (mask[:, 0] > 0.5).nonzero().to(torch.int32)


@dataclass
class Result:
    """One op run both ways: sparse reference and dense torch at the expected sites."""
    sparse: Tensor
    dense: Tensor
    leaves: list
    out_indices: Optional[Tensor] = None
    expected_indices: Optional[Tensor] = None
    out_shape: Optional[list] = None
    expected_shape: Optional[list] = None


def check(res: Result) -> None:
    if res.out_indices is not None:
        assert res.out_indices.dtype == torch.int32
        assert torch.equal(res.out_indices, res.expected_indices)  # same sites, sorted
    if res.out_shape is not None:
        assert isinstance(res.out_shape, list) and res.out_shape == res.expected_shape
    assert res.sparse.shape == res.dense.shape
    torch.testing.assert_close(res.sparse.detach(), res.dense.detach(), **TOL)


# ----------------------------------------------------------------------------- runners

def run_conv(case) -> Result:
    batch, c_in, c_out, shape, k, s, p, d = case
    ndim = len(shape)
    k, s, p, d = (ntuple(v, ndim) for v in (k, s, p, d))
    out_shape = conv_shape(shape, k, s, p, d)
    if min(out_shape) < 1:
        pytest.skip("dense output would be empty")
    gen = make_gen("conv", case)
    idx = random_sites(gen, batch, shape)
    f = leaf_features(gen, len(idx), c_in)
    w = randn(gen, c_out, *k, c_in).requires_grad_()
    bias = randn(gen, c_out).requires_grad_()
    out, out_idx, got_shape = ref.sparse_conv(f, idx, list(shape), batch, w, s, p, d, bias)
    dense = dense_conv(densify(f, idx, shape, batch), conv_weight(w), bias, s, p, d)
    count = dense_conv(occupancy(idx, shape, batch), torch.ones(1, 1, *k, dtype=DTYPE), None,
                       s, p, d)
    expected = support_sites(count)
    return Result(out, gather(dense, expected), [f, w, bias], out_idx, expected, got_shape,
                  list(dense.shape[2:]))


def run_subm(case) -> Result:
    batch, c_in, c_out, shape, k, d = case
    ndim = len(shape)
    k, d = ntuple(k, ndim), ntuple(d, ndim)
    gen = make_gen("subm", case)
    idx = random_sites(gen, batch, shape)
    f = leaf_features(gen, len(idx), c_in)
    w = randn(gen, c_out, *k, c_in).requires_grad_()
    bias = randn(gen, c_out).requires_grad_()
    out = ref.subm_conv(f, idx, list(shape), w, d, bias)
    pad = [dd * (kk - 1) // 2 for kk, dd in zip(k, d)]
    dense = dense_conv(densify(f, idx, shape, batch), conv_weight(w), bias, 1, pad, d)
    return Result(out, gather(dense, idx), [f, w, bias])


def run_transpose(case) -> Result:
    batch, c_in, c_out, shape, k, s, p, d, op = case
    ndim = len(shape)
    k, s, p, d, op = (ntuple(v, ndim) for v in (k, s, p, d, op))
    out_shape = [(n - 1) * ss - 2 * pp + dd * (kk - 1) + 1 + oo
                 for n, kk, ss, pp, dd, oo in zip(shape, k, s, p, d, op)]
    if min(out_shape) < 1:
        pytest.skip("dense output would be empty")
    gen = make_gen("transpose", case)
    idx = random_sites(gen, batch, shape)
    f = leaf_features(gen, len(idx), c_in)
    w = randn(gen, c_out, *k, c_in).requires_grad_()
    bias = randn(gen, c_out).requires_grad_()
    out, out_idx, got_shape = ref.sparse_conv_transpose(f, idx, list(shape), batch, w, s, p, d,
                                                        op, bias)
    dense = CONV_T[ndim](densify(f, idx, shape, batch), conv_t_weight(w), bias, s, p, op, 1, d)
    count = CONV_T[ndim](occupancy(idx, shape, batch), torch.ones(1, 1, *k, dtype=DTYPE), None,
                         s, p, op, 1, d)
    expected = support_sites(count)
    return Result(out, gather(dense, expected), [f, w, bias], out_idx, expected, got_shape,
                  list(dense.shape[2:]))


def run_inverse(case) -> Result:
    """Inverse conv = dense conv_transpose of the strided conv's output, at its input sites."""
    batch, c_in, c_out, shape, k, s, p, d = case
    ndim = len(shape)
    k, s, p, d = (ntuple(v, ndim) for v in (k, s, p, d))
    mid_shape = conv_shape(shape, k, s, p, d)
    if min(mid_shape) < 1:
        pytest.skip("dense output would be empty")
    gen = make_gen("inverse", case)
    idx = random_sites(gen, batch, shape)
    count = dense_conv(occupancy(idx, shape, batch), torch.ones(1, 1, *k, dtype=DTYPE), None,
                       s, p, d)
    mid_idx = support_sites(count)
    mid_idx = mid_idx[torch.randperm(len(mid_idx), generator=gen)]  # any row order is allowed
    g = leaf_features(gen, len(mid_idx), c_in)
    w = randn(gen, c_out, *k, c_in).requires_grad_()
    bias = randn(gen, c_out).requires_grad_()
    out = ref.sparse_inverse_conv(g, mid_idx, mid_shape, batch, w, idx, list(shape), s, p, d,
                                  bias)
    # output_padding makes the transpose land exactly on the conv's input shape.
    op = [n - ((m - 1) * ss - 2 * pp + dd * (kk - 1) + 1)
          for n, m, kk, ss, pp, dd in zip(shape, mid_shape, k, s, p, d)]
    dense = CONV_T[ndim](densify(g, mid_idx, mid_shape, batch), conv_t_weight(w), bias, s, p,
                         op, 1, d)
    assert list(dense.shape[2:]) == list(shape)
    return Result(out, gather(dense, idx), [g, w, bias])


def run_pool(kind, case) -> Result:
    batch, c, shape, k, s, p, d = case
    ndim = len(shape)
    k, p, d = ntuple(k, ndim), ntuple(p, ndim), ntuple(d, ndim)
    s = k if s is None else ntuple(s, ndim)
    out_shape = conv_shape(shape, k, s, p, d)
    if min(out_shape) < 1:
        pytest.skip("dense output would be empty")
    gen = make_gen(kind, case)
    idx = random_sites(gen, batch, shape)
    f = leaf_features(gen, len(idx), c)
    pool = ref.max_pool if kind == "max" else ref.avg_pool
    out, out_idx, got_shape = pool(f, idx, list(shape), batch, case[3], case[4], case[5],
                                   case[6])
    ones = torch.ones(1, 1, *k, dtype=DTYPE)
    count = dense_conv(occupancy(idx, shape, batch), ones, None, s, p, d)
    if kind == "max":
        # -inf at inactive sites and in the padding: the dense max is the max of active inputs.
        x = densify(f, idx, shape, batch, fill=-math.inf)
        x = F.pad(x, [q for pp in reversed(p) for q in (pp, pp)], value=-math.inf)
        dense = MAX_POOL[ndim](x, k, s, 0, d)
    else:
        sums = dense_conv(densify(f, idx, shape, batch), ones.expand(c, 1, *k), None, s, p, d,
                          groups=c)
        dense = sums / count.clamp(min=1)
    expected = support_sites(count)
    return Result(out, gather(dense, expected), [f], out_idx, expected, got_shape,
                  list(dense.shape[2:]))


def run_global(kind, case) -> Result:
    batch, c, shape, empty_item = case
    gen = make_gen("global", kind, case)
    idx = random_sites(gen, batch, shape)
    if empty_item is not None:
        idx = idx[idx[:, 0] != empty_item]
    f = leaf_features(gen, len(idx), c)
    if kind == "max":
        out = ref.global_max_pool(f, idx, batch)
        dense = densify(f, idx, shape, batch, fill=-math.inf).flatten(2).amax(2)
        dense = torch.where(dense == -math.inf, torch.zeros_like(dense), dense)
    else:
        out = ref.global_avg_pool(f, idx, batch)
        sums = densify(f, idx, shape, batch).flatten(2).sum(2)
        dense = sums / occupancy(idx, shape, batch).flatten(2).sum(2).clamp(min=1)
    return Result(out, dense, [f])


# ----------------------------------------------------------------------------- cases

# (batch, c_in, c_out, spatial_shape, kernel, stride, padding, dilation)
CONV_CASES = [
    (1, 1, 1, (9,), 3, 1, 0, 1),
    (2, 3, 4, (9,), 5, 2, 2, 1),
    (3, 2, 3, (8,), 2, 3, 1, 2),
    (1, 4, 2, (7,), 1, 2, 0, 1),
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
    (1, 2, 2, (4, 3, 5), 5, 1, 0, 1),  # output shape < 1: skipped
    (1, 64, 32, (5, 5, 5), 3, 2, 1, 1),
    (2, 16, 64, (6, 6, 6), 3, 1, 0, 1),
    (2, 2, 3, (4, 5, 4, 5), 3, (1, 2, 1, 2), 1, 1),
    (1, 3, 2, (5, 4, 4, 4), (2, 3, 1, 3), 2, (0, 1, 0, 1), (2, 1, 1, 1)),
]

# (batch, c_in, c_out, spatial_shape, kernel, dilation); kernels are odd.
SUBM_CASES = [
    (1, 1, 1, (9,), 3, 1),
    (2, 3, 2, (9,), 5, 2),
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
    (2, 3, 2, (8, 9), 2, 2, 0, 1),
    (1, 2, 2, (9, 8), (3, 5), (3, 2), (2, 1), (1, 2)),
    (2, 3, 4, (7, 7, 7), 3, 2, 1, 1),
    (1, 2, 2, (8, 7, 9), (2, 3, 1), (2, 3, 1), (0, 2, 0), (2, 1, 1)),
    (2, 1, 2, (6, 6, 6), 5, 1, 2, 1),
    (1, 16, 32, (6, 6, 6), 3, 2, 1, 1),
]

# (batch, channels, spatial_shape, kernel, stride or None, padding, dilation)
POOL_CASES = [
    (2, 3, (9,), 2, None, 0, 1),
    (1, 2, (9,), 3, 2, 1, 2),
    (2, 2, (8, 7), 3, 2, 1, 1),
    (3, 1, (9, 9), (2, 3), (2, 1), (0, 1), (1, 2)),
    (1, 4, (7, 8), 5, 3, 2, 1),
    (2, 3, (6, 7, 8), 2, None, 0, 1),
    (1, 2, (7, 7, 7), 3, 2, 1, 1),
    (2, 2, (8, 7, 6), (3, 1, 2), (1, 2, 3), (1, 0, 2), (2, 1, 1)),
    (1, 64, (5, 5, 5), 3, 1, 1, 1),
]
POOL_CASES_4D = [(2, 2, (4, 5, 4, 4), (2, 3, 1, 2), (2, 1, 1, 2), (0, 1, 0, 1), 1)]

# (batch, channels, spatial_shape, batch item left without sites or None)
GLOBAL_CASES = [
    (1, 3, (9,), None),
    (3, 2, (7, 8), 1),
    (2, 5, (5, 6, 7), None),
    (3, 64, (4, 4, 4), 2),
]

RUNNERS = {
    "conv": run_conv,
    "subm": run_subm,
    "transpose": run_transpose,
    "inverse": run_inverse,
    "max_pool": lambda case: run_pool("max", case),
    "avg_pool": lambda case: run_pool("avg", case),
    "global_max": lambda case: run_global("max", case),
    "global_avg": lambda case: run_global("avg", case),
}

GRAD_CASES = [
    ("conv", CONV_CASES[5]),
    ("conv", CONV_CASES[14]),
    ("conv", CONV_CASES[22]),
    ("subm", SUBM_CASES[3]),
    ("subm", SUBM_CASES[7]),
    ("transpose", TRANSPOSE_CASES[7]),
    ("inverse", INVERSE_CASES[4]),
    ("max_pool", POOL_CASES[7]),
    ("avg_pool", POOL_CASES[7]),
    ("global_max", GLOBAL_CASES[1]),
    ("global_avg", GLOBAL_CASES[1]),
]


def case_id(case) -> str:
    return "-".join(str(v).replace(" ", "") for v in case)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_sparse_conv_matches_dense(case):
    check(run_conv(case))


@pytest.mark.parametrize("case", SUBM_CASES, ids=case_id)
def test_subm_conv_matches_dense(case):
    check(run_subm(case))


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=case_id)
def test_conv_transpose_matches_dense(case):
    check(run_transpose(case))


@pytest.mark.parametrize("case", INVERSE_CASES, ids=case_id)
def test_inverse_conv_matches_dense_transpose(case):
    check(run_inverse(case))


@pytest.mark.parametrize("case", POOL_CASES + POOL_CASES_4D, ids=case_id)
def test_avg_pool_matches_dense(case):
    check(run_pool("avg", case))


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_max_pool_matches_dense(case):
    check(run_pool("max", case))


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", GLOBAL_CASES, ids=case_id)
def test_global_pool_matches_dense(kind, case):
    check(run_global(kind, case))


@pytest.mark.parametrize("op, case", GRAD_CASES,
                         ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_gradients_match_dense(op, case):
    res = RUNNERS[op](case)
    upstream = randn(make_gen("grad", op, case), *res.sparse.shape)
    got = torch.autograd.grad((res.sparse * upstream).sum(), res.leaves)
    want = torch.autograd.grad((res.dense * upstream).sum(), res.leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_kernel_offsets_are_row_major():
    assert ref.kernel_offsets((2, 3)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert ref.kernel_offsets(2) == [(0,), (1,)]


def test_kernel_pairs_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        ref.kernel_pairs(torch.zeros(1, 2, dtype=torch.int32), [3], 3, 1, 0, 1, "dense")


def test_any_integer_dtype_and_layout_give_same_result():
    gen = make_gen("layout")
    idx = random_sites(gen, 2, (6, 7, 5))
    f = randn(gen, len(idx), 3)
    w = randn(gen, 4, 3, 2, 3, 3)
    base = ref.sparse_conv(f, idx, [6, 7, 5], 2, w, 2, 1, 1)
    # int64 indices with a non-contiguous layout, non-contiguous features and weight.
    idx64 = torch.cat([idx.long(), idx.long()], 1)[:, : idx.shape[1]]
    f_nc = f.t().contiguous().t()
    w_nc = w.permute(4, 1, 2, 3, 0).contiguous().permute(4, 1, 2, 3, 0)
    assert not (idx64.is_contiguous() or f_nc.is_contiguous() or w_nc.is_contiguous())
    other = ref.sparse_conv(f_nc, idx64, (6, 7, 5), 2, w_nc, (2, 2, 2), [1, 1, 1], 1)
    assert other[1].dtype == torch.int32
    assert torch.equal(base[1], other[1]) and base[2] == other[2]
    torch.testing.assert_close(base[0], other[0], **TOL)
    assert ref.subm_conv(f, idx64, [6, 7, 5], randn(gen, 2, 3, 3, 3, 3)).shape == (len(idx), 2)
