"""torch.library.opcheck of every registered operator (torch.ops.spconv_lite.*): schema,
autograd registration, fake (meta) kernel against the real one, and AOT dispatch with dynamic
shapes. All four default checks run for every op, including build_conv_map, whose number of
output rows is data dependent (its fake kernel allocates an unbacked size). Every op is checked
on each device of helpers.DEVICES.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, distinct_values, make_gen, randn, random_sites

from spconv_lite import ops

OPS = torch.ops.spconv_lite
SHAPE = [6, 5, 7]
BATCH = 2


def sites(key, count=60):
    return random_sites(make_gen("opcheck", key), BATCH, SHAPE, count=count)


def conv_map_args(idx, transposed=False):
    if transposed:
        return (idx, SHAPE, BATCH, [12, 10, 14], [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], True)
    return (idx, SHAPE, BATCH, [3, 2, 4], [3, 2, 3], [2, 2, 2], [1, 0, 1], [1, 1, 1], False)


def a_map(kind):
    """``(nbr, nbr_t)`` of a subm, regular or transposed conv over seeded sites."""
    idx = sites(kind)
    if kind == "subm":
        return ops.build_subm_map(idx, SHAPE, BATCH, [3, 3, 3], [1, 2, 1])
    return OPS.build_conv_map(*conv_map_args(idx, kind == "transposed"))[1:]


def sample(op_name, variant, device="cpu"):
    """``(op, args)`` for one op and one input variant, its tensors on ``device``."""
    op, args = _sample(op_name, variant)
    if device == "cpu":
        return op, args
    return op, tuple(a.detach().to(device).requires_grad_(a.requires_grad)
                     if isinstance(a, torch.Tensor) else a for a in args)


def _sample(op_name, variant):
    gen = make_gen("opcheck_args", op_name, variant)
    if op_name == "build_subm_map":
        idx = sites(variant, count=0 if variant == "empty" else 60)
        return OPS.build_subm_map, (idx, SHAPE, BATCH, [3, 1, 3], [1, 1, 2])
    if op_name == "build_conv_map":
        idx = sites(variant, count=0 if variant == "empty" else 60)
        return OPS.build_conv_map, conv_map_args(idx, variant == "transposed")
    if op_name in ("voxelize", "voxelize_mean"):
        # Points in a 4 x 3 x 2 m box with 1 m voxels; "empty" has no point in range.
        count = 0 if variant == "empty" else 50
        points = torch.rand(count, 4, generator=gen) * torch.tensor([4.0, 3.0, 2.0, 1.0])
        grid = ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [4, 3, 2])
        if op_name == "voxelize":
            return OPS.voxelize, (points, *grid, 3, 10, variant == "empty_mean")
        return OPS.voxelize_mean, (points, *grid, 10)
    if op_name == "conv_row_order":
        nbr = a_map(variant)[0] if variant != "empty" else torch.zeros(0, 27, dtype=torch.int32)
        return OPS.conv_row_order, (nbr, 2)
    map_kind, dtype = variant[:2]
    nbr, nbr_t = a_map(map_kind)
    n_out, volume = nbr.shape
    n_in = nbr_t.shape[0]
    if op_name == "sparse_conv":
        features = randn(gen, n_in, 3, dtype=dtype).requires_grad_()
        weight = randn(gen, volume, 3, 4, dtype=dtype).requires_grad_()
        if variant[2:] == ("row_orders",):  # the orders the CUDA kernels follow
            return OPS.sparse_conv, (features, weight, nbr, nbr_t, OPS.conv_row_order(nbr, 2),
                                     OPS.conv_row_order(nbr_t, 2))
        return OPS.sparse_conv, (features, weight, nbr, nbr_t)
    if op_name == "sparse_conv_weight_grad":
        # No autograd of its own (it is a backward kernel): plain inputs.
        return OPS.sparse_conv_weight_grad, (randn(gen, n_in, 3, dtype=dtype),
                                             randn(gen, n_out, 4, dtype=dtype), nbr)
    if op_name == "sparse_sum_pool":
        return OPS.sparse_sum_pool, (randn(gen, n_in, 5, dtype=dtype).requires_grad_(), nbr,
                                     nbr_t)
    if op_name == "sparse_max_pool":
        features = distinct_values(gen, n_in, 5, dtype=dtype).requires_grad_()
        return OPS.sparse_max_pool, (features, nbr, nbr_t)
    if op_name == "sparse_max_pool_backward":
        _, argmax = OPS.sparse_max_pool(distinct_values(gen, n_in, 5, dtype=dtype), nbr, nbr_t)
        return OPS.sparse_max_pool_backward, (randn(gen, n_out, 5, dtype=dtype), argmax, nbr_t)
    raise AssertionError(op_name)


FEATURE_VARIANTS = [("subm", torch.float64), ("conv", torch.float32),
                    ("transposed", torch.float64)]
CASES = (
    [("build_subm_map", v) for v in ["full", "empty"]]
    + [("build_conv_map", v) for v in ["conv", "transposed", "empty"]]
    + [(name, v) for name in ["sparse_conv", "sparse_conv_weight_grad", "sparse_sum_pool",
                              "sparse_max_pool", "sparse_max_pool_backward"]
       for v in FEATURE_VARIANTS]
    + [("sparse_conv", ("conv", torch.float64, "row_orders"))]
    + [("conv_row_order", v) for v in ["subm", "conv", "empty"]]
    + [("voxelize", v) for v in ["points", "empty_mean", "empty"]]
    + [("voxelize_mean", v) for v in ["points", "empty"]]
)


def variant_id(value):
    if isinstance(value, tuple):
        return "-".join(str(v).replace("torch.", "") for v in value)
    return str(value)


def test_every_registered_op_is_checked():
    # Every schema the extension defines in the spconv_lite namespace.
    registered = {schema.name.split("::")[1] for schema in torch._C._jit_get_all_schemas()
                  if schema.name.startswith("spconv_lite::")}
    assert registered == {name for name, _ in CASES}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name, variant", CASES, ids=variant_id)
def test_opcheck(op_name, variant, device):
    op, args = sample(op_name, variant, device)
    results = torch.library.opcheck(op, args)
    assert set(results) == {"test_schema", "test_autograd_registration", "test_faketensor",
                            "test_aot_dispatch_dynamic"}
    assert all(value == "SUCCESS" for value in results.values()), results
