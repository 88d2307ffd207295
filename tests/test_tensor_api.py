"""SparseConvTensor and module API: dense() in both layouts, from_dense round trips,
replace_feature sharing the kernel-map cache, accepted spatial_shape / batch_size types, bias
in train and eval mode, state_dict round trips and the spconv weight layout."""

from __future__ import annotations

import copy
import dataclasses
import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import (
    case_id,
    densify,
    init_layer,
    layer_class,
    make_gen,
    randn,
    random_sites,
    sparse_tensor,
)
from torch import nn

import spconv_lite as sp

SHAPES = [(7,), (5, 6), (4, 5, 6), (3, 4, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_dense_in_both_layouts(shape):
    gen = make_gen("dense", shape)
    idx = random_sites(gen, 2, shape, density=0.4)
    f = randn(gen, len(idx), 3).requires_grad_()
    x = sparse_tensor(f, idx, shape, 2)
    first = x.dense()
    last = x.dense(channels_first=False)
    assert first.shape == (2, 3, *shape) and last.shape == (2, *shape, 3)
    assert first.is_contiguous()
    assert torch.equal(first, densify(f, idx, shape, 2))
    assert torch.equal(last, first.movedim(1, -1))
    # Zero away from the active sites; the features themselves at them.
    assert torch.equal(last[tuple(idx.long().t())], f)
    assert int((last != 0).any(-1).sum()) == len(idx)
    (first * torch.arange(first.numel()).reshape(first.shape)).sum().backward()
    assert f.grad is not None and f.grad.shape == f.shape


@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_from_dense_round_trip(shape):
    gen = make_gen("from_dense", shape)
    idx = random_sites(gen, 3, shape, density=0.3)
    f = randn(gen, len(idx), 4)
    f[0, :3] = 0  # a site with some zero channels stays active
    dense = densify(f, idx, shape, 3).movedim(1, -1).contiguous()  # channels last
    x = sp.SparseConvTensor.from_dense(dense)
    assert x.spatial_shape == list(shape) and isinstance(x.spatial_shape, list)
    assert x.batch_size == 3 and isinstance(x.batch_size, int)
    assert x.indices.dtype == torch.int32 and x.indices.shape == (len(idx), len(shape) + 1)
    # Sites come back sorted; as a set they are the original ones.
    order = np.lexsort(idx.numpy().T[::-1])
    assert torch.equal(x.indices, idx[torch.from_numpy(order)])
    assert torch.equal(x.features, f[torch.from_numpy(order)])
    assert torch.equal(x.dense(channels_first=False), dense)
    # ... and it feeds a layer like any other tensor.
    out = layer_class("subm", len(shape))(4, 2, 3).double()(x)
    assert out.features.shape == (len(idx), 2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_features_scatter_into_dense(dtype):
    """As in spconv: per-site labels or counts made dense (a layer still needs floats)."""
    gen = make_gen("integer features")
    shape = (5, 6, 7)
    idx = random_sites(gen, 2, shape, count=30)
    values = torch.randint(0, 2 if dtype == torch.bool else 100, (30, 2), generator=gen)
    labels = values.to(dtype)
    x = sp.SparseConvTensor(labels, idx, list(shape), 2)
    expected = torch.zeros(2, *shape, 2, dtype=dtype)
    expected[tuple(idx.long().t())] = labels
    assert torch.equal(x.dense(channels_first=False), expected)
    assert torch.equal(x.dense(), expected.movedim(-1, 1))
    back = sp.SparseConvTensor.from_dense(expected)
    assert back.features.dtype == dtype
    assert torch.equal(back.dense(channels_first=False), expected)
    floats = sp.SparseConvTensor(torch.ones(30, 2), idx, list(shape), 2)
    assert torch.equal(floats.replace_feature(labels).dense(), expected.movedim(-1, 1))


def test_replace_feature_shares_indice_dict():
    gen = make_gen("replace")
    idx = random_sites(gen, 2, (6, 6, 6), count=50)
    x = sparse_tensor(randn(gen, 50, 3), idx, (6, 6, 6), 2)
    new = randn(gen, 50, 5)
    y = x.replace_feature(new)
    assert y is not x and y.features is new and x.features.shape == (50, 3)
    assert y.indices is x.indices and y.spatial_shape == x.spatial_shape
    assert y.batch_size == x.batch_size and y.indice_dict is x.indice_dict
    # A layer's output carries a copy of its input's maps with its own added; the input's dict
    # is left as it was (as in spconv), and the maps pass on through replace_feature.
    out = sp.SubMConv3d(5, 4, 3, indice_key="s").double()(y)
    assert x.indice_dict == {} and list(out.indice_dict) == ["s"]
    cached = out.find_indice_pair("s")
    out2 = sp.SubMConv3d(4, 4, 3, indice_key="s").double()(out.replace_feature(out.features))
    assert out2.find_indice_pair("s") is cached
    assert x.find_indice_pair("missing") is None and x.find_indice_pair(None) is None
    # Another row count is accepted until the tensor is used (indices may be assigned next).
    wrong = x.replace_feature(torch.randn(7, 3))
    with pytest.raises(ValueError, match="features has 7 rows but indices has 50"):
        sp.SubMConv3d(3, 4, 3)(wrong)


def test_shadow_copy_add_and_spatial_size():
    gen = make_gen("shadow")
    idx = random_sites(gen, 1, (4, 5, 6), count=20)
    x = sparse_tensor(randn(gen, 20, 3), idx, (4, 5, 6), 1)
    c = x.shadow_copy()
    assert c.features is x.features and c.indice_dict is x.indice_dict
    assert x.spatial_size == 120
    s = x + x
    assert torch.equal(s.features, 2 * x.features) and s.indices is x.indices
    assert torch.equal((x + x.features).features, s.features)
    assert "SparseConvTensor" in repr(x)
    # spconv's negation and quantization fields
    m = x.minus()
    assert torch.equal(m.features, -x.features) and m.indices is x.indices
    assert m.indice_dict is x.indice_dict
    assert x.is_quantized is False and x.int8_scale is None


SPATIAL_SHAPE_FORMS = {
    "list": [6, 5, 7],
    "tuple": (6, 5, 7),
    "numpy": np.array([6, 5, 7]),
    "numpy_int32": np.array([6, 5, 7], dtype=np.int32),
    "tensor": torch.tensor([6, 5, 7]),
    "tensor_int32": torch.tensor([6, 5, 7], dtype=torch.int32),
    # whole floats, as spconv takes them (e.g. a grid size computed in floating point)
    "float_list": [6.0, 5.0, 7.0],
    "numpy_float": np.array([6.0, 5.0, 7.0]),
    "tensor_float": torch.tensor([6.0, 5.0, 7.0]),
}
BATCH_SIZE_FORMS = {"int": 2, "numpy_int": np.int64(2), "tensor": torch.tensor(2), "float": 2.0}


@pytest.mark.parametrize("batch_form", list(BATCH_SIZE_FORMS))
@pytest.mark.parametrize("shape_form", list(SPATIAL_SHAPE_FORMS))
def test_spatial_shape_and_batch_size_forms(shape_form, batch_form):
    gen = make_gen("forms")
    idx = random_sites(gen, 2, (6, 5, 7), count=60)
    f = randn(gen, 60, 3)
    x = sp.SparseConvTensor(f, idx, SPATIAL_SHAPE_FORMS[shape_form],
                            BATCH_SIZE_FORMS[batch_form])
    assert x.spatial_shape == [6, 5, 7]
    assert all(type(s) is int for s in x.spatial_shape)
    assert x.batch_size == 2 and type(x.batch_size) is int
    torch.manual_seed(0)
    layer = sp.SparseConv3d(3, 4, 3, stride=2).double()
    reference = layer(sp.SparseConvTensor(f, idx, [6, 5, 7], 2))
    out = layer(x)
    assert out.spatial_shape == reference.spatial_shape == [2, 2, 3]
    assert torch.equal(out.indices, reference.indices)
    assert torch.equal(out.features, reference.features)
    assert x.dense().shape == (2, 3, 6, 5, 7)


# (kind, ndim, kernel_size) for the weight layout check
LAYOUT_CASES = [
    ("subm", 1, 3), ("subm", 2, (3, 5)), ("subm", 3, (1, 3, 5)), ("subm", 4, 3),
    ("conv", 1, 2), ("conv", 2, (2, 3)), ("conv", 3, (3, 2, 1)), ("conv", 4, (2, 1, 2, 3)),
    ("transpose", 1, 4), ("transpose", 2, (2, 3)), ("transpose", 3, (3, 2, 1)),
    ("inverse", 1, 3), ("inverse", 2, (3, 2)), ("inverse", 3, (2, 3, 4)),
]


@pytest.mark.parametrize("kind, ndim, k", LAYOUT_CASES, ids=case_id)
def test_weight_layout_is_out_kernel_in(kind, ndim, k):
    if kind == "inverse":
        layer = layer_class(kind, ndim)(5, 7, k, indice_key="key")
    else:
        layer = layer_class(kind, ndim)(5, 7, k)
    kernel = (k,) * ndim if isinstance(k, int) else k
    assert layer.weight.shape == (7, *kernel, 5)
    assert layer.bias.shape == (7,)
    assert layer.kernel_size == tuple(kernel)
    no_bias = (layer_class(kind, ndim)(5, 7, k, indice_key="key", bias=False) if kind == "inverse"
               else layer_class(kind, ndim)(5, 7, k, bias=False))
    assert no_bias.bias is None
    assert [name for name, _ in no_bias.named_parameters()] == ["weight"]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["subm", "conv", "transpose"])
def test_bias_in_train_and_eval_mode(kind, mode):
    gen = make_gen("bias", kind)
    idx = random_sites(gen, 2, (6, 6, 6), count=70)
    x = sparse_tensor(randn(gen, 70, 3), idx, (6, 6, 6), 2)
    args = (3, 4, 3) if kind == "subm" else (3, 4, 3, 2)
    with_bias = init_layer(layer_class(kind, 3)(*args, bias=True), gen).train(mode == "train")
    without = layer_class(kind, 3)(*args, bias=False).double()
    with torch.no_grad():
        without.weight.copy_(with_bias.weight)
    out = with_bias(x)
    plain = without(x)
    assert torch.equal(out.indices, plain.indices)
    torch.testing.assert_close(out.features, plain.features + with_bias.bias, rtol=0, atol=0)
    # Train and eval give the same result (no mode-dependent behaviour in a conv).
    other = with_bias.train(mode != "train")(x)
    assert torch.equal(other.features, out.features)
    out.features.sum().backward()
    assert torch.allclose(with_bias.bias.grad,
                          torch.full((4,), float(len(out.features)), dtype=torch.float64))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    def build():
        return sp.SparseSequential(
            sp.SubMConv3d(3, 8, 3, indice_key="s"), nn.BatchNorm1d(8), nn.ReLU(),
            sp.SparseConv3d(8, 8, (3, 2, 3), stride=2, bias=False, indice_key="d"),
            sp.SparseInverseConv3d(8, 4, (3, 2, 3), indice_key="d"),
            sp.SparseMaxPool3d(2),
        )
    net = build().double()
    gen = make_gen("state_dict")
    idx = random_sites(gen, 2, (8, 8, 8), count=150)
    x = randn(gen, 150, 3)
    net.train()(sparse_tensor(x, idx, (8, 8, 8), 2))  # move BatchNorm's running stats
    net.eval()
    state = net.state_dict()
    assert state["0.weight"].shape == (8, 3, 3, 3, 3)
    assert state["3.weight"].shape == (8, 3, 2, 3, 8) and "3.bias" not in state
    assert state["4.weight"].shape == (4, 3, 2, 3, 8)
    assert "1.running_mean" in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    other = build().double().eval()
    other.load_state_dict(torch.load(buffer))
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    a = net(sparse_tensor(x, idx, (8, 8, 8), 2))
    b = other(sparse_tensor(x, idx, (8, 8, 8), 2))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.features, b.features)


def test_sparse_sequential_and_small_modules():
    gen = make_gen("sequential")
    idx = random_sites(gen, 2, (6, 6, 6), count=40)
    x = sparse_tensor(randn(gen, 40, 3), idx, (6, 6, 6), 2)
    net = sp.SparseSequential(sp.SubMConv3d(3, 4, 3, algo=sp.ConvAlgo.Native), nn.ReLU())
    net.add(sp.Identity())
    net.add(sp.ToDense(), name="dense")
    net.double()
    assert len(net) == 4 and isinstance(net[-1], sp.ToDense) and isinstance(net[1], nn.ReLU)
    dense = net(x)
    assert dense.shape == (2, 4, 6, 6, 6) and (dense >= 0).all()
    with pytest.raises(IndexError):
        net[4]
    net.add(sp.Identity(), name="dense")  # a name it has replaces that module, as spconv's
    assert len(net) == 4 and isinstance(net[-1], sp.Identity)
    named = sp.SparseSequential(OrderedDict([("1", nn.ReLU())]))
    with pytest.raises(KeyError, match="'1'"):  # the next free number is taken
        named.add(nn.ReLU())


def test_dataclass_fields_set_one_by_one_move_the_tensor():
    """Collection helpers that rebuild a dataclass by setting its fields in order (Lightning's
    move_data_to_device, on every batch) move a SparseConvTensor: the indices come before the
    features, whose setter checks that both share a device."""
    gen = make_gen("dataclass_fields")
    idx = random_sites(gen, 1, (4, 4, 4), count=5)
    x = sparse_tensor(randn(gen, 5, 3), idx, (4, 4, 4), 1)
    moved = copy.copy(x)
    for field in dataclasses.fields(x):
        value = getattr(x, field.name)
        setattr(moved, field.name, value.to("meta") if isinstance(value, torch.Tensor) else value)
    assert moved.features.device.type == moved.indices.device.type == "meta"
    replaced = dataclasses.replace(x, features=x.features * 2)
    assert replaced.indices is x.indices and torch.equal(replaced.features, x.features * 2)
