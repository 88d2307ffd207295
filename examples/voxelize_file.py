"""Voxelize a point-cloud file and run it through a small sparse network.

Steps: read a LiDAR file (``spconv_lite.io``: .bin, .pcd.bin, .npy/.npz, .pcd/.ply), voxelize
it with ``PointToVoxel`` (spconv 2.x's API and output) using OpenPCDet's KITTI grid, batch the
voxels into a ``SparseConvTensor`` with the mean of each voxel's points as features, run a small
SECOND-style encoder (submanifold and strided sparse convs), collapse height into a
bird's-eye-view map, and map a per-voxel result back to the points (``voxel_to_point``), as a
segmentation head would.

Run from the repository root (the default input is the KITTI frame of the shared test data):

    python examples/voxelize_file.py [PATH] [--point-dims 4]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

import spconv_lite as spconv
from spconv_lite.io import read_points

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = (
    Path(os.environ.get("SPCONV_LITE_DATA") or REPO.parent / "shared" / "data" / "lidar")
    / "kitti_object_training_000000.bin"
)
VOXEL_SIZE = [0.05, 0.05, 0.1]  # x, y, z (metres)
POINT_RANGE = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]  # x, y, z min then max


def block(conv: nn.Module, channels: int) -> spconv.SparseSequential:
    return spconv.SparseSequential(conv, nn.BatchNorm1d(channels), nn.ReLU())


def encoder(in_channels: int) -> spconv.SparseSequential:
    """x1 -> x2 -> x4 -> x8 with 16 / 32 / 64 / 64 channels; height 40 -> 5."""
    return spconv.SparseSequential(
        block(spconv.SubMConv3d(in_channels, 16, 3, bias=False, indice_key="subm1"), 16),
        block(spconv.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False), 32),
        block(spconv.SubMConv3d(32, 32, 3, bias=False, indice_key="subm2"), 32),
        block(spconv.SparseConv3d(32, 64, 3, stride=2, padding=1, bias=False), 64),
        block(spconv.SubMConv3d(64, 64, 3, bias=False, indice_key="subm4"), 64),
        block(spconv.SparseConv3d(64, 64, 3, stride=2, padding=1, bias=False), 64),
    )


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the steps and prints them; returns the encoder output, the BEV map and the
    per-point scores (for the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--point-dims", type=int, default=None, help="columns of a .bin file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    points = torch.from_numpy(read_points(args.path, args.point_dims))
    print(f"{args.path.name}: {len(points):,} points with {points.shape[1]} values each")

    voxelizer = spconv.PointToVoxel(VOXEL_SIZE, POINT_RANGE, points.shape[1], 40000, 5)
    start = time.perf_counter()
    voxels, coords, num, point_voxel = voxelizer.generate_voxel_with_id(points)
    elapsed = (time.perf_counter() - start) * 1e3
    print(f"PointToVoxel: {len(coords):,} voxels of grid {voxelizer.grid_size} (z, y, x), "
          f"{int(num.sum()):,} points stored, {int((point_voxel < 0).sum()):,} without a voxel, "
          f"{elapsed:.1f} ms")  # fmt: skip

    # One sample here; batch_point_clouds takes a list of clouds and adds the batch column.
    x = spconv.batch_point_clouds([points], voxelizer)
    print(f"SparseConvTensor: features {list(x.features.shape)}, indices "
          f"{list(x.indices.shape)}, spatial_shape {x.spatial_shape}")  # fmt: skip

    net = encoder(points.shape[1]).eval()
    with torch.no_grad():
        start = time.perf_counter()
        y = net(x)
        elapsed = (time.perf_counter() - start) * 1e3
        bev = y.dense()  # [B, C, D, H, W]
        batch, channels, depth, height, width = bev.shape
        bev = bev.reshape(batch, channels * depth, height, width)
    print(f"encoder: {len(y.indices):,} active sites at stride 8, spatial_shape "
          f"{y.spatial_shape}, {elapsed:.0f} ms; BEV map {list(bev.shape)}")  # fmt: skip

    # A per-voxel score (here: the first encoder layer's output norm) back on every point.
    with torch.no_grad():
        voxel_scores = net[0](x).features.norm(dim=1)
    point_scores = spconv.voxel_to_point(voxel_scores, point_voxel, fill_value=float("nan"))
    print(f"per-point scores: {int(torch.isfinite(point_scores).sum()):,} of "
          f"{len(point_scores):,} points got their voxel's score")  # fmt: skip
    return {"encoded": y, "bev": bev, "point_scores": point_scores}


if __name__ == "__main__":
    main()
