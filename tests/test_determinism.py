"""Bitwise-identical results with 1 and 2 intra-op threads.

Inputs are large enough (20k sites, 32 channels) that every parallel loop of the C++ kernels
is split between both threads (the largest grain is 2048 rows, and the weight gradient splits
over the 27 kernel offsets). The thread count is restored after each run.
"""

from __future__ import annotations

import pytest
import torch
from helpers import distinct_values, kio_weight, make_gen, num_threads, randn, random_sites

from spconv_lite import ops

SHAPE = (40, 40, 40)
BATCH = 2
SITES = 20_000
CHANNELS = 32


def data():
    gen = make_gen("determinism")
    idx = random_sites(gen, BATCH, SHAPE, count=SITES)
    features = randn(gen, SITES, CHANNELS, dtype=torch.float32)
    return gen, idx, features


def subm_map(idx):
    return ops.build_subm_map(idx, SHAPE, BATCH, (3, 3, 3), (1, 1, 1))


def conv_map(idx):
    return ops.build_conv_map(idx, SHAPE, BATCH, (20, 20, 20), (3, 3, 3), (2, 2, 2), (1, 1, 1),
                              (1, 1, 1))


def transpose_map(idx):
    return ops.build_conv_map(idx, SHAPE, BATCH, (81, 81, 81), (3, 3, 3), (2, 2, 2), (0, 0, 0),
                              (1, 1, 1), True)


def conv_outputs(features, weight, nbr, nbr_t, key):
    """Forward, input gradient and weight gradient of one sparse conv."""
    features = features.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    out = ops.sparse_conv(features, kio_weight(weight), nbr, nbr_t)
    upstream = randn(make_gen("upstream", key), *out.shape, dtype=out.dtype)
    grad_f, grad_w = torch.autograd.grad(out, (features, weight), upstream)
    return [out, grad_f, grad_w]


def pool_outputs(features, nbr, nbr_t, pool, key):
    features = features.clone().requires_grad_()
    out = pool(features, nbr, nbr_t)
    upstream = randn(make_gen("upstream", key), *out.shape, dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, features, upstream)
    return [out, grad]


def run_case(name):
    """Every tensor a computation produces, in a fixed order."""
    gen, idx, features = data()
    weight = randn(gen, CHANNELS, 3, 3, 3, CHANNELS, dtype=torch.float32, scale=0.03)
    if name == "subm_map":
        return list(subm_map(idx))
    if name == "conv_map":
        return list(conv_map(idx))
    if name == "transpose_map":
        return list(transpose_map(idx))
    if name == "subm_conv":
        return conv_outputs(features, weight, *subm_map(idx), name)
    if name == "strided_conv":
        return conv_outputs(features, weight, *conv_map(idx)[1:], name)
    if name == "transposed_conv":
        return conv_outputs(features, weight, *transpose_map(idx)[1:], name)
    if name == "max_pool":
        # Distinct values: the result does not even depend on the order ties are broken in.
        values = distinct_values(gen, SITES, CHANNELS, dtype=torch.float32)
        return pool_outputs(values, *conv_map(idx)[1:], ops.sparse_max_pool, name)
    if name == "max_pool_with_ties":
        # Few distinct values: many ties, which must still be broken the same way.
        values = torch.randint(0, 4, (SITES, CHANNELS), generator=gen).float()
        return pool_outputs(values, *conv_map(idx)[1:], ops.sparse_max_pool, name)
    if name == "sum_pool":
        return pool_outputs(features, *conv_map(idx)[1:], ops.sparse_sum_pool, name)
    raise AssertionError(name)


CASES = ["subm_map", "conv_map", "transpose_map", "subm_conv", "strided_conv",
         "transposed_conv", "max_pool", "max_pool_with_ties", "sum_pool"]


@pytest.mark.parametrize("name", CASES)
def test_one_and_two_threads_give_identical_bits(name):
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
        single = run_case(name)
    with num_threads(2):
        assert torch.get_num_threads() == 2
        double = run_case(name)
    assert torch.get_num_threads() == before
    assert len(single) == len(double)
    for a, b in zip(single, double):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
