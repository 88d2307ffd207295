"""Parity with spconv 2.3.8 on real LiDAR frames: the same architecture built from spconv's
layers and from spconv_lite's (one definition in ``spconv_lite.models``, two namespaces), the
same random weights, the same voxels -> the same output sites and features.

The weights travel the way a user's would: the spconv model's ``state_dict`` is saved with
``torch.save``, loaded back and given to the spconv_lite model with
``load_state_dict(strict=True)``, so these tests also check that spconv 2.x checkpoints load
as they are.

**Modes.** Both models are in eval mode, so BatchNorm normalises with the (random) running
statistics of the checkpoint, which checks that those load too. spconv 2.3.8 cannot run a conv
with a bias in eval mode on the CPU (its inference path fuses the bias into a GPU-only
kernel), so on the spconv side the conv layers alone are switched back to training mode: for a
sparse conv the flag only selects where spconv adds the bias, and changes no arithmetic
(there is no dropout or statistics in a conv). spconv runs with one thread (its CPU conv
races with more).

**Metric.** For each compared tensor: max |ours - spconv| / max |spconv| over all its
entries, after sorting both sides' rows by (batch, z, y, x) (spconv's regular conv emits sites
in hash order, ours sorted). The sites themselves must be identical.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import pytest
import torch
from helpers import lidar_file, num_threads, require_spconv
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

from spconv_lite.models import UNetV2, VoxelBackBone8x, VoxelResBackBone8x

pytestmark = pytest.mark.parity

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
}
CASES = [
    (VoxelBackBone8x, "kitti_000008"),
    (VoxelBackBone8x, "kitti_000000+000008"),
    (VoxelBackBone8x, "nuscenes"),
    (VoxelResBackBone8x, "kitti_000008"),
    (VoxelResBackBone8x, "kitti_000000+000008"),
    (VoxelResBackBone8x, "nuscenes"),
    (UNetV2, "kitti_000008"),
    (UNetV2, "semantickitti"),
]


@lru_cache(maxsize=None)
def _frame(name: str):
    """Voxel features, (batch, z, y, x) coordinates, batch size and grid of a frame."""
    files, voxel_size, point_range = FRAMES[name]
    features, coords = [], []
    for b, file in enumerate(files):
        points, _ = crop(load_points(lidar_file(file)), point_range)
        voxels = voxelize(points, voxel_size, point_range)
        features.append(voxels.features)
        coords.append(voxels.batch_coords(b))
    return torch.cat(features), torch.cat(coords), len(files), voxels.grid_size


def _randomize(model: nn.Module, seed: int) -> None:
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


def _sorted(t):
    """Rows of a sparse tensor sorted by (batch, z, y, x): indices and features."""
    idx = t.indices.cpu().numpy()
    order = torch.from_numpy(np.lexsort(idx.T[::-1]).copy())
    return t.indices[order], t.features[order]


def _rel_err(ours, ref) -> float:
    oi, of = _sorted(ours)
    ri, rf = _sorted(ref)
    assert torch.equal(oi.int(), ri.int()), "output sites differ"
    return ((of - rf).abs().max() / rf.abs().max()).item()


def _outputs(out: dict) -> dict:
    """The sparse tensors of a model's output dict, by name."""
    tensors = {"encoded": out.get("encoded_spconv_tensor"), "points": out.get("point_tensor")}
    tensors.update(out.get("multi_scale_3d_features", {}))
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize("cls,frame", CASES, ids=[f"{c.__name__}-{f}" for c, f in CASES])
def test_model_parity(cls, frame, capsys):
    spconv_ref = require_spconv()
    features, coords, batch_size, grid = _frame(frame)
    theirs = cls(4, grid, spconv=spconv_ref)
    assert isinstance(theirs.conv_input[0], spconv_ref.SubMConv3d)
    _randomize(theirs, seed=len(frame))

    # spconv checkpoint -> file -> spconv_lite model, strictly.
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = cls(4, grid)
    ours.load_state_dict(torch.load(buffer, weights_only=True), strict=True)

    ours.eval()
    theirs.eval()
    for module in theirs.modules():
        if isinstance(module, spconv_ref.conv.SparseConvolution):
            module.train()  # see the module docstring: bias path only
    with torch.no_grad():
        out_ours = _outputs(ours(ours.input_tensor(features, coords, batch_size)))
        with num_threads(1):
            out_ref = _outputs(theirs(theirs.input_tensor(features, coords, batch_size)))
    assert out_ours.keys() == out_ref.keys()
    errors = {name: _rel_err(out_ours[name], out_ref[name]) for name in out_ref}
    with capsys.disabled():
        sites = {k: v.indices.shape[0] for k, v in out_ref.items()}
        print(f"\n[parity] {cls.__name__} {frame}: {len(features)} voxels; max rel err "
              + ", ".join(f"{k} {errors[k]:.1e} ({sites[k]} sites)" for k in errors))
    assert max(errors.values()) < TOLERANCE, errors


def test_basic_block_in_spconv_sequential():
    """With spconv's namespace the residual block is also a spconv SparseModule, so spconv's
    SparseSequential hands it the sparse tensor rather than its features."""
    spconv_ref = require_spconv()
    from spconv_lite.models import SparseBasicBlock

    block = SparseBasicBlock(8, 8, indice_key="r", spconv=spconv_ref)
    assert isinstance(block, spconv_ref.SparseModule)
    assert isinstance(block.conv1, spconv_ref.SubMConv3d)
    assert type(block) is type(SparseBasicBlock(4, 4, spconv=spconv_ref))  # one class per library
