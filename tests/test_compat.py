"""spconv drop-in layer: ``spconv_lite.pytorch`` names and module paths, and client-code
patterns (in-place index edits, numpy / tensor spatial shapes, OrderedDict containers,
dense BEV maps) that must keep working."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import make_gen, num_threads, randn, random_sites, require, require_spconv
from torch import nn

import spconv_lite
import spconv_lite.pytorch as spconv

# Every public name the design notes promise (and spconv.pytorch exports).
DESIGN_NAMES = [
    "SparseConvTensor", "SubMConv1d", "SubMConv2d", "SubMConv3d", "SparseConv1d", "SparseConv2d",
    "SparseConv3d", "SparseConvTranspose2d", "SparseConvTranspose3d", "SparseInverseConv2d",
    "SparseInverseConv3d", "SparseMaxPool2d", "SparseMaxPool3d", "SparseAvgPool2d",
    "SparseAvgPool3d", "SparseGlobalMaxPool", "SparseGlobalAvgPool", "SparseSequential",
    "SparseModule", "ToDense", "Identity", "ConvAlgo",
]

# spconv module path -> names that live there (spconv.pytorch.<path>.<name>).
MODULE_PATHS = {
    "conv": ["SparseConvolution", "SubMConv3d", "SparseConv3d", "SparseInverseConv3d",
             "SparseConvTranspose3d"],
    "modules": ["SparseModule", "SparseSequential", "SparseBatchNorm", "SparseSyncBatchNorm",
                "SparseReLU", "SparseIdentity", "assign_name_for_sparse_modules",
                "is_spconv_module"],
    "core": ["SparseConvTensor", "expand_nd"],
    "pool": ["SparseMaxPool", "SparseAvgPool", "SparseMaxPool3d", "SparseAvgPool3d",
             "SparseGlobalMaxPool"],
    "tables": ["AddTable", "AddTableMisaligned", "ConcatTable", "JoinTable"],
    "identity": ["Identity"],
    "functional": ["sparse_add"],
    "ops": ["ConvAlgo", "get_conv_output_size", "get_deconv_output_size"],
    "utils": ["gather_features_by_pc_voxel_id"],
    "constants": ["PYTORCH_VERSION", "TORCH_HAS_AMP", "is_amp_enabled", "SAVED_WEIGHT_LAYOUT",
                  "ALL_WEIGHT_IS_KRSC", "FILTER_HWIO", "CPU_ONLY_BUILD",
                  "SPCONV_VERSION_NUMBERS"],
}

# Public names of spconv.pytorch that spconv_lite.pytorch leaves out on purpose (see the
# README's "Differences from spconv"): its C++ bindings and hash table, and names it merely
# imported (Path, np, ...).
NOT_PROVIDED = {"cppcore", "hash", "Path", "Union", "np", "platform", "torch"}


@pytest.mark.parametrize("name", DESIGN_NAMES)
def test_design_names_exported(name):
    assert getattr(spconv, name) is getattr(spconv_lite, name)


@pytest.mark.parametrize("path,name", [(p, n) for p, names in MODULE_PATHS.items()
                                       for n in names])
def test_spconv_module_paths(path, name):
    module = importlib.import_module(f"spconv_lite.pytorch.{path}")
    assert hasattr(module, name)
    assert getattr(spconv, path) is module


@pytest.mark.parametrize("name", [n for n in dir(spconv_lite) if n.startswith(("SubMConv",
                                  "SparseConv", "SparseInverseConv"))
                                  and n not in ("SparseConvTensor", "SparseConvolution")])
def test_conv_layers_share_spconv_base_class(name):
    # OpenPCDet's find_all_spconv_keys looks for isinstance(m, spconv.conv.SparseConvolution).
    assert issubclass(getattr(spconv, name), spconv.conv.SparseConvolution)
    assert issubclass(getattr(spconv, name), spconv.modules.SparseModule)


def test_version_and_constants():
    assert spconv.__version__ == "2.3.8"
    assert spconv.SPCONV_VERSION_NUMBERS == [2, 3, 8]
    assert spconv.__version__ >= "2.0.0"  # mmdetection3d's test for the spconv 2 API
    assert spconv_lite.__version__ != spconv.__version__  # our own version stays separate
    c = spconv.constants
    assert c.ALL_WEIGHT_IS_KRSC and not c.FILTER_HWIO and c.SAVED_WEIGHT_LAYOUT == ""
    assert c.PYTORCH_VERSION[:2] == [int(v) for v in torch.__version__.split(".")[:2]]
    assert c.is_amp_enabled() is False
    assert isinstance(c.CPU_ONLY_BUILD, bool)


@pytest.mark.parity
def test_every_spconv_name_is_provided():
    reference = require_spconv()
    public = {n for n in dir(reference) if not n.startswith("_")}
    missing = sorted(public - NOT_PROVIDED - set(dir(spconv)))
    assert missing == []


@pytest.mark.parity
@pytest.mark.parametrize("path", sorted(MODULE_PATHS))
def test_module_paths_exist_in_spconv_too(path):
    # Guards the table above: each path is a real spconv.pytorch module with these names.
    require_spconv()
    module = importlib.import_module(f"spconv.pytorch.{path}")
    ours_only = {"ops": {"get_conv_output_size", "get_deconv_output_size", "ConvAlgo"},
                 "constants": set(MODULE_PATHS["constants"]) - {"PYTORCH_VERSION",
                                                                "TORCH_HAS_AMP",
                                                                "is_amp_enabled"}}
    for name in MODULE_PATHS[path]:
        if name in ours_only.get(path, ()):
            continue
        assert hasattr(module, name), f"spconv.pytorch.{path} has no {name}"


def test_point_to_voxel_path():
    try:
        importlib.import_module("spconv_lite.voxelize")
    except ImportError:
        with pytest.raises(ImportError, match="voxelize"):
            from spconv_lite.pytorch.utils import PointToVoxel  # noqa: F401
    else:
        from spconv_lite.pytorch.utils import PointToVoxel
        from spconv_lite.voxelize import PointToVoxel as direct

        assert PointToVoxel is direct


def _input(seed=0, shape=(12, 10, 8), batch=2, channels=3, density=0.2):
    gen = make_gen("compat", seed)
    indices = random_sites(gen, batch, shape, density)
    features = randn(gen, len(indices), channels, dtype=torch.float32)
    return features, indices, list(shape), batch


def _run_in_both_libraries(make):
    """(input indices, our output, spconv's output) of the layer ``make(library)``."""
    reference = require_spconv()
    features, indices, shape, batch = _input()
    with num_threads(1):  # spconv's CPU ops need it
        theirs = make(reference)(reference.SparseConvTensor(features, indices, shape, batch))
    ours = make(spconv)(spconv.SparseConvTensor(features, indices, shape, batch))
    return indices, ours, theirs


@pytest.mark.parity
@pytest.mark.parametrize("make", [
    lambda lib: lib.SubMConv3d(3, 4, 3, indice_key="k"),
    lambda lib: lib.SparseConv3d(3, 4, 3, stride=2, padding=1, indice_key="k"),
], ids=["subm", "strided"])
def test_kernel_map_has_spconvs_pair_fields(make):
    # Client code (FLOP counters) reads spconv's pair fields from indice_dict.
    indices, ours, theirs = _run_in_both_libraries(make)
    kmap = ours.indice_dict["k"]
    counts = theirs.indice_dict["k"].indice_pair_num
    if ours.indices is indices:  # spconv's CPU subm map counts only the offsets before the
        counts = counts[:13]     # centre (the others mirror them; the centre pairs every site)
    assert torch.equal(kmap.indice_pair_num[:len(counts)], counts)
    assert kmap.indices is indices and kmap.out_indices is ours.indices
    assert kmap.pair_fwd.shape == (27, len(ours.indices))
    assert kmap.pair_bwd.shape == (27, len(indices))
    assert int((kmap.pair_fwd >= 0).sum()) == int(kmap.indice_pair_num.sum())
    # IndiceData's geometry fields (client code compares them with its own layer's)
    data = theirs.indice_dict["k"]
    assert list(kmap.spatial_shape) == list(data.spatial_shape)
    assert kmap.is_subm == data.is_subm and list(kmap.ksize) == list(data.ksize)


def _pair_sites(pairs, in_indices, out_indices, offset):
    """The (input site, output site) pairs at one offset of spconv's ``indice_pairs``."""
    count = int((pairs[0, offset] >= 0).sum())
    assert (pairs[:, offset, count:] == -1).all()  # the lists are -1 padded
    rows_in, rows_out = pairs[0, offset, :count].long(), pairs[1, offset, :count].long()
    return sorted(zip(in_indices[rows_in].tolist(), out_indices[rows_out].tolist()))


@pytest.mark.parity
@pytest.mark.parametrize("make", [
    lambda lib: lib.SparseConv3d(3, 4, 2, stride=2, indice_key="k"),  # SphereFormer's
    lambda lib: lib.SparseConv3d(3, 4, 3, stride=2, padding=1, indice_key="k"),
    lambda lib: lib.SubMConv3d(3, 4, 3, indice_key="k"),
], ids=["k2s2", "k3s2p1", "subm"])
def test_kernel_map_indice_pairs_pair_the_sites_spconvs_do(make):
    # SphereFormer reads indice_dict[key].indice_pairs ([2, K, N_in]: input rows, output rows,
    # -1 padded) after a strided conv to find each voxel's parent.
    indices, ours, theirs = _run_in_both_libraries(make)
    pairs, their_pairs = ours.indice_dict["k"].indice_pairs, theirs.indice_dict["k"].indice_pairs
    assert pairs.dtype == torch.int32 and pairs.shape == their_pairs.shape
    for offset in range(pairs.shape[1]):
        rows_in = pairs[0, offset][pairs[0, offset] >= 0]
        assert (rows_in.diff() > 0).all()  # input rows in increasing order
        if ours.indices is indices and offset > 13:
            continue  # spconv's CPU subm map lists the offsets up to the centre only
        assert _pair_sites(pairs, indices, ours.indices, offset) == _pair_sites(
            their_pairs, indices, theirs.indices, offset)


@pytest.mark.parametrize("kind", ["list", "tuple", "numpy", "numpy_int32", "tensor"])
def test_spatial_shape_types(kind):
    features, indices, shape, batch = _input()
    value = {"list": list(shape), "tuple": tuple(shape), "numpy": np.array(shape),
             "numpy_int32": np.array(shape, dtype=np.int32), "tensor": torch.tensor(shape)}[kind]
    x = spconv.SparseConvTensor(features, indices, value, batch)
    assert x.spatial_shape == shape and all(type(s) is int for s in x.spatial_shape)
    torch.manual_seed(0)
    y = spconv.SparseConv3d(3, 4, 3, stride=2, padding=1)(x)
    assert y.spatial_shape == [6, 5, 4]


def test_openpcdet_sparse_shape_expression():
    # OpenPCDet: sparse_shape = grid_size[::-1] + [1, 0, 0] on a numpy int64 grid_size.
    grid_size = np.array([1408, 1600, 40])
    indices = torch.tensor([[0, 40, 1599, 1407], [1, 0, 0, 0]], dtype=torch.int32)
    x = spconv.SparseConvTensor(torch.ones(2, 4), indices, grid_size[::-1] + [1, 0, 0], 2)
    assert x.spatial_shape == [41, 1600, 1408]


def test_sequential_from_ordered_dict():
    torch.manual_seed(0)
    net = spconv.SparseSequential(OrderedDict([
        ("conv1", spconv.SubMConv3d(3, 8, 3, indice_key="subm1")),
        ("bn1", nn.BatchNorm1d(8)),
        ("relu1", nn.ReLU()),
        ("down", spconv.SparseConv3d(8, 16, 3, stride=2, padding=1)),
    ]))
    assert [name for name, _ in net.named_children()] == ["conv1", "bn1", "relu1", "down"]
    assert list(net.state_dict())[:2] == ["conv1.weight", "conv1.bias"]
    x = spconv.SparseConvTensor(*_input())
    assert net(x).features.shape[1] == 16
    assert net[1] is net.bn1


def test_dense_then_bev_reshape():
    features, indices, shape, batch = _input(shape=(2, 6, 5), channels=4, density=0.4)
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    dense = x.dense()
    n, c, d, h, w = dense.shape
    bev = dense.view(n, c * d, h, w)  # OpenPCDet's HeightCompression
    for row, (b, z, y, xx) in enumerate(indices.tolist()):
        torch.testing.assert_close(bev[b, z::d, y, xx], features[row])
    cl = x.dense(channels_first=False)
    assert cl.shape == (n, d, h, w, c)


def test_indices_edited_in_place():
    """VoxelNeXt scales coarse tensors back to the fine grid in place
    (``x_conv5.indices[:, 1:] *= 2``) and runs further layers on them; the results must equal
    the same layers applied to a freshly built tensor with the edited indices."""
    torch.manual_seed(0)
    features, indices, shape, batch = _input(shape=(16, 16, 16), density=0.1)
    down = spconv.SparseConv3d(3, 3, 3, stride=2, padding=1, indice_key="down")
    layers = spconv.SparseSequential(
        spconv.SubMConv3d(3, 5, 3, indice_key="subm_after"),
        spconv.SparseConv3d(5, 4, 3, stride=2, padding=1, indice_key="down_after"),
    )
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    low = down(x)  # 8^3 grid; low.indices is also the output of the map cached as "down"
    low.indices[:, 1:] *= 2  # in place, back on the 16^3 grid
    low.spatial_shape = shape
    out = layers(low)
    fresh = spconv.SparseConvTensor(low.features.detach().clone(), low.indices.clone(), shape,
                                    batch)
    ref = layers(fresh)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.features, ref.features)


def test_indices_edited_in_place_before_network():
    # Shifting batch indices in place on the input (e.g. re-batching) before any layer ran.
    torch.manual_seed(0)
    features, indices, shape, _ = _input(batch=1)
    x = spconv.SparseConvTensor(features, indices, shape, batch_size=2)
    x.indices[:, 0] = 1
    conv = spconv.SparseConv3d(3, 4, 3, stride=2, padding=1)
    y = conv(x)
    assert (y.indices[:, 0] == 1).all()
    ref = conv(spconv.SparseConvTensor(features, indices.clone(), shape, batch_size=2))
    torch.testing.assert_close(y.features, ref.features)


def test_sparse_batchnorm_relu_wrappers():
    features, indices, shape, batch = _input()
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    bn = spconv.SparseBatchNorm(3).eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    direct = bn(x)
    assert isinstance(direct, spconv.SparseConvTensor)
    torch.testing.assert_close(direct.features, nn.functional.batch_norm(
        features, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    seq = spconv.SparseSequential(bn, spconv.SparseReLU(), spconv.SparseIdentity())
    torch.testing.assert_close(seq(x).features, direct.features.relu())
    torch.testing.assert_close(bn(features), direct.features)  # plain tensors work too


def test_tables():
    features, indices, shape, batch = _input()
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    torch.manual_seed(0)
    branches = spconv.ConcatTable(spconv.SubMConv3d(3, 4, 3, indice_key="a"), spconv.Identity())
    a, b = branches(x)
    joined = spconv.JoinTable()([a, b])
    assert joined.features.shape == (len(indices), 7)
    torch.testing.assert_close(joined.features[:, 4:], features)
    added = spconv.AddTable()([x, x])
    torch.testing.assert_close(added.features, 2 * features)
    with pytest.raises(ValueError, match="same sites"):
        spconv.AddTable()([x, spconv.SparseConvTensor(features[:3], indices[:3], shape, batch)])


def test_conv_add_input():
    torch.manual_seed(0)
    features, indices, shape, batch = _input()
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    conv = spconv.SubMConv3d(3, 3, 3)
    torch.testing.assert_close(conv(x, add_input=x).features, conv(x).features + features)
    with pytest.raises(ValueError, match="add_input"):
        conv(x, add_input=spconv.SparseConvTensor(features[:2], indices[:2], shape, batch))


def test_fused_activation_refused():
    with pytest.raises(ValueError, match="act_type"):
        spconv.conv.SparseConvolution(3, 4, 4, 3, act_type="ReLU")


def _standardized(weight):
    """Weight standardization: each output channel's weights with mean 0 and std 1."""
    dims = tuple(range(1, weight.dim()))
    return (weight - weight.mean(dims, keepdim=True)) / (weight.std(dims, keepdim=True) + 1e-5)


def _weight_standardized(layer_class):
    """A subclass written against spconv 2.x: it runs the layer's conv with another weight
    through ``_conv_forward`` (as weight-standardized and fake-quantized convs do)."""

    class Standardized(layer_class):
        def forward(self, x):
            return self._conv_forward(self.training, x, _standardized(self.weight), self.bias)

    return Standardized


@pytest.mark.parametrize("name, args, kwargs", [
    ("SubMConv3d", (3, 4, 3), dict(indice_key="k")),
    ("SparseConv3d", (3, 4, 3), dict(stride=2, padding=1)),
    ("SubMConv3d", (3, 4, 1), {}),
], ids=["subm", "strided", "1x1"])
def test_conv_forward_runs_the_layer_with_the_weight_it_is_given(name, args, kwargs):
    torch.manual_seed(0)
    features, indices, shape, batch = _input()
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    layer = _weight_standardized(getattr(spconv, name))(*args, **kwargs)
    plain = getattr(spconv, name)(*args, **kwargs)
    with torch.no_grad():
        plain.weight.copy_(_standardized(layer.weight))
        plain.bias.copy_(layer.bias)
    ours, expected = layer(x), plain(x)
    assert torch.equal(ours.features, expected.features)
    assert torch.equal(ours.indices, expected.indices)
    ours.features.sum().backward()  # the gradient reaches the layer's own weight
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parity
def test_conv_forward_subclass_matches_spconv():
    reference = require_spconv()
    features, indices, shape, batch = _input()
    theirs = _weight_standardized(reference.SubMConv3d)(3, 4, 3, indice_key="k")
    ours = _weight_standardized(spconv.SubMConv3d)(3, 4, 3, indice_key="k")
    ours.load_state_dict(theirs.state_dict())
    with num_threads(1):  # spconv's CPU ops need it
        expected = theirs(reference.SparseConvTensor(features, indices, shape, batch)).features
    got = ours(spconv.SparseConvTensor(features, indices, shape, batch)).features
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_conv_forward_refuses_int8_scales_and_fused_activations():
    features, indices, shape, batch = _input()
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    layer = spconv.SubMConv3d(3, 4, 3)
    with pytest.raises(NotImplementedError, match="channel_scale, output_scale"):
        layer._conv_forward(False, x, layer.weight, layer.bias, output_scale=0.5)
    with pytest.raises(ValueError, match="act_type='ReLU'"):
        layer._conv_forward(False, x, layer.weight, layer.bias, act_type="ReLU")


CONV_CLASSES = [f"{kind}{n}d" for kind in ("SubMConv", "SparseConv", "SparseConvTranspose",
                                           "SparseInverseConv") for n in (1, 2, 3, 4)]


@pytest.mark.parametrize("name", CONV_CLASSES)
def test_conv_class_refuses_act_type_naming_the_class(name):
    """Only the base class takes act_type (as in spconv); a layer class names itself."""
    layer_class = getattr(spconv, name)
    args = (3, 4, 3) if "Inverse" not in name else (3, 4, 3, "key")
    with pytest.raises(TypeError, match=rf"^{name}\.__init__\(\) got an unexpected keyword "
                       "argument 'act_type'$"):
        layer_class(*args, act_type="ReLU")


@pytest.mark.parametrize("name", CONV_CLASSES)
def test_conv_class_signature_covers_spconv(name):
    """Every parameter of spconv's class, in spconv's positional order, with its default."""
    import inspect

    ours = inspect.signature(getattr(spconv, name)).parameters
    theirs = inspect.signature(getattr(require_spconv(), name)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for param in theirs.values():
        assert ours[param.name].default == param.default, param.name


@pytest.mark.parametrize("make", [
    lambda: spconv.SparseConv3d(3, 4, 3, stride=2, padding=1, record_voxel_count=True),
    lambda: spconv.SparseMaxPool3d(2, 2, record_voxel_count=True),
    lambda: spconv.SparseAvgPool3d(3, 2, 1, record_voxel_count=True),
], ids=["conv", "max_pool", "avg_pool"])
def test_record_voxel_count_buffer(make):
    torch.manual_seed(0)
    layer = make()
    assert "max_num_voxels_during_training" in layer.state_dict()
    y = layer(spconv.SparseConvTensor(*_input()))
    assert int(layer.max_num_voxels_during_training) == y.indices.shape[0]
    assert layer.get_max_num_voxels() is layer.max_num_voxels_during_training
    # A checkpoint saved without the buffer (record_voxel_count=False) loads strictly, as with
    # spconv, and the count starts again at 0.
    saved = {k: v for k, v in layer.state_dict().items() if "max_num_voxels" not in k}
    layer.load_state_dict(saved)
    assert int(layer.max_num_voxels_during_training) == 0
    layer.eval()  # counted in training only
    layer(spconv.SparseConvTensor(*_input()))
    assert int(layer.max_num_voxels_during_training) == 0


def test_record_voxel_count_keeps_the_largest_count_of_threads_training_one_layer():
    def row_of_sites(n):
        indices = torch.zeros(n, 4, dtype=torch.int32)
        indices[:, 3] = torch.arange(n) * 2
        return spconv.SparseConvTensor(torch.randn(n, 2), indices, [1, 1, 4 * n], 1)

    inputs = [row_of_sites(n) for n in (10, 20, 30, 40)]
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, to open the window of a lost update
    try:
        for _ in range(1000):
            layer = spconv.SparseConv3d(2, 2, 1, 2, record_voxel_count=True)
            threads = [threading.Thread(target=layer, args=(x,)) for x in inputs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert int(layer.max_num_voxels_during_training) == 40
    finally:
        sys.setswitchinterval(switch_interval)


def test_record_voxel_count_buffer_of_a_meta_layer_loads_on_the_cpu():
    # Built on the meta device and loaded with assign=True from a checkpoint without the
    # buffer, the layer gets a real zero count, as spconv fills in.
    with torch.device("meta"):
        layer = spconv.SparseConv3d(3, 4, 3, stride=2, record_voxel_count=True)
    saved = {k: v for k, v in spconv.SparseConv3d(3, 4, 3, stride=2).state_dict().items()}
    layer.load_state_dict(saved, assign=True)
    assert layer.max_num_voxels_during_training.device.type == "cpu"
    assert int(layer.max_num_voxels_during_training) == 0


@pytest.mark.parametrize("make", [
    lambda: spconv.SparseConv3d(3, 4, 3, stride=2, record_voxel_count=True),
    lambda: spconv.SparseMaxPool3d(2, 2, record_voxel_count=True),
], ids=["conv", "max_pool"])
def test_record_voxel_count_of_a_meta_layer_starts_at_zero_after_reset_parameters(make):
    # torch's meta-device init: to_empty() leaves the buffers' memory as it was, and
    # reset_parameters() initialises each module (BatchNorm's resets its running statistics).
    with torch.device("meta"):
        layer = make()
    layer.to_empty(device="cpu")
    layer.max_num_voxels_during_training.fill_(123456)  # what the memory may hold
    layer.reset_parameters()
    assert int(layer.max_num_voxels_during_training) == 0
    y = layer(spconv.SparseConvTensor(*_input()))
    assert int(layer.max_num_voxels_during_training) == y.indices.shape[0]


def test_record_voxel_count_without_buffer():
    subm = spconv.SubMConv3d(3, 4, 3, record_voxel_count=True)
    assert "max_num_voxels_during_training" not in subm.state_dict()
    assert subm.get_max_num_voxels() is None


@pytest.mark.parity
def test_base_pools_tables_and_sync_batchnorm_match_spconv():
    # The spconv classes that take the dimension count first (stride 1 by default, where the
    # N-d classes default to the kernel size), AddTableMisaligned and SparseSyncBatchNorm.
    reference = require_spconv()
    torch.set_num_threads(1)  # spconv's CPU pools need it
    features, indices, shape, batch = _input(density=0.3)
    features = features.abs()  # spconv's max pool starts from 0: negative maxima come out 0
    n = len(indices)
    for lib in (spconv, reference):
        assert issubclass(lib.pool.SparseMaxPool3d, lib.pool.SparseMaxPool)
        assert not issubclass(lib.pool.SparseAvgPool3d, lib.pool.SparseMaxPool)

    def run(lib, make):
        return make(lib)(lib.SparseConvTensor(features, indices, shape, batch)).dense()

    for make in (lambda lib: lib.pool.SparseMaxPool(3, 3),
                 lambda lib: lib.pool.SparseMaxPool(3, 2, stride=None),
                 lambda lib: lib.modules.SparseSyncBatchNorm(features.shape[1]).eval()):
        torch.testing.assert_close(run(spconv, make), run(reference, make))
    # spconv's CPU build has no average pool: its signature, and ours against our 3-D class.
    for name in ("SparseMaxPool", "SparseAvgPool"):
        ours = inspect.signature(getattr(spconv.pool, name)).parameters
        theirs = inspect.signature(getattr(reference.pool, name)).parameters
        assert [(p.name, p.default) for p in ours.values()] == [
            (p.name, p.default) for p in theirs.values()]
    torch.testing.assert_close(
        run(spconv, lambda lib: lib.pool.SparseAvgPool(3, (3, 1, 3), padding=1)),
        run(spconv, lambda lib: lib.pool.SparseAvgPool3d((3, 1, 3), 1, padding=1)))
    halves = [(features[: 2 * n // 3], indices[: 2 * n // 3]),
              (features[n // 3:], indices[n // 3:])]
    ours = spconv.tables.AddTableMisaligned()([spconv.SparseConvTensor(f, i, shape, batch)
                                               for f, i in halves])
    # spconv's AddTableMisaligned hashes on the GPU only: its sparse_add is the same sum.
    theirs = reference.functional.sparse_add(*(reference.SparseConvTensor(f, i, shape, batch)
                                               for f, i in halves))
    torch.testing.assert_close(ours.dense(), theirs.dense())


def _dense_sum(*tensors):
    return sum(t.dense() for t in tensors)


@pytest.mark.parametrize("case", ["disjoint", "overlap", "subset", "same"])
def test_sparse_add(case):
    features, indices, shape, batch = _input(density=0.3)
    n = len(indices)
    parts = {"disjoint": (slice(0, n // 2), slice(n // 2, n)),
             "overlap": (slice(0, 2 * n // 3), slice(n // 3, n)),
             "subset": (slice(0, n), slice(n // 4, n // 2)),
             "same": (slice(0, n), slice(0, n))}[case]
    gen = make_gen("sparse_add", case)
    tensors = [spconv.SparseConvTensor(randn(gen, len(indices[p]), 3, dtype=torch.float32),
                                       indices[p], shape, batch) for p in parts]
    out = spconv.functional.sparse_add(*tensors)
    torch.testing.assert_close(out.dense(), _dense_sum(*tensors))
    assert len(torch.unique(out.indices, dim=0)) == len(out.indices)
    if case in ("subset", "same"):
        # The union is the first operand's sites: its rows, order and kernel maps are kept.
        assert torch.equal(out.indices, tensors[0].indices)
        assert out.indice_dict is tensors[0].indice_dict


def test_sparse_add_sums_in_argument_order_in_the_common_dtype():
    """Operands are added one at a time in argument order ((1 + 1e8) - 1e8 is 0 in float32,
    the reverse order gives 1), in the type all of them promote to (2^-20 survives in float32,
    not in the first operand's float16)."""
    site = torch.tensor([[0, 1, 2]], dtype=torch.int32)

    def operand(value, dtype=torch.float32):
        return spconv.SparseConvTensor(torch.full((1, 1), value, dtype=dtype), site, [4, 4], 1)

    out = spconv.functional.sparse_add(operand(1.0), operand(1e8), operand(-1e8))
    assert out.features.item() == 0.0
    out = spconv.functional.sparse_add(operand(1.0, torch.float16), operand(2.0**-20))
    assert out.features.dtype == torch.float32 and out.features.item() == 1.0 + 2.0**-20


def test_sparse_add_on_a_grid_whose_site_keys_pass_int64():
    """3 x 2^63 sites: packed int64 keys would wrap and merge batch items 0 and 2."""
    shape = [2**21] * 3
    a = spconv.SparseConvTensor(torch.ones(1, 1), torch.tensor([[0, 0, 0, 5]], dtype=torch.int32),
                                shape, 3)
    b = spconv.SparseConvTensor(torch.full((1, 1), 2.0),
                                torch.tensor([[2, 0, 0, 5]], dtype=torch.int32), shape, 3)
    out = spconv.functional.sparse_add(a, b)
    assert out.indices.tolist() == [[0, 0, 0, 5], [2, 0, 0, 5]]
    assert out.features.tolist() == [[1.0], [2.0]]


@pytest.mark.parity
def test_sparse_add_matches_spconv():
    reference = require_spconv()
    features, indices, shape, batch = _input(density=0.3)
    n = len(indices)
    a = (features[: 2 * n // 3], indices[: 2 * n // 3])
    b = (features[n // 3:] * 2, indices[n // 3:])
    ours = spconv.functional.sparse_add(*(spconv.SparseConvTensor(f, i, shape, batch)
                                          for f, i in (a, b)))
    ref = reference.functional.sparse_add(*(reference.SparseConvTensor(f, i, shape, batch)
                                            for f, i in (a, b)))
    torch.testing.assert_close(ours.dense(), ref.dense())


def test_gather_features_by_pc_voxel_id():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    ids = torch.tensor([1, -1, 0, 1])
    out = spconv.utils.gather_features_by_pc_voxel_id(feats, ids, invalid_value=-7)
    assert out.tolist() == [[3.0, 4.0], [-7.0, -7.0], [1.0, 2.0], [3.0, 4.0]]
    # Every point dropped (no voxel at all): rows of invalid_value, as spconv returns.
    none = spconv.utils.gather_features_by_pc_voxel_id(torch.zeros(0, 2), torch.tensor([-1, -1]))
    assert none.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match=re.escape(
            "pc_voxel_id must hold voxel rows in [0, 2) or -1, got values in [-2, 1]")):
        spconv.utils.gather_features_by_pc_voxel_id(feats, torch.tensor([1, -2]))


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([0.9, -1.0]), TypeError, "must hold integer voxel ids, got torch.float32"),
    (torch.tensor([True, False]), TypeError, "must hold integer voxel ids, got torch.bool"),
    (torch.tensor([-5, 0]), ValueError, "must hold voxel rows in [0, 2) or -1, got values in [-5"),
    (torch.tensor([2, 0], dtype=torch.int32), ValueError, "must hold voxel rows in [0, 2) or"),
])  # fmt: skip
def test_voxel_ids_are_checked_the_same_way_by_both_gathers(ids, error, message):
    # Float ids were truncated (0.9 read voxel 0), bool ids read voxels 0 and 1, and
    # voxel_to_point filled ids below -1 silently.
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(error, match=re.escape("pc_voxel_id " + message)):
        spconv.utils.gather_features_by_pc_voxel_id(feats, ids)
    with pytest.raises(error, match=re.escape("point_voxel_id " + message)):
        spconv_lite.voxel_to_point(feats, ids)


def test_output_size_helpers():
    assert spconv.ops.get_conv_output_size([41, 1600, 1408], 3, 2, 1, 1) == [21, 800, 704]
    out = spconv.ops.get_conv_output_size([5, 200, 176], (3, 1, 1), (2, 1, 1), 0, 1)
    assert out == [2, 200, 176]
    assert spconv.ops.get_deconv_output_size([4, 4], 3, 2, 1, 1, 1) == [8, 8]


def test_require_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require(False, "needed")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require(False, "optional")


@pytest.mark.parametrize("make", [
    lambda: spconv.SparseConv3d(3, 5, 1),
    lambda: spconv.SparseConvTranspose3d(3, 5, 1),
    lambda: spconv.SubMConv3d(3, 5, 1),
], ids=["conv", "transposed", "subm"])
def test_1x1_layer_keeps_input_rows_and_ignores_its_key(make):
    # spconv 2.x runs a 1x1 layer as one product on the input's rows: the output holds the
    # input's indices in their order (residuals written on features rely on it), and the
    # layer's indice_key is neither read nor written, so it may be shared with other layers.
    features, indices, shape, batch = _input()
    shuffled = torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))
    x = spconv.SparseConvTensor(features[shuffled], indices[shuffled], shape, batch)
    layer = make()
    y = layer(x)
    assert y.indices is x.indices and y.spatial_shape == shape
    weight = layer.weight.detach().reshape(3, 5)  # spconv's 1x1 reading of [C_out, 1, 1, 1, C_in]
    torch.testing.assert_close(y.features, x.features @ weight + layer.bias.detach())
    # The same key on a 3x3 layer before and after, as TRELLIS's skip connections use it.
    net = spconv.SparseSequential(spconv.SubMConv3d(3, 3, 3, indice_key="res"),
                                  type(layer)(3, 3, 1, indice_key="res"),
                                  spconv.SubMConv3d(3, 3, 3, indice_key="res"))
    out = net(x)
    assert out.indices is x.indices and "res" in out.indice_dict


def test_inverse_1x1_after_a_1x1_conv_with_its_key():
    # The 1x1 conv stores no map, so the inverse 1x1 layer runs on its input's rows, as
    # spconv's does; after a strided 1x1 conv (a map) it returns to that map's sites.
    features, indices, shape, batch = _input()
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    net = spconv.SparseSequential(spconv.SparseConv3d(3, 4, 1, indice_key="k"),
                                  spconv.SparseInverseConv3d(4, 2, 1, indice_key="k"))
    y = net(x)
    assert y.indices is x.indices and y.features.shape == (len(indices), 2)
    down = spconv.SparseConv3d(3, 4, 1, stride=2, indice_key="d")
    back = spconv.SparseInverseConv3d(4, 2, 1, indice_key="d")(down(x))
    assert back.spatial_shape == shape and back.indices is x.indices


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_1x1_layer_checks_sites_no_map_has_checked(compiled):
    # A 1x1 layer builds no map, so it checks the sites itself, compiled too (the map
    # builder's check): a duplicate or a row outside the batch is refused, not summed.
    head = spconv.SparseSequential(spconv.SubMConv3d(3, 2, 1), spconv.SparseGlobalAvgPool())
    # eager: the 1x1 layer alone (the global pool checks sites itself in eager mode)
    run = torch.compile(head, fullgraph=True, backend="aot_eager") if compiled else head[0]
    for rows, message in [([[0, 1, 1, 1], [0, 1, 1, 1]], "duplicate"),
                          ([[0, 1, 1, 1], [3, 1, 1, 1]], "outside the grid")]:
        x = spconv.SparseConvTensor(torch.randn(2, 3), torch.tensor(rows, dtype=torch.int32),
                                    [4, 4, 4], 1)
        with pytest.raises(Exception, match=message):
            run(x)


def test_padded_1x1_conv_moves_its_sites():
    # With padding, a 1x1 conv is not a product on the input's rows: its sites shift; with
    # output padding (dilation 2 allows it at stride 1) a transposed one's grid grows.
    features, indices, shape, batch = _input()
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    y = spconv.SparseConv3d(3, 5, 1, padding=1)(x)
    assert y.spatial_shape == [s + 2 for s in shape]
    assert torch.equal(y.indices[:, 1:].sort(0).values, (indices[:, 1:] + 1).sort(0).values)
    t = spconv.SparseConvTranspose3d(3, 5, 1, dilation=2, output_padding=1)(x)
    assert t.spatial_shape == [s + 1 for s in shape]


def test_spconv_keyword_and_small_api_names():
    # Client code may pass forward's argument by spconv's name, and reads these attributes.
    features, indices, shape, batch = _input()
    x = spconv.SparseConvTensor(features, indices, shape, batch)
    for layer in (spconv.SubMConv3d(3, 4, 3), spconv.SparseMaxPool3d(2),
                  spconv.SparseGlobalAvgPool(), spconv.SparseSequential(nn.ReLU())):
        layer(input=x)
    assert spconv.SubMConv3d(3, 4, 3)._sparse_unique_name == ""
    assert spconv.ConcatTable(name="branches").name == "branches"
    assert spconv.modules.is_spconv_module(spconv.SparseBatchNorm(3))
    assert spconv.modules.is_spconv_module(spconv.SparseReLU())
    assert not spconv.modules.is_spconv_module(nn.ReLU())


@pytest.mark.parametrize("make", [
    lambda: spconv.SubMConv3d(3, 4, 3, indice_key="s"),
    lambda: spconv.SparseConv3d(3, 4, 2, stride=2),
    lambda: spconv.SubMConv3d(3, 4, 1),
], ids=["subm", "strided", "1x1"])
def test_parametrized_weight_is_computed_once_a_forward(make):
    """A parametrization runs once per forward, as for torch's convs and spconv's (spectral_norm
    takes one power iteration a step): the layer read its weight twice."""
    calls = []

    class Counted(nn.Module):
        def forward(self, weight):
            calls.append(1)
            return weight * 1.0

    layer = make()
    nn.utils.parametrize.register_parametrization(layer, "weight", Counted())
    calls.clear()  # registering ran it once
    gen = make_gen("parametrized weight")
    indices = random_sites(gen, 1, (6, 6, 6), count=20)
    x = spconv.SparseConvTensor(randn(gen, 20, 3).float(), indices, [6, 6, 6], 1)
    layer(x).features.sum().backward()
    assert len(calls) == 1
    assert layer.parametrizations.weight.original.grad is not None
