"""Bitwise-identical results with 1 and 2 intra-op threads.

Inputs are large enough (20k sites, 32 channels) that every parallel loop of the C++ kernels
is split between both threads (the largest grain is 2048 rows, and the weight gradient splits
over the kernel offsets and, for kernels of few offsets, row segments). The thread count is
restored after each run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import distinct_values, kio_weight, make_gen, num_threads, randn, random_sites

from spconv_lite import PointToVoxel, ops

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


def pooling_map(idx):
    """Kernel 2, stride 2: 8 offsets, whose weight gradient also splits its rows."""
    return ops.build_conv_map(idx, SHAPE, BATCH, (20, 20, 20), (2, 2, 2), (2, 2, 2), (0, 0, 0),
                              (1, 1, 1))


def identity_map(idx):
    """One offset (a 1x1 layer): the weight gradient is summed over row segments only."""
    table = torch.arange(len(idx), dtype=torch.int32).unsqueeze(1)
    return table, table


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
    if name == "k2_conv":
        return conv_outputs(features, weight[:, :2, :2, :2], *pooling_map(idx)[1:], name)
    if name == "1x1_conv":
        return conv_outputs(features, weight[:, :1, :1, :1], *identity_map(idx), name)
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
         "transposed_conv", "k2_conv", "1x1_conv", "max_pool", "max_pool_with_ties", "sum_pool"]


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


@pytest.mark.parametrize("name, make_map", [("k2_conv", pooling_map), ("1x1_conv", identity_map),
                                            ("subm_conv", subm_map)])
def test_weight_gradient_over_row_segments_matches_float64(name, make_map):
    """Kernels of few offsets sum their weight gradient over row segments (20k rows: 4 of
    them here for a 1x1 layer, 2 for kernel 2), which must add up to every pair once."""
    _, idx, features = data()
    nbr = make_map(idx)[-2]
    upstream = randn(make_gen("upstream", name), len(nbr), CHANNELS, dtype=torch.float32)
    got = torch.ops.spconv_lite.sparse_conv_weight_grad(features, upstream, nbr)
    expected = torch.zeros(nbr.shape[1], CHANNELS, CHANNELS, dtype=torch.float64)
    for k in range(nbr.shape[1]):
        rows = (nbr[:, k] >= 0).nonzero().squeeze(1)
        inputs = features.double()[nbr[rows, k].long()]
        expected[k] = inputs.t() @ upstream.double()[rows]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- voxel means
# The voxelizer's means are sums in float64 in slot order (empty_mean) and in input order
# (generate_voxel_mean) whatever the thread count. Above 2^20 points its passes split the
# voxels between threads. Each voxel here holds the feature values 2^60, -2^60, v in input
# order: its mean is v / 3 only when summed in that order (another order gives 0), which
# LiDAR intensities (a few small values per voxel) cannot show. A fifth column holds 1, 2^-24,
# 2^-24: their float64 sum is 1 + 2^-23, a float32 sum (1 + 2^-24 rounds to 1) is 1.

MEAN_GRID = (128, 128, 32)  # x, y, z cells of 1 unit
MEAN_VOXELS = 350_000  # three points each: 1.05M points
MEAN_SLOTS = 5  # two free slots per voxel, filled with the mean under empty_mean


@pytest.fixture(scope="module")
def ordered_sum_cloud():
    rng = np.random.default_rng(20240607)
    cells = rng.choice(np.prod(MEAN_GRID), MEAN_VOXELS, replace=False)  # first-seen order
    x, rest = np.divmod(cells, MEAN_GRID[1] * MEAN_GRID[2])
    y, z = np.divmod(rest, MEAN_GRID[2])
    corner = np.stack([x, y, z], axis=1).astype(np.float32)
    small = rng.uniform(1.0, 2.0, MEAN_VOXELS).astype(np.float32)
    big = np.full(MEAN_VOXELS, 2.0**60, dtype=np.float32)
    # Point j of every voxel comes after point j - 1 of every voxel.
    tiny = np.full(MEAN_VOXELS, 2.0**-24, dtype=np.float32)
    rounds = [np.concatenate([corner + rng.uniform(0.05, 0.95, (MEAN_VOXELS, 3)).astype(
        np.float32), feature[:, None], last[:, None]], axis=1)
        for feature, last in ((big, np.ones_like(tiny)), (-big, tiny), (small, tiny))]
    points = np.concatenate(rounds)
    assert len(points) > 2**20
    first, second, third = (part.astype(np.float64) for part in rounds)
    mean = torch.from_numpy((((first + second) + third) / 3).astype(np.float32))
    assert torch.equal(mean[:, 3], torch.from_numpy((small.astype(np.float64) / 3).astype(
        np.float32)))
    assert (mean[:, 4] == np.float32((1 + 2.0**-23) / 3)).all()
    coords = torch.from_numpy(np.stack([z, y, x], axis=1).astype(np.int32))
    ids = torch.arange(MEAN_VOXELS).repeat(3)
    stored = torch.from_numpy(np.stack(rounds, axis=1))
    return torch.from_numpy(points), stored, mean, coords, ids


def mean_voxelizer():
    return PointToVoxel([1.0, 1.0, 1.0], [0, 0, 0, *MEAN_GRID], 5, MEAN_VOXELS, MEAN_SLOTS)


@pytest.mark.parametrize("threads", [1, 2])
def test_empty_mean_sums_each_voxel_in_slot_order(ordered_sum_cloud, threads):
    points, stored, mean, coords, ids = ordered_sum_cloud
    with num_threads(threads):
        voxels, out_coords, num, out_ids = mean_voxelizer().generate_voxel_with_id(
            points, empty_mean=True)
    assert torch.equal(out_coords, coords) and torch.equal(out_ids, ids) and (num == 3).all()
    assert torch.equal(voxels[:, :3], stored)
    wrong = (voxels[:, 3:] != mean[:, None]).any(dim=2).any(dim=1).nonzero().flatten()
    assert wrong.numel() == 0, f"{wrong.numel()} voxels with wrong free slots: {wrong[:5]}"


@pytest.mark.parametrize("threads", [1, 2])
def test_voxel_mean_sums_each_voxel_in_input_order(ordered_sum_cloud, threads):
    points, _, mean, coords, ids = ordered_sum_cloud
    with num_threads(threads):
        features, out_coords, num, out_ids = mean_voxelizer().generate_voxel_mean(points)
    assert torch.equal(out_coords, coords) and torch.equal(out_ids, ids) and (num == 3).all()
    wrong = (features != mean).any(dim=1).nonzero().flatten()
    assert wrong.numel() == 0, f"{wrong.numel()} voxels with a wrong mean: {wrong[:5]}"
