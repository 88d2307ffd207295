"""Checkpoints: spconv weight layouts, the explicit converter, and its errors."""

from __future__ import annotations

import io
import re

import pytest
import torch
from helpers import make_gen, randn, random_sites

import spconv_lite.pytorch as spconv
from spconv_lite.checkpoint import (
    LAYOUTS,
    convert_state_dict,
    saved_shape,
    to_current_layout,
)


def _old_layout(weight: torch.Tensor, source: str) -> torch.Tensor:
    """A ``[C_out, *k, C_in]`` weight as the given spconv version saved it (the inverse of
    the converter, written independently from the layout table)."""
    ndim = weight.dim() - 2
    k = list(range(1, ndim + 1))
    if source == "spconv2.0":  # [*k, C_out, C_in]
        return weight.permute(*k, 0, ndim + 1).contiguous()
    if source == "spconv1":  # [*k, C_in, C_out]
        return weight.permute(*k, ndim + 1, 0).contiguous()
    return weight


def _small_net(seed: int = 0):
    torch.manual_seed(seed)
    return spconv.SparseSequential(
        spconv.SubMConv3d(4, 16, 3, indice_key="s1"),  # C_in != C_out
        torch.nn.BatchNorm1d(16),
        spconv.SparseConv3d(16, 16, (3, 1, 1), stride=(2, 1, 1), bias=False),  # square
    )


@pytest.mark.parametrize("source", ["spconv1", "spconv2.0", "spconv2.2", "RSCK", "RSKC", "KRSC",
                                    "spconv2.1", "spconv2.3"])
def test_convert_round_trip(source):
    net = _small_net()
    reference = net.state_dict()
    canonical = {"RSCK": "spconv1", "RSKC": "spconv2.0", "KRSC": "spconv2.2",
                 "spconv2.1": "spconv2.0", "spconv2.3": "spconv2.2"}.get(source, source)
    old = {k: (_old_layout(v, canonical) if v.dim() == 5 else v)
           for k, v in reference.items()}
    converted = convert_state_dict(old, net, source=source)
    assert converted.keys() == reference.keys()
    assert not hasattr(old, "_metadata")
    metadata = convert_state_dict(reference, net, source="spconv2.2")._metadata
    assert metadata == reference._metadata and metadata["1"]["version"] == 2  # BatchNorm's
    for key in reference:
        assert torch.equal(converted[key], reference[key]), key
    net.load_state_dict(converted)


def test_square_layer_needs_the_right_source():
    # [3, 3, 3, 16, 16] is both a spconv 1.x and a 2.0 shape; only the stated source is right.
    torch.manual_seed(0)
    net = spconv.SparseSequential(spconv.SubMConv3d(16, 16, 3, bias=False))
    weight = net[0].weight.detach().clone()
    saved = {"0.weight": _old_layout(weight, "spconv1")}
    assert torch.equal(convert_state_dict(saved, net, "spconv1")["0.weight"], weight)
    assert not torch.equal(convert_state_dict(saved, net, "spconv2.0")["0.weight"], weight)


def test_converted_model_gives_the_same_outputs():
    gen = make_gen("ckpt-model")
    indices = random_sites(gen, 2, (9, 8, 7), 0.2)
    features = randn(gen, len(indices), 4, dtype=torch.float32)
    model = _small_net().eval()
    buffer = io.BytesIO()
    torch.save({k: _old_layout(v, "spconv1") if v.dim() == 5 else v
                for k, v in model.state_dict().items()}, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=True)
    restored = _small_net(seed=1).eval()  # other initial weights, all replaced by the checkpoint
    restored.load_state_dict(convert_state_dict(old, restored, source="spconv1"))
    x = spconv.SparseConvTensor(features, indices, [9, 8, 7], 2)
    with torch.no_grad():
        assert torch.equal(model(x).features, restored(x).features)


def test_shape_fitting_no_layout_names_parameter_and_shapes():
    net = _small_net()
    bad = dict(net.state_dict())
    bad["0.weight"] = torch.zeros(16, 3, 3, 3, 5)
    with pytest.raises(ValueError) as info:
        convert_state_dict(bad, net, source="spconv2.2")
    message = str(info.value)
    assert "0.weight" in message
    assert "[16, 3, 3, 3, 5]" in message  # the checkpoint's shape
    assert "[16, 3, 3, 3, 4]" in message  # the expected shape
    assert "fits no known spconv layout" in message


def test_shape_of_another_layout_is_named():
    net = _small_net()
    old = dict(net.state_dict())
    old["0.weight"] = _old_layout(old["0.weight"], "spconv1")
    with pytest.raises(ValueError, match=r"0\.weight.*\[3, 3, 3, 4, 16\].*fits the spconv1 layout"):
        convert_state_dict(old, net, source="spconv2.0")


def test_load_state_dict_error_hints_at_the_converter():
    net = _small_net()
    old = dict(net.state_dict())
    old["0.weight"] = _old_layout(old["0.weight"], "spconv2.0")
    hint = r"0\.weight.*fits the spconv2\.0 layout.*convert_state_dict"
    with pytest.raises(RuntimeError, match=hint):
        net.load_state_dict(old)
    old["0.weight"] = torch.zeros(7, 7)
    with pytest.raises(RuntimeError, match=r"\[7, 7\].*\[16, 3, 3, 3, 4\].*fits no known"):
        net.load_state_dict(old)


def test_load_state_dict_hints_at_torchs_conv_layout():
    """A weight in nn.Conv3d's [C_out, C_in, *k] layout gets the permutation to apply, as an
    assignment of it does, and the permuted weight loads."""
    net = _small_net()
    state = dict(net.state_dict())
    weight = state["0.weight"]
    state["0.weight"] = weight.permute(0, 4, 1, 2, 3)  # [16, 4, 3, 3, 3]
    fix = "state_dict['0.weight'].permute(0, 2, 3, 4, 1)"
    with pytest.raises(RuntimeError, match=re.escape(f"nn.Conv3d layout [C_out, C_in, "
                                                     f"*kernel_size]: load {fix} instead")):
        net.load_state_dict(state)
    state["0.weight"] = eval(fix, {"state_dict": state})
    net.load_state_dict(state)
    assert torch.equal(net[0].weight, weight)


@pytest.mark.parametrize("square_first", [True, False], ids=["square_first", "square_last"])
@pytest.mark.parametrize("source", ["spconv1", "spconv2.0"])
def test_load_state_dict_hints_name_one_source(source, square_first):
    """A square layer's shape fits spconv 1.x and 2.0 alike: every hint of the load names the
    source the other layer's shape tells, whichever layer comes first."""
    torch.manual_seed(0)
    layers = [spconv.SubMConv3d(16, 16, 3, bias=False), spconv.SubMConv3d(4, 16, 3, bias=False)]
    net = spconv.SparseSequential(*(layers if square_first else layers[::-1]))
    old = {k: _old_layout(v, source) for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict(old)
    named = re.findall(r"source='([^']*)'", str(info.value))
    assert named == [source, source], str(info.value)


def test_load_state_dict_hint_of_square_layers_names_both_sources():
    torch.manual_seed(0)
    net = spconv.SparseSequential(spconv.SubMConv3d(16, 16, 3, bias=False),
                                  spconv.SparseConv3d(16, 16, (3, 1, 1), bias=False))
    old = {k: _old_layout(v, "spconv1") for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict(old)
    message = str(info.value)
    assert message.count("source is 'spconv2.0' or 'spconv1', whichever spconv version") == 2
    assert "source='" not in message


def test_unknown_source():
    with pytest.raises(ValueError, match="source must be one of"):
        convert_state_dict({}, _small_net(), source="spconv3")


def test_other_entries_untouched():
    net = _small_net()
    state = dict(net.state_dict())
    state["head.weight"] = torch.ones(2, 3)
    out = convert_state_dict(state, net, source="spconv2.2")
    assert out["head.weight"] is state["head.weight"]
    assert out["0.bias"] is state["0.bias"]


@pytest.mark.parametrize("source", sorted(LAYOUTS))
def test_saved_shape_table(source):
    weight = torch.zeros(7, 3, 5, 2)  # C_out 7, kernel (3, 5), C_in 2
    old = _old_layout(weight, source)
    assert list(old.shape) == saved_shape(source, 7, (3, 5), 2)
    assert to_current_layout(old, source).shape == weight.shape


# Kernel-volume-1 layers and what each spconv version computed with the saved weight `w`:
# a 1x1 layer (submanifold, or not strided) `features @ w.view(C_in, C_out)` in every version
# (spconv 1.x's layout puts C_in before C_out; 2.x reads its [.., C_out, .., C_in] shapes the
# same way), a strided one the matrix its layout names (1.x: w[0, 0, 0] is [C_in, C_out]).
KERNEL1_CASES = [
    ("subm", "spconv1"), ("subm", "spconv2.0"), ("subm", "spconv2.2"),
    ("conv", "spconv1"), ("conv", "spconv2.0"), ("strided", "spconv1"),
]


@pytest.mark.parametrize("kind,source", KERNEL1_CASES)
def test_kernel1_weights_convert_to_what_spconv_computed(kind, source):
    layer = {"subm": lambda: spconv.SubMConv3d(3, 5, 1, bias=False),
             "conv": lambda: spconv.SparseConv3d(3, 5, 1, bias=False),
             "strided": lambda: spconv.SparseConv3d(3, 5, 1, stride=2, bias=False)}[kind]()
    gen = make_gen("kernel1", kind, source)
    matrix = randn(gen, 3, 5, dtype=torch.float32)  # [C_in, C_out], as spconv applied it
    if kind == "strided":  # read through the layout: [1, 1, 1, C_in, C_out] in spconv 1.x
        saved = matrix.reshape(1, 1, 1, 3, 5)
    else:  # the same memory in every version, in that version's shape
        saved = matrix.reshape(saved_shape(source, 5, (1, 1, 1), 3))
    net = spconv.SparseSequential(layer)
    net.load_state_dict(convert_state_dict({"0.weight": saved}, net, source))
    indices = random_sites(gen, 1, (6, 6, 6), 0.3) * 2  # even sites, all kept by stride 2
    features = randn(gen, len(indices), 3, dtype=torch.float32)
    out = net(spconv.SparseConvTensor(features, indices, [12, 12, 12], 1))
    rows = {tuple(site): row for row, site in enumerate(indices.tolist())}
    scale = 2 if kind == "strided" else 1
    order = [rows[(b, *(scale * c for c in site))] for b, *site in out.indices.tolist()]
    torch.testing.assert_close(out.features, features[order] @ matrix)


def test_spconv21_files_mix_layouts_per_layer():
    # spconv 2.1 saved layers it ran with implicit GEMM (kernels of at most 32 offsets, its
    # default) as [C_out, *k, C_in] and native ones (larger kernels) as [*k, C_out, C_in].
    torch.manual_seed(0)
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 8, 3, bias=False),
                                  spconv.SubMConv3d(8, 6, 5, bias=False))
    reference = net.state_dict()
    saved = {"0.weight": reference["0.weight"],
             "1.weight": _old_layout(reference["1.weight"], "spconv2.0")}
    converted = convert_state_dict(saved, net, source="spconv2.1")
    for key in reference:
        assert torch.equal(converted[key], reference[key]), key
    with pytest.raises(ValueError, match="0.weight"):  # 2.0 alone is refused for this file
        convert_state_dict(saved, net, source="spconv2.0")


def test_spconv21_shape_that_fits_both_layouts_warns():
    # C_out equal to every kernel size: [3, 3, 3, 3, 16] is KRSC and RSKC alike.
    torch.manual_seed(0)
    net = spconv.SparseSequential(spconv.SubMConv3d(16, 3, 3, bias=False))
    weight = net[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"0.weight: shape \[3, 3, 3, 3, 16\] fits both layouts"):
        converted = convert_state_dict({"0.weight": weight}, net, source="spconv2.1")
    assert torch.equal(converted["0.weight"], weight)  # 2.1's default for 27 offsets: KRSC


def test_convert_reaches_every_name_of_a_shared_layer():
    torch.manual_seed(0)
    conv = spconv.SubMConv3d(4, 16, 3, bias=False)
    net = spconv.SparseSequential(conv, torch.nn.ReLU(), conv)  # one layer, two keys
    old = {k: _old_layout(v, "spconv1") for k, v in net.state_dict().items()}
    converted = convert_state_dict(old, net, source="spconv1")
    assert torch.equal(converted["0.weight"], conv.weight) and torch.equal(
        converted["2.weight"], conv.weight)


def test_convert_warns_of_keys_of_another_prefix_and_refuses_non_tensors():
    net = _small_net()
    prefixed = {f"module.{k}": v for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning, match="none of the model's 2 sparse conv weights .*'module.0"):
        assert convert_state_dict(prefixed, net, source="spconv1") == prefixed
    with pytest.raises(TypeError, match="0.weight must be a tensor, got NoneType"):
        convert_state_dict({"0.weight": None}, net, source="spconv1")
