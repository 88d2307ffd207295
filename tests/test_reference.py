"""Checks the pure-PyTorch reference (spconv_lite/reference.py) against dense PyTorch.

Every op is compared, in float64, with its dense counterpart on random sparse inputs:
output sites must equal the dense output's support (computed exactly from an occupancy mask
convolved with a ones kernel) in sorted order, and values must match at those sites.
"""

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch
from cases import (
    CONV_CASES,
    DENSE_CASES,
    GLOBAL_CASES,
    INVERSE_CASES,
    POOL_CASES,
    POOL_CASES_4D,
    SUBM_CASES,
    TRANSPOSE_CASES,
    op_cases,
)
from helpers import (
    CONV_T,
    TOL,
    DenseRun,
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
    gather,
    is_1x1,
    make_gen,
    ntuple,
    randn,
    random_sites,
    skip_if_empty,
    transpose_shape,
    transpose_support,
)
from torch import Tensor


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

TOL64 = TOL[torch.float64]


def leaf_features(gen, n, channels) -> Tensor:
    # Transposed storage: the reference must cope with non-contiguous features.
    return randn(gen, channels, n).t().requires_grad_()


def conv_params(gen, c_out, k, c_in) -> tuple[Tensor, Tensor]:
    """Leaf weight ``[C_out, *k, C_in]`` and bias ``[C_out]``."""
    return randn(gen, c_out, *k, c_in).requires_grad_(), randn(gen, c_out).requires_grad_()


def conv_inputs(op, case, batch, shape, c_in, c_out, k):
    """Seeded sites, leaf features, weight and bias of a conv case."""
    gen, idx = case_sites(batch, shape, op, case)
    f = leaf_features(gen, len(idx), c_in)
    return (idx, f, *conv_params(gen, c_out, k, c_in))


# ----------------------------------------------------------------------------- runners

def run_conv(case) -> DenseRun:
    batch, c_in, c_out, shape, k, s, p, d = case
    k, s, p, d = conv_geometry(shape, k, s, p, d)
    idx, f, w, bias = conv_inputs("conv", case, batch, shape, c_in, c_out, k)
    out, out_idx, got_shape = ref.sparse_conv(f, idx, list(shape), batch, w, s, p, d, bias)
    dense = dense_conv(densify(f, idx, shape, batch), conv_weight(w, is_1x1(k, s)), bias, s, p,
                       d)
    expected = conv_support(idx, shape, batch, k, s, p, d)
    return DenseRun(out, gather(dense, expected), [f, w, bias], out_idx, expected, got_shape,
                    list(dense.shape[2:]))


def run_subm(case) -> DenseRun:
    batch, c_in, c_out, shape, k, d = case
    ndim = len(shape)
    k, d = ntuple(k, ndim), ntuple(d, ndim)
    idx, f, w, bias = conv_inputs("subm", case, batch, shape, c_in, c_out, k)
    out = ref.subm_conv(f, idx, list(shape), w, d, bias)
    pad = [dd * (kk - 1) // 2 for kk, dd in zip(k, d)]
    dense = dense_conv(densify(f, idx, shape, batch), conv_weight(w, is_1x1(k, subm=True)), bias,
                       1, pad, d)
    return DenseRun(out, gather(dense, idx), [f, w, bias])


def run_transpose(case) -> DenseRun:
    batch, c_in, c_out, shape, k, s, p, d, op = case
    ndim = len(shape)
    k, s, p, d, op = (ntuple(v, ndim) for v in (k, s, p, d, op))
    skip_if_empty(transpose_shape(shape, k, s, p, d, op))
    idx, f, w, bias = conv_inputs("transpose", case, batch, shape, c_in, c_out, k)
    out, out_idx, got_shape = ref.sparse_conv_transpose(f, idx, list(shape), batch, w, s, p, d,
                                                        op, bias)
    dense = CONV_T[ndim](densify(f, idx, shape, batch), conv_t_weight(w, is_1x1(k, s)), bias, s,
                         p, op, 1, d)
    expected = transpose_support(idx, shape, batch, k, s, p, d, op)
    return DenseRun(out, gather(dense, expected), [f, w, bias], out_idx, expected, got_shape,
                    list(dense.shape[2:]))


def run_inverse(case) -> DenseRun:
    """Inverse conv = dense conv_transpose of the strided conv's output, at its input sites."""
    batch, c_in, c_out, shape, k, s, p, d = case
    k, s, p, d = conv_geometry(shape, k, s, p, d)
    mid_shape = conv_shape(shape, k, s, p, d)
    gen, idx = case_sites(batch, shape, "inverse", case)
    mid_idx = conv_support(idx, shape, batch, k, s, p, d)
    mid_idx = mid_idx[torch.randperm(len(mid_idx), generator=gen)]  # any row order is allowed
    g = leaf_features(gen, len(mid_idx), c_in)
    w, bias = conv_params(gen, c_out, k, c_in)
    out = ref.sparse_inverse_conv(g, mid_idx, mid_shape, batch, w, idx, list(shape), s, p, d,
                                  bias)
    dense = dense_inverse_conv(g, mid_idx, mid_shape, shape, batch, w, bias, k, s, p, d)
    return DenseRun(out, gather(dense, idx), [g, w, bias])


def run_pool(kind, case) -> DenseRun:
    batch, c, shape, k, s, p, d = case
    k, s, p, d = conv_geometry(shape, k, s, p, d)
    gen, idx = case_sites(batch, shape, kind, case)
    f = leaf_features(gen, len(idx), c)
    pool = ref.max_pool if kind == "max" else ref.avg_pool
    # The reference gets the case's kernel, stride (or None), padding and dilation as they are.
    out, out_idx, got_shape = pool(f, idx, list(shape), batch, *case[3:])
    dense_pool = dense_max_pool if kind == "max" else dense_avg_pool
    dense = dense_pool(f, idx, shape, batch, k, s, p, d)
    expected = conv_support(idx, shape, batch, k, s, p, d)
    return DenseRun(out, gather(dense, expected), [f], out_idx, expected, got_shape,
                    list(dense.shape[2:]))


def run_global(kind, case) -> DenseRun:
    batch, c, shape, empty_item = case
    gen, idx = case_sites(batch, shape, "global", kind, case)
    if empty_item is not None:
        idx = idx[idx[:, 0] != empty_item]
    f = leaf_features(gen, len(idx), c)
    pool = ref.global_max_pool if kind == "max" else ref.global_avg_pool
    return DenseRun(pool(f, idx, batch), dense_global_pool(kind, f, idx, shape, batch), [f])


RUNNERS = {
    "conv": run_conv,
    "subm": run_subm,
    "transpose": run_transpose,
    "inverse": run_inverse,
    "max_pool": partial(run_pool, "max"),
    "avg_pool": partial(run_pool, "avg"),
    "global_max": partial(run_global, "max"),
    "global_avg": partial(run_global, "avg"),
}

# ----------------------------------------------------------------------------- cases
# The shared tables (cases.py), plus 4D average pooling, which has a dense counterpart here.

CASES = op_cases({**DENSE_CASES, "avg_pool": POOL_CASES + POOL_CASES_4D})

GRAD_CASES = op_cases({
    "conv": [CONV_CASES[9], CONV_CASES[18], CONV_CASES[27]],
    "subm": [SUBM_CASES[5], SUBM_CASES[9]],
    "transpose": [TRANSPOSE_CASES[8]],
    "inverse": [INVERSE_CASES[5]],
    "max_pool": [POOL_CASES[8]],
    "avg_pool": [POOL_CASES[8]],
    "global_max": [GLOBAL_CASES[1]],
    "global_avg": [GLOBAL_CASES[1]],
})


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("op, case", CASES)
def test_matches_dense(op, case):
    check_values(RUNNERS[op](case))


@pytest.mark.parametrize("op, case", GRAD_CASES)
def test_gradients_match_dense(op, case):
    check_gradients(RUNNERS[op](case), torch.float64, "grad", op, case)


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
    torch.testing.assert_close(base[0], other[0], **TOL64)
    assert ref.subm_conv(f, idx64, [6, 7, 5], randn(gen, 2, 3, 3, 3, 3)).shape == (len(idx), 2)
