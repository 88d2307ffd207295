"""torch.autocast (mixed precision, as OpenPCDet's, mmdetection3d's and Pointcept's training
loops use it): convolutions run in the region's lower precision, as torch's own convolutions
and spconv's do, and accept features that an earlier autocast op returned in that precision.

On the CPU autocast's dtype is bfloat16; tests/test_cuda_parity.py runs the CUDA side (float16).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, make_gen, randn, random_sites, sparse_tensor

import spconv_lite as sp
from spconv_lite import ops

SHAPE = [9, 8, 7]


def make_input(device, key, dtype=torch.float32, count=150):
    gen = make_gen("autocast", key)
    idx = random_sites(gen, 2, SHAPE, count=count)
    return sparse_tensor(randn(gen, count, 4, dtype=dtype), idx, SHAPE, 2, device)


def autocast_dtype(device):
    return torch.get_autocast_dtype(device)


LAYERS = {
    "subm": lambda: sp.SubMConv3d(4, 6, 3, bias=True, indice_key="s"),
    "conv": lambda: sp.SparseConv3d(4, 6, 3, stride=2, padding=1, bias=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["subm", "conv"])
def test_conv_runs_in_the_autocast_dtype(kind, device):
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(device)
    x = make_input(device, kind)
    low = autocast_dtype(device)
    with torch.autocast(device, dtype=low):
        got = layer(x)
    assert got.features.dtype == low and layer.weight.dtype == torch.float32
    # The same conv on the features and weights cast beforehand, outside autocast.
    cast_layer = LAYERS[kind]().to(device)
    cast_layer.load_state_dict(layer.state_dict())
    want = cast_layer.to(low)(x.replace_feature(x.features.to(low)))
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.features, want.features)


@pytest.mark.parametrize("device", DEVICES)
def test_features_from_an_autocast_op(device):
    # A linear embedding under autocast returns lower-precision features; the float32 conv
    # after it must take them (it raised a dtype mismatch before).
    torch.manual_seed(0)
    embed = torch.nn.Linear(4, 4).to(device)
    # (No bias before the BatchNorm, which cancels it: its gradient would be rounding noise.)
    net = sp.SparseSequential(sp.SubMConv3d(4, 8, 3, bias=False, indice_key="a"),
                              torch.nn.BatchNorm1d(8),
                              torch.nn.ReLU(), sp.SparseMaxPool3d(2, 2),
                              sp.SubMConv3d(8, 8, 3)).to(device)
    x = make_input(device, "embedded")
    with torch.autocast(device, dtype=autocast_dtype(device)):
        y = net(x.replace_feature(embed(x.features)))
        loss = y.features.float().square().sum()
    loss.backward()
    assert y.features.dtype == autocast_dtype(device)
    # Float32 gradients for the float32 parameters, close to a float32 run's (bfloat16 keeps 8
    # bits: a few percent of the gradient's norm).
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    y32 = net(x.replace_feature(embed(x.features)))
    y32.features.square().sum().backward()
    for got, p in zip(grads, net.parameters()):
        assert got.dtype == torch.float32
        assert (got - p.grad).norm() <= 0.05 * p.grad.norm()


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_not_cast(device):
    # As torch's autocast leaves float64 alone.
    torch.manual_seed(0)
    layer = sp.SubMConv3d(4, 6, 3).to(device, torch.float64)
    x = make_input(device, "double", dtype=torch.float64)
    want = layer(x).features
    with torch.autocast(device, dtype=autocast_dtype(device)):
        got = layer(x).features
    assert got.dtype == torch.float64
    assert torch.equal(got, want)


def test_the_op_casts_and_outside_autocast_mismatches_raise():
    gen = make_gen("autocast_op")
    idx = random_sites(gen, 1, SHAPE, count=60)
    features = randn(gen, 60, 4, dtype=torch.bfloat16)
    weight = randn(gen, 27, 4, 6, dtype=torch.float32)
    nbr, nbr_t = ops.build_subm_map(idx, SHAPE, 1, [3, 3, 3], [1, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.sparse_conv(features, weight, nbr, nbr_t)
    assert torch.equal(got, ops.sparse_conv(features, weight.to(torch.bfloat16), nbr, nbr_t))
    with pytest.raises(TypeError, match="weight dtype Float must match features dtype"):
        ops.sparse_conv(features, weight, nbr, nbr_t)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_under_autocast(device):
    torch.manual_seed(0)
    conv = sp.SubMConv3d(4, 6, 3, bias=True).to(device)
    x = make_input(device, "compiled")

    def run(features, indices):
        with torch.autocast(device, dtype=autocast_dtype(device)):
            return conv(sp.SparseConvTensor(features, indices, SHAPE, 2)).features

    eager = run(x.features, x.indices)
    compiled = torch.compile(run, fullgraph=True)(x.features, x.indices)
    assert compiled.dtype == eager.dtype == autocast_dtype(device)
    # Inductor may add the bias in float32 before rounding: one rounding step apart at most.
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-2, atol=1e-2)
