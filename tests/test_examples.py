"""The core path of every example, at a size that runs in seconds: segmentation training and
checkpoint round trip, detection backbone to BEV picture, DDP against single-process
training, SyncBatchNorm conversion inside SparseSequential."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import lidar_file, make_gen, randn, random_sites
from torch import nn

import spconv_lite.pytorch as spconv
from spconv_lite.models import VoxelBackBone8x


def test_segmentation_fits_a_crop(tmp_path):
    import segmentation
    from lidar_data import load_points, load_semantic_labels

    points = load_points(lidar_file("semantickitti_000000.bin"))
    labels = load_semantic_labels(lidar_file("semantickitti_000000.label"))
    torch.manual_seed(0)
    # A 16 x 16 m patch in front of the car (road, sidewalk, vegetation, cars, ...).
    result = segmentation.fit_frame(points, labels, 0.2, [4.0, -8.0, -4.0, 20.0, 8.0, 2.4],
                                    iters=8, lr=0.03, checkpoint=tmp_path / "seg.pth",
                                    log=lambda *_: None)
    losses = result["losses"]
    assert losses[-1] < 0.6 * losses[0], losses
    assert result["accuracy"] > result["majority_accuracy"]
    assert result["reload_identical"]
    assert (tmp_path / "seg.pth").is_file()


def test_semantic_label_mapping():
    from lidar_data import IGNORE, load_semantic_labels

    path = lidar_file("semantickitti_000000.label")
    raw = np.fromfile(path, dtype=np.uint32) & 0xFFFF
    mapped = load_semantic_labels(path)
    # README counts: 40 (road) 20975 points -> class 8; 252 (moving car) joins car (0).
    assert (mapped[raw == 40] == 8).all() and (raw == 40).sum() == 20975
    assert (mapped[raw == 252] == 0).all() and (mapped[raw == 10] == 0).all()
    assert (mapped[np.isin(raw, [0, 1, 52, 99])] == IGNORE).all()


def test_voxelize_point_voxel_id():
    from lidar_data import voxelize

    gen = np.random.default_rng(0)
    points = gen.uniform(-1, 3, size=(500, 4)).astype(np.float32)
    voxels = voxelize(points, [0.5, 0.5, 0.5], [0, 0, 0, 2, 2, 2])
    ids = voxels.point_voxel_id.numpy()
    inside = ((points[:, :3] >= 0) & (points[:, :3] < 2)).all(axis=1)
    assert ((ids >= 0) == inside).all()
    coords = voxels.coords.numpy()
    expected = np.floor(points[inside, :3] / np.float32(0.5)).astype(np.int64)[:, ::-1]
    assert (coords[ids[inside]] == expected).all()
    # Each voxel's feature is the mean of its points.
    for v in range(len(coords)):
        np.testing.assert_allclose(voxels.features[v].numpy(), points[ids == v].mean(0),
                                   rtol=1e-5, atol=1e-6)


def test_detection_backbone_example(tmp_path):
    import detection_backbone

    out_png = tmp_path / "bev.png"
    result = detection_backbone.main(["--file", str(lidar_file(
        "kitti_000008_reduced_mmdet3d_demo.bin")), "--out", str(out_png), "--warmup", "0"])
    assert result["bev"].shape == (1, 256, 200, 176)
    assert (result["bev"].abs().sum(1) > 0).sum() > 1000
    assert {"voxelize", "backbone.conv1", "backbone.conv_out", "height compression"} <= set(
        result["times"])
    raw = out_png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    assert int.from_bytes(raw[16:20], "big") == 600 and int.from_bytes(raw[20:24], "big") == 528


def test_voxelize_file_example(capsys):
    import voxelize_file

    path = lidar_file("kitti_object_training_000000.bin")
    result = voxelize_file.main([str(path)])
    assert result["encoded"].spatial_shape == [5, 200, 176]  # height 40 -> 5, stride 8
    assert result["bev"].shape == (1, 64 * 5, 200, 176)
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    low, high = np.array(voxelize_file.POINT_RANGE[:3]), np.array(voxelize_file.POINT_RANGE[3:])
    outside = ((points[:, :3] < low) | (points[:, :3] >= high)).any(1)
    scores = result["point_scores"].numpy()
    assert len(scores) == len(points)
    assert np.isnan(scores[outside]).all()  # no voxel, so the fill value
    assert np.isfinite(scores).sum() > 0.9 * (~outside).sum()
    assert "PointToVoxel:" in capsys.readouterr().out


def test_detection_backbone_reads_a_pcd_file(tmp_path):
    """--file goes through spconv_lite.io: a .pcd (x, y, z, intensity) gives the same BEV map
    as the same points in a raw .bin."""
    import detection_backbone
    from lidar_data import load_points
    from test_io import write_pcd


    points = load_points(lidar_file("kitti_000008_reduced_mmdet3d_demo.bin"))[::4]
    write_pcd(tmp_path / "frame.pcd", ["x", "y", "z", "intensity"], points)
    points.tofile(tmp_path / "frame.bin")
    bevs = [detection_backbone.main(["--file", str(tmp_path / name), "--out",
                                     str(tmp_path / "bev.png"), "--warmup", "0"])["bev"]
            for name in ("frame.pcd", "frame.bin")]
    torch.testing.assert_close(bevs[0], bevs[1], rtol=0, atol=0)


@pytest.mark.parametrize("case, content, message", [
    ("missing", None, r"no such point cloud file: '.*missing\.bin'"),
    ("wrong width", np.hstack([np.random.default_rng(0).uniform(0, 40, (600, 5)),
                               np.full((600, 1), 1.5e15)]).astype(np.float32),
     r"read as 4 float32 columns \(the \.bin default\).*pass --point-dims 6$"),
    ("empty", np.zeros((0, 4), dtype=np.float32), r"holds no points"),
])  # fmt: skip
def test_detection_backbone_bad_file_one_line_error(tmp_path, capsys, case, content, message):
    import detection_backbone

    path = tmp_path / "missing.bin"
    if content is not None:
        content.tofile(path)
    with pytest.raises(SystemExit) as info:
        detection_backbone.main(["--file", str(path), "--out", str(tmp_path / "bev.png")])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(r"^detection_backbone\.py: error: .*" + message, err.strip()), err
    assert err.count(str(path)) == 1, err


def test_detection_backbone_loads_openpcdet_checkpoint(tmp_path):
    """An OpenPCDet-style checkpoint (backbone_3d.* inside model_state, spconv 1.x layout)
    gives the same BEV map as the original weights."""
    import detection_backbone

    frame = lidar_file("kitti_000008_reduced_mmdet3d_demo.bin")
    torch.manual_seed(5)
    source = VoxelBackBone8x(4, [1408, 1600, 40])
    state = {f"backbone_3d.{k}": (v.permute(1, 2, 3, 4, 0) if v.dim() == 5 else v)
             for k, v in source.state_dict().items()}  # [C_out,*k,C_in] -> [*k,C_in,C_out]
    state["dense_head.conv_cls.weight"] = torch.zeros(2, 256, 1, 1)
    torch.save({"model_state": state, "epoch": 80}, tmp_path / "ckpt.pth")
    loaded = detection_backbone.main(["--file", str(frame), "--out", str(tmp_path / "a.png"),
                                      "--checkpoint", str(tmp_path / "ckpt.pth"),
                                      "--source", "spconv1", "--warmup", "0"])
    from lidar_data import KITTI_POINT_RANGE, KITTI_VOXEL_SIZE, crop, load_points, voxelize

    points, _ = crop(load_points(frame), KITTI_POINT_RANGE)
    voxels = voxelize(points, KITTI_VOXEL_SIZE, KITTI_POINT_RANGE)
    with torch.no_grad():
        enc = source.eval()(source.input_tensor(voxels.features, voxels.batch_coords(), 1))
    expected = enc["encoded_spconv_tensor"].dense().flatten(1, 2)
    torch.testing.assert_close(loaded["bev"], expected)


def test_ddp_gradients_equal_single_process():
    import ddp_train

    result = ddp_train.main(["--samples", "2", "--world-size", "2", "--azimuth", "200",
                             "--timeout", "150"])
    assert result["rank_diff"] == 0.0  # DDP leaves the same averaged gradient on every rank
    assert result["grad_diff"] < 1e-4, result["grad_diff"]
    assert result["state_diff"] < 1e-4
    single = result["single"]
    assert len(result["ranks"][0]["grads"]) == len(single["grads"]) > 50


def test_sync_batchnorm_conversion_inside_sparse_sequential():
    """convert_sync_batchnorm reaches the BatchNorm layers inside SparseSequential (and the
    residual blocks), keeps every parameter name, and the converted model computes the same
    thing. Only the conversion runs here: PyTorch's SyncBatchNorm synchronises only on GPUs,
    and spconv_lite has no CUDA kernels yet."""
    from segmentation import SegmentationNet

    torch.manual_seed(0)
    model = SegmentationNet([32, 32, 20], num_classes=3)
    names = list(model.state_dict())
    before = sum(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert before == 27  # UNetV2 without conv_out: 27 conv + BatchNorm + ReLU units
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == before
    assert not any(type(m) is nn.BatchNorm1d for m in converted.modules())
    assert isinstance(converted.unet.conv2[0][1], nn.SyncBatchNorm)  # inside SparseSequential
    assert isinstance(converted.unet.conv2[0], spconv.SparseSequential)
    assert list(converted.state_dict()) == names

    gen = make_gen("syncbn")
    sites = random_sites(gen, 1, (21, 32, 32), count=300)
    x = spconv.SparseConvTensor(randn(gen, len(sites), 4, dtype=torch.float32), sites,
                                [21, 32, 32], 1)
    torch.manual_seed(0)
    reference = SegmentationNet([32, 32, 20], num_classes=3).eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x))


@pytest.mark.parametrize("option, message", [
    (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["--threads", "two"], "argument --threads: expected an integer, got 'two'"),
])  # fmt: skip
def test_demo_refuses_bad_options_by_name(option, message):
    demo = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
    # The checkout's spconv_lite, installed or not (as the in-process example tests use it).
    path = os.pathsep.join(filter(None, [str(demo.parents[1]), os.environ.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(demo), *option], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": path})
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
