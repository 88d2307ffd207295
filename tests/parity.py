"""Shared machinery of the parity tests against spconv 2.3.8 on real LiDAR frames
(test_models_parity.py, test_client_parity.py): the same architecture built from spconv's
layers and from spconv_lite's, the same random weights, the same voxels -> the same output
sites and features.

The weights travel the way a user's would: the spconv model's ``state_dict`` is saved with
``torch.save``, loaded back and given to the spconv_lite model with
``load_state_dict(strict=True)`` (:func:`load_spconv_checkpoint`), so these tests also check
that spconv 2.x checkpoints load as they are.

**Modes** (:func:`run_both`). Both models are in eval mode, so BatchNorm normalises with the
(random) running statistics of the checkpoint, which checks that those load too. spconv 2.3.8
cannot run a conv with a bias in eval mode on the CPU (its inference path fuses the bias into a
GPU-only kernel), so on the spconv side the conv layers alone are switched back to training
mode: for a sparse conv the flag only selects where spconv adds the bias, and changes no
arithmetic (there is no dropout or statistics in a conv). spconv runs with one thread (its CPU
conv races with more).

**Metric** (:func:`rel_err`). For each compared tensor: max |ours - spconv| / max |spconv| over
all its entries, after sorting both sides' rows by (batch, z, y, x) (spconv's regular conv
emits sites in hash order, ours sorted). The sites themselves must be identical.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from helpers import lidar_file, num_threads
from lidar_data import (
    KITTI_POINT_RANGE,
    KITTI_VOXEL_SIZE,
    NUSCENES_POINT_RANGE,
    NUSCENES_VOXEL_SIZE,
    crop,
    load_points,
    voxelize,
)
from torch import nn

TOLERANCE = 1e-5
SEMANTICKITTI = ([0.2, 0.2, 0.2], [-51.2, -51.2, -4.0, 51.2, 51.2, 2.4])

# name -> (files in the batch, voxel size, point range)
FRAMES = {
    "kitti_000008": (["kitti_000008_reduced_mmdet3d_demo.bin"], KITTI_VOXEL_SIZE,
                     KITTI_POINT_RANGE),
    "kitti_000000+000008": (["kitti_object_training_000000.bin",
                             "kitti_000008_reduced_mmdet3d_demo.bin"], KITTI_VOXEL_SIZE,
                            KITTI_POINT_RANGE),
    "nuscenes": (["nuscenes_LIDAR_TOP_1532402927647951.pcd.bin"], NUSCENES_VOXEL_SIZE,
                 NUSCENES_POINT_RANGE),
    "semantickitti": (["semantickitti_000000.bin"], *SEMANTICKITTI),
    "waymo": (["waymo_mmdet3d_test_1000000.bin"], [0.1, 0.1, 0.15],
              [-75.2, -75.2, -2.0, 75.2, 75.2, 4.0]),
}


@lru_cache(maxsize=None)
def frame(name: str):
    """Voxel features, (batch, z, y, x) coordinates, batch size and grid of a frame."""
    files, voxel_size, point_range = FRAMES[name]
    features, coords = [], []
    for b, file in enumerate(files):
        points, _ = crop(load_points(lidar_file(file)), point_range)
        voxels = voxelize(points, voxel_size, point_range)
        features.append(voxels.features)
        coords.append(voxels.batch_coords(b))
    return torch.cat(features), torch.cat(coords), len(files), voxels.grid_size


def randomize(model: nn.Module, seed: int) -> None:
    """Seeded weights and BatchNorm statistics of a typical size (conv weights with the
    He-normal scale of their fan-in)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    def uniform(t, low, high):
        t.copy_(low + (high - low) * torch.rand(t.shape, generator=gen))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                uniform(module.weight, 0.5, 1.5)
                normal(module.bias, 0.1)
                normal(module.running_mean, 0.1)
                uniform(module.running_var, 0.5, 2.0)
            elif hasattr(module, "weight") and getattr(module, "weight", None) is not None \
                    and module.weight.dim() >= 3:
                normal(module.weight, (2.0 / module.weight[0].numel()) ** 0.5)
                if module.bias is not None:
                    normal(module.bias, 0.1)


def saved_and_loaded(state_dict: dict) -> dict:
    """A state dict after a trip through ``torch.save`` / ``torch.load`` (a checkpoint file)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def load_spconv_checkpoint(ours: nn.Module, theirs: nn.Module) -> None:
    """Gives ``ours`` the spconv model's weights through a checkpoint file, strictly."""
    ours.load_state_dict(saved_and_loaded(theirs.state_dict()), strict=True)


def run_both(ours: nn.Module, theirs: nn.Module, spconv_ref, forward: Callable):
    """``forward(model)`` of both models in eval mode (see the module docstring), without
    gradients, spconv on one thread."""
    ours.eval()
    theirs.eval()
    for module in theirs.modules():
        if isinstance(module, spconv_ref.conv.SparseConvolution):
            module.train()  # the bias path only
    with torch.no_grad():
        out_ours = forward(ours)
        with num_threads(1):
            out_ref = forward(theirs)
    return out_ours, out_ref


def sorted_rows(t):
    """Rows of a sparse tensor sorted by (batch, z, y, x), stably: indices and features."""
    idx = t.indices.cpu().numpy()
    order = torch.from_numpy(np.lexsort(idx.T[::-1]).copy())
    return t.indices[order], t.features[order]


def rel_err(ours, ref) -> float:
    """The metric of the module docstring; asserts that the sites are identical."""
    oi, of = sorted_rows(ours)
    ri, rf = sorted_rows(ref)
    assert torch.equal(oi.int(), ri.int()), "output sites differ"
    return ((of - rf).abs().max() / rf.abs().max()).item()


def report(capsys, title: str, errors: dict, sites: dict) -> None:
    """Prints the errors and site counts of one comparison (shown with ``-s`` or not)."""
    with capsys.disabled():
        print(f"\n[parity] {title}; max rel err "
              + ", ".join(f"{k} {errors[k]:.1e} ({sites[k]} sites)" for k in errors))


# ------------------------------------------------------------------ the client stacks' models

# Pointcept's SpUNet structure (five 1x1 layers: four decoder shortcuts and `final`), narrower
# and one block per level, so that a real frame runs in seconds.
SPUNET_CONFIG = dict(base_channels=16, channels=(16, 32, 64, 64, 64, 32, 24, 24),
                     layers=(1, 1, 1, 1, 1, 1, 1, 1))


class VoxelNeXtWithHead(nn.Module):
    """VoxelNeXt's backbone and the sparse part of its head as OpenPCDet uses it: per head
    group, per output, a plain ``nn.Sequential`` of a keyed 3x3 ``SubMConv2d`` block and a 1x1
    ``SubMConv2d`` (key ``<name>out``) on the encoded BEV tensor; the two groups reuse the same
    keys on that tensor, as OpenPCDet's heads for different classes do."""

    OUTPUTS = {"center": 2, "hm": 3}

    def __init__(self, grid, spconv, **config):
        super().__init__()
        from spconv_lite.models import VoxelResBackBone8xVoxelNeXt

        sp = spconv
        self.backbone = VoxelResBackBone8xVoxelNeXt(4, grid, spconv=spconv, **config)
        channels = self.backbone.num_point_features
        self.heads = nn.ModuleList(nn.ModuleDict({
            name: nn.Sequential(
                sp.SparseSequential(
                    sp.SubMConv2d(channels, channels, 3, padding=1, bias=False, indice_key=name),
                    nn.BatchNorm1d(channels), nn.ReLU()),
                sp.SubMConv2d(channels, out, 1, bias=True, indice_key=name + "out"))
            for name, out in self.OUTPUTS.items()}) for _ in range(2))

    def input_tensor(self, *args):
        return self.backbone.input_tensor(*args)

    def forward(self, x) -> dict:
        out = self.backbone(x)
        encoded = out["encoded_spconv_tensor"]
        tensors = {"encoded": encoded, **out["multi_scale_3d_features"]}
        for g, group in enumerate(self.heads):
            tensors.update({f"head{g}.{name}": head(encoded) for name, head in group.items()})
        return tensors


class SpUNetScores(nn.Module):
    """Pointcept's ``SpUNetBase`` (19 classes, :data:`SPUNET_CONFIG`) with the dict output of
    the other parity models."""

    def __init__(self, spconv):
        super().__init__()
        from spconv_lite.models import SpUNetBase

        self.net = SpUNetBase(4, 19, spconv=spconv, **SPUNET_CONFIG)

    def input_tensor(self, *args):
        return self.net.input_tensor(*args)

    def forward(self, x) -> dict:
        return {"scores": self.net(x)}


# OpenPCDet's VoxelNeXt configurations: nuScenes (the defaults) and Waymo's large model.
VOXELNEXT_CONFIGS = {
    "voxelnext": {},
    "voxelnext_waymo_large": dict(spconv_kernel_sizes=(5, 5, 3, 3), out_channel=256,
                                  channels=(32, 64, 128, 256, 256)),
}


def client_model(name: str, spconv, grid) -> nn.Module:
    """A client stack's model built from the layer namespace ``spconv``: ``"spunet"`` or a
    VoxelNeXt configuration (:data:`VOXELNEXT_CONFIGS`).
    ``forward(model.input_tensor(features, coords, batch_size))`` gives a dict of sparse
    tensors."""
    if name == "spunet":
        return SpUNetScores(spconv)
    return VoxelNeXtWithHead(grid, spconv, **VOXELNEXT_CONFIGS[name])
