"""Parity with spconv 2.3.8 of OpenPCDet's backbones (``spconv_lite.models``) on real LiDAR
frames: one definition of each architecture built from spconv's layers and from spconv_lite's,
spconv's checkpoint loaded strictly (the machinery and the metric: tests/parity.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import require_spconv
from parity import (
    TOLERANCE,
    frame,
    load_spconv_checkpoint,
    randomize,
    rel_err,
    report,
    run_both,
)

from spconv_lite.models import UNetV2, VoxelBackBone8x, VoxelResBackBone8x

pytestmark = pytest.mark.parity

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


def _outputs(out: dict) -> dict:
    """The sparse tensors of a model's output dict, by name."""
    tensors = {"encoded": out.get("encoded_spconv_tensor"), "points": out.get("point_tensor")}
    tensors.update(out.get("multi_scale_3d_features", {}))
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize("cls,frame_name", CASES, ids=[f"{c.__name__}-{f}" for c, f in CASES])
def test_model_parity(cls, frame_name, capsys):
    spconv_ref = require_spconv()
    features, coords, batch_size, grid = frame(frame_name)
    theirs = cls(4, grid, spconv=spconv_ref)
    assert isinstance(theirs.conv_input[0], spconv_ref.SubMConv3d)
    randomize(theirs, seed=len(frame_name))
    ours = cls(4, grid)
    load_spconv_checkpoint(ours, theirs)
    out_ours, out_ref = run_both(ours, theirs, spconv_ref, lambda model: _outputs(
        model(model.input_tensor(features, coords, batch_size))))
    assert out_ours.keys() == out_ref.keys()
    errors = {name: rel_err(out_ours[name], out_ref[name]) for name in out_ref}
    report(capsys, f"{cls.__name__} {frame_name}: {len(features)} voxels", errors,
           {k: v.indices.shape[0] for k, v in out_ref.items()})
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


def test_blocks_of_another_namespace_pickle():
    """A network built with spconv's namespace pickles (torch.save(model), spawned processes)
    although its blocks' classes are made at run time."""
    import copy
    import pickle

    spconv_ref = require_spconv()
    model = VoxelResBackBone8x(4, [16, 16, 9], spconv=spconv_ref)
    for loaded in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(loaded.conv1[0]) is type(model.conv1[0])
        assert isinstance(loaded.conv1[0], spconv_ref.SparseModule)
        for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(got, want), name
