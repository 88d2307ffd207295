"""spconv_lite.models: OpenPCDet structure and parameter names, shapes, gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import make_gen, randn, random_sites
from torch import nn

import spconv_lite.pytorch as spconv
from spconv_lite.models import (
    HeightCompression,
    SparseBasicBlock,
    SpUNetBase,
    UNetV2,
    VoxelBackBone8x,
    VoxelResBackBone8x,
    VoxelResBackBone8xVoxelNeXt,
)

KITTI_GRID = [1408, 1600, 40]  # (x, y, z) at 0.05 x 0.05 x 0.1 m


def _input(model, count=300, seed=0, batch=2):
    """Random sites on the model's grid, clustered in a small corner so that they have
    neighbours at every scale."""
    gen = make_gen("models", seed)
    z, y, x = model.sparse_shape
    sites = random_sites(gen, batch, (min(z, 41), min(y, 24), min(x, 24)), count=count)
    features = randn(gen, len(sites), 4, dtype=torch.float32)
    return model.input_tensor(features, sites, batch)


# Parameter names and shapes of OpenPCDet's checkpoints (backbone_3d.<name>): a sample of
# each kind of layer, with shapes in spconv's [C_out, *k, C_in] layout.
OPENPCDET_KEYS = {
    VoxelBackBone8x: {
        "conv_input.0.weight": [16, 3, 3, 3, 4],
        "conv_input.1.running_var": [16],
        "conv1.0.0.weight": [16, 3, 3, 3, 16],
        "conv2.0.0.weight": [32, 3, 3, 3, 16],
        "conv2.2.1.bias": [32],
        "conv4.0.0.weight": [64, 3, 3, 3, 64],
        "conv4.2.0.weight": [64, 3, 3, 3, 64],
        "conv_out.0.weight": [128, 3, 1, 1, 64],
        "conv_out.1.num_batches_tracked": [],
    },
    VoxelResBackBone8x: {
        "conv_input.0.weight": [16, 3, 3, 3, 4],
        "conv1.0.conv1.weight": [16, 3, 3, 3, 16],
        "conv1.0.conv1.bias": [16],
        "conv1.1.bn2.running_mean": [16],
        "conv2.0.0.weight": [32, 3, 3, 3, 16],
        "conv2.1.conv2.weight": [32, 3, 3, 3, 32],
        "conv4.0.0.weight": [128, 3, 3, 3, 64],
        "conv4.2.conv2.bias": [128],
        "conv_out.0.weight": [128, 3, 1, 1, 128],
    },
    UNetV2: {
        "conv_input.0.weight": [16, 3, 3, 3, 4],
        "conv4.0.0.weight": [64, 3, 3, 3, 64],
        "conv_out.0.weight": [128, 3, 1, 1, 64],
        "conv_up_t4.conv1.weight": [64, 3, 3, 3, 64],
        "conv_up_m4.0.weight": [64, 3, 3, 3, 128],
        "inv_conv4.0.weight": [64, 3, 3, 3, 64],
        "inv_conv3.0.weight": [32, 3, 3, 3, 64],
        "conv_up_t2.bn2.weight": [32],
        "inv_conv2.0.weight": [16, 3, 3, 3, 32],
        "conv_up_m1.0.weight": [16, 3, 3, 3, 32],
        "conv5.0.0.weight": [16, 3, 3, 3, 16],
        "conv5.0.1.bias": [16],
    },
    VoxelResBackBone8xVoxelNeXt: {
        "conv_input.0.weight": [16, 3, 3, 3, 4],
        "conv1.1.conv2.bias": [16],
        "conv2.0.0.weight": [32, 3, 3, 3, 16],
        "conv4.2.bn2.running_var": [128],
        "conv5.0.0.weight": [128, 3, 3, 3, 128],
        "conv6.2.conv2.weight": [128, 3, 3, 3, 128],
        "conv_out.0.weight": [128, 3, 3, 128],
        "shared_conv.0.bias": [128],
        "shared_conv.1.running_mean": [128],
    },
}
# State dict sizes: per conv its weight and 5 BatchNorm entries (weight, bias, mean, var,
# count), plus the conv biases of the residual blocks (16 in VoxelResBackBone8x, 24 in VoxelNeXt,
# whose shared_conv has one too).
STATE_SIZES = {VoxelBackBone8x: 12 * 6, VoxelResBackBone8x: 21 * 6 + 16, UNetV2: 28 * 6,
               VoxelResBackBone8xVoxelNeXt: 32 * 6 + 25}


@pytest.mark.parametrize("cls", list(OPENPCDET_KEYS), ids=lambda c: c.__name__)
def test_openpcdet_parameter_names(cls):
    state = cls(4, KITTI_GRID).state_dict()
    for key, shape in OPENPCDET_KEYS[cls].items():
        assert list(state[key].shape) == shape, key
    assert len(state) == STATE_SIZES[cls]


def test_resbackbone_bias_switch():
    no_bias = VoxelResBackBone8x(4, KITTI_GRID, use_bias=False).state_dict()
    assert "conv1.0.conv1.bias" not in no_bias
    unet = UNetV2(4, KITTI_GRID).state_dict()
    assert "conv_up_t4.conv1.bias" not in unet  # OpenPCDet's U-Net blocks have no bias


@pytest.mark.parametrize("cls", [VoxelBackBone8x, VoxelResBackBone8x], ids=lambda c: c.__name__)
def test_backbone_shapes_and_bev(cls):
    torch.manual_seed(0)
    model = cls(4, KITTI_GRID).eval()
    assert model.sparse_shape == [41, 1600, 1408]
    with torch.no_grad():
        out = model(_input(model))
    enc = out["encoded_spconv_tensor"]
    assert enc.spatial_shape == [2, 200, 176] and enc.features.shape[1] == 128
    assert out["encoded_spconv_tensor_stride"] == 8
    scales = out["multi_scale_3d_features"]
    assert [t.spatial_shape for t in scales.values()] == [
        [41, 1600, 1408], [21, 800, 704], [11, 400, 352], [5, 200, 176]]
    assert [t.features.shape[1] for t in scales.values()] == list(model.backbone_channels.values())
    bev = HeightCompression(256)(enc)
    assert bev.shape == (2, 256, 200, 176)


@pytest.mark.parametrize("cls", [VoxelBackBone8x, VoxelResBackBone8x, UNetV2,
                                 VoxelResBackBone8xVoxelNeXt], ids=lambda c: c.__name__)
def test_inference_mode_matches_no_grad(cls):
    # Deployment code often runs under torch.inference_mode, whose tensors keep no version
    # counter (which the kernel-map cache reads to notice edited indices).
    torch.manual_seed(0)
    model = cls(4, KITTI_GRID).eval()
    with torch.no_grad():
        want = model(_input(model))
    with torch.inference_mode():
        got = model(_input(model))
    for key in ("encoded_spconv_tensor", "point_tensor"):
        if key in want:
            assert torch.equal(got[key].indices, want[key].indices)
            assert torch.equal(got[key].features, want[key].features)


def test_height_compression_is_dense_view():
    gen = make_gen("bev")
    sites = random_sites(gen, 2, (2, 6, 5), 0.4)
    x = spconv.SparseConvTensor(randn(gen, len(sites), 3, dtype=torch.float32), sites,
                                [2, 6, 5], 2)
    torch.testing.assert_close(HeightCompression(6)(x), x.dense().view(2, 6, 6, 5))


def test_height_compression_wrong_channels():
    model = VoxelBackBone8x(4, KITTI_GRID).eval()
    with torch.no_grad():
        enc = model(_input(model))["encoded_spconv_tensor"]
    with pytest.raises(ValueError, match="expects 512 BEV channels.*128 channels x 2"):
        HeightCompression(512)(enc)


def test_height_compression_refuses_a_2d_tensor():
    x = spconv.SparseConvTensor(torch.ones(1, 4), torch.tensor([[0, 1, 1]], dtype=torch.int32),
                            [4, 4], 1)
    with pytest.raises(ValueError, match=r"HeightCompression needs a 3-D tensor \(spatial_shape "
                                         r"\[D, H, W\]\), got spatial_shape \[4, 4\]"):
        HeightCompression(16)(x)


def test_height_compression_refuses_a_config_dict():
    # OpenPCDet builds its class as HeightCompression(model_cfg); this one takes the count.
    with pytest.raises(TypeError, match="num_bev_features must be a positive int .*got "
                                        "\\{'NUM_BEV_FEATURES': 256\\}"):
        HeightCompression({"NUM_BEV_FEATURES": 256})


def test_height_compression_takes_numpy_ints():
    import numpy as np
    assert HeightCompression(np.int64(256)).num_bev_features == 256


def test_unet_on_an_empty_input():
    model = UNetV2(4, [64, 64, 40], return_encoded_tensor=False).eval()
    empty = spconv.SparseConvTensor(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32),
                                    model.sparse_shape, 1)
    with torch.no_grad():
        assert model(empty)["point_features"].shape == (0, 16)


def test_sparse_basic_block_default_has_openpcdet_bias():
    # OpenPCDet's block gives its convs a bias whenever it has a norm, which it always has.
    block = SparseBasicBlock(16, 16)
    assert block.conv1.bias is not None and block.conv2.bias is not None
    assert SparseBasicBlock(16, 16, bias=False).conv1.bias is None


def test_unet_rows_and_gradients():
    torch.manual_seed(0)
    model = UNetV2(4, [64, 64, 40], return_encoded_tensor=False)
    x = _input(model, count=400)
    out = model(x)
    assert out["point_tensor"].indices is x.indices or torch.equal(out["point_tensor"].indices,
                                                                   x.indices)
    assert out["point_features"].shape == (400, 16)
    out["point_features"].square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_unet_encoded_tensor():
    model = UNetV2(4, KITTI_GRID).eval()
    with torch.no_grad():
        out = model(_input(model))
    assert out["encoded_spconv_tensor"].spatial_shape == [2, 200, 176]


def test_sparse_basic_block_downsample():
    torch.manual_seed(0)
    down = spconv.SparseSequential(spconv.SubMConv3d(8, 16, 1, bias=False), nn.BatchNorm1d(16))
    block = SparseBasicBlock(8, 16, downsample=down, indice_key="r").eval()
    gen = make_gen("block")
    sites = random_sites(gen, 1, (6, 6, 6), 0.3)
    x = spconv.SparseConvTensor(randn(gen, len(sites), 8, dtype=torch.float32), sites,
                                [6, 6, 6], 1)
    with torch.no_grad():
        y = block(x)
        main = block.bn2(block.conv2(block.conv1(x).replace_feature(
            block.relu(block.bn1(block.conv1(x).features)))).features)
        expected = torch.relu(main + down(x).features)
    torch.testing.assert_close(y.features, expected)
    assert isinstance(block, spconv.SparseModule)


def test_grid_size_validation():
    with pytest.raises(ValueError, match="grid_size"):
        VoxelBackBone8x(4, [10, 10])


def test_voxelnext_kernel_sizes():
    model = VoxelResBackBone8xVoxelNeXt(4, KITTI_GRID, spconv_kernel_sizes=(5, 5, 3, 3))
    state = model.state_dict()
    assert list(state["conv2.0.0.weight"].shape) == [32, 5, 5, 5, 16]
    assert list(state["conv3.0.0.weight"].shape) == [64, 5, 5, 5, 32]
    assert list(state["conv6.0.0.weight"].shape) == [128, 3, 3, 3, 128]
    with pytest.raises(ValueError, match=r"channels\[3\] and channels\[4\] must be equal"):
        VoxelResBackBone8xVoxelNeXt(4, KITTI_GRID, channels=(16, 32, 64, 128, 256))


def test_voxelnext_merges_levels_onto_one_bev_grid():
    torch.manual_seed(0)
    model = VoxelResBackBone8xVoxelNeXt(4, KITTI_GRID)
    x = _input(model, count=400)
    out = model(x)
    x_conv4 = out["multi_scale_3d_features"]["x_conv4"]
    assert x_conv4.spatial_shape == [6, 200, 176]  # levels 5 and 6 scaled onto level 4
    assert x_conv4.features.shape[0] == x_conv4.indices.shape[0]
    assert ((x_conv4.indices[:, 1:] >= 0)
            & (x_conv4.indices[:, 1:] < torch.tensor([6, 200, 176]))).all()
    encoded = out["encoded_spconv_tensor"]
    assert encoded.spatial_shape == [200, 176] and encoded.indices.shape[1] == 3
    assert len(torch.unique(encoded.indices, dim=0)) == len(encoded.indices)
    encoded.features.square().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# Parameter names and shapes of Pointcept's SpUNet-v1m1 (default channels and layers).
POINTCEPT_KEYS = {
    "conv_input.0.weight": [32, 5, 5, 5, 6],
    "down.0.0.weight": [32, 2, 2, 2, 32],
    "enc.3.block5.conv2.weight": [256, 3, 3, 3, 256],
    "up.0.0.weight": [96, 2, 2, 2, 96],
    "up.3.0.weight": [256, 2, 2, 2, 256],
    "dec.0.block0.proj.0.weight": [96, 1, 1, 1, 128],
    "dec.0.block0.proj.1.running_var": [96],
    "dec.3.block0.proj.0.weight": [256, 1, 1, 1, 384],
    "dec.3.block1.bn1.weight": [256],
    "final.weight": [13, 1, 1, 1, 96],
    "final.bias": [13],
}


def test_pointcept_parameter_names():
    model = SpUNetBase(6, 13)
    state = model.state_dict()
    for key, shape in POINTCEPT_KEYS.items():
        assert list(state[key].shape) == shape, key
    assert "enc.0.block0.proj.0.weight" not in state  # an identity shortcut
    assert sum(isinstance(m, spconv.conv.SparseConvolution) and m.conv1x1
               for m in model.modules()) == 5


def test_spunet_rows_and_gradients():
    torch.manual_seed(0)
    model = SpUNetBase(4, 5, base_channels=8, channels=(8, 16, 16, 8), layers=(1, 1, 1, 1))
    gen = make_gen("spunet")
    sites = random_sites(gen, 2, (12, 10, 14), count=300)
    x = model.input_tensor(randn(gen, 300, 4, dtype=torch.float32), sites, 2)
    assert x.spatial_shape == (sites[:, 1:].max(dim=0).values + 96).tolist()
    out = model(x)
    assert torch.equal(out.indices, sites) and out.features.shape == (300, 5)
    out.features.square().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_spunet_starts_as_pointcept_initialises_it():
    torch.manual_seed(0)
    model = SpUNetBase(6, 13)
    assert (model.in_channels, model.num_classes, model.base_channels) == (6, 13, 32)
    assert list(model.channels) == [32, 64, 128, 256, 256, 128, 96, 96]
    assert not model.final.bias.any()  # zero biases
    # submanifold convs: truncated normal, std 0.02
    for weight in (model.final.weight.detach(), model.conv_input[0].weight.detach(),
                   model.enc[3].block5.conv2.weight.detach()):
        assert weight.abs().max() <= 2.0 and 0.015 < float(weight.std()) < 0.025
    norm = model.dec[0].block0.proj[1]
    assert bool((norm.weight == 1).all()) and not norm.bias.any()
    # strided convs keep the default initialisation (kaiming uniform over the fan-in)
    down = model.down[1][0].weight.detach()
    assert float(down.abs().max()) <= 1 / (32 * 8) ** 0.5 and float(down.std()) > 0.025


def test_unet_point_coords_are_voxel_centres():
    model = UNetV2(4, [64, 64, 40], return_encoded_tensor=False, voxel_size=[0.05, 0.05, 0.1],
                   point_cloud_range=[0, -40, -3, 70.4, 40, 1]).eval()
    x = _input(model, count=50)
    with torch.no_grad():
        coords = model(x)["point_coords"]
    site = x.indices[7].tolist()  # (batch, z, y, x)
    expected = [site[0], (site[3] + 0.5) * 0.05, (site[2] + 0.5) * 0.05 - 40,
                (site[1] + 0.5) * 0.1 - 3]
    assert coords.shape == (50, 4) and coords.dtype == torch.float32
    torch.testing.assert_close(coords[7], torch.tensor(expected))
    with pytest.raises(ValueError, match="give both or neither"):
        UNetV2(4, [64, 64, 40], voxel_size=[0.05, 0.05, 0.1])
