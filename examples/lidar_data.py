"""Shared by the examples and their tests: reading LiDAR frames, voxelizing them, and
SemanticKITTI labels.

:func:`voxelize` is the one place that turns points into voxels: spconv_lite's
``PointToVoxel.generate_voxel_mean`` (mean of all the points of each voxel, no caps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from spconv_lite import PointToVoxel
from spconv_lite.io import read_points

# OpenPCDet's KITTI setting (SECOND / PV-RCNN): metres, (x, y, z) min then max.
KITTI_VOXEL_SIZE = [0.05, 0.05, 0.1]
KITTI_POINT_RANGE = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]
# CenterPoint's nuScenes setting (0.075 m).
NUSCENES_VOXEL_SIZE = [0.075, 0.075, 0.2]
NUSCENES_POINT_RANGE = [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]


def data_dir() -> Path:
    """The shared LiDAR frames: ``$SPCONV_LITE_DATA``, else ``../shared/data/lidar`` beside
    the repository."""
    env = os.environ.get("SPCONV_LITE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lidar"


def load_points(path: os.PathLike) -> np.ndarray:
    """Points of one of the shared frames as ``[N, 4]`` (x, y, z, intensity), read with
    ``spconv_lite.io``: a nuScenes ``.pcd.bin`` has 5 columns (the 5th, the ring index, is
    dropped), the Waymo fixture 6, the other ``.bin`` frames 4 (KITTI, SemanticKITTI).
    """
    path = Path(path)
    point_dims = 6 if path.name.startswith("waymo") else None
    return np.ascontiguousarray(read_points(path, point_dims)[:, :4])


@dataclass
class Voxels:
    """One voxelized frame, in the layout a ``SparseConvTensor`` wants."""

    features: torch.Tensor  # float32 [M, C]: mean of the voxel's points
    coords: torch.Tensor  # int32 [M, 3]: (z, y, x)
    grid_size: list[int]  # (x, y, z), as OpenPCDet's grid_size
    point_voxel_id: torch.Tensor  # int64 [P]: voxel row of each input point, -1 outside

    def batch_coords(self, batch_index: int = 0) -> torch.Tensor:
        """``[M, 4]`` int32 (batch, z, y, x)."""
        batch = torch.full((len(self.coords), 1), batch_index, dtype=torch.int32)
        return torch.cat([batch, self.coords], dim=1)


def voxelize(points: np.ndarray, voxel_size: Sequence[float],
             point_range: Sequence[float]) -> Voxels:
    """Groups points into voxels (mean features) and records each point's voxel."""
    voxelizer = PointToVoxel(voxel_size, point_range, points.shape[1], 2**31 - 1, 1)
    features, coords, _, point_voxel_id = voxelizer.generate_voxel_mean(points)
    return Voxels(features, coords, voxelizer.geometry.grid_size, point_voxel_id)


# SemanticKITTI raw label -> 19 training classes (0..18) or IGNORE, the benchmark's
# standard mapping (moving objects merged into their static class).
IGNORE = -1
CLASS_NAMES = [
    "car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
    "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
    "vegetation", "trunk", "terrain", "pole", "traffic-sign",
]
_RAW_TO_TRAIN = {
    10: 0, 11: 1, 13: 4, 15: 2, 16: 4, 18: 3, 20: 4, 30: 5, 31: 6, 32: 7, 40: 8, 44: 9, 48: 10,
    49: 11, 50: 12, 51: 13, 60: 8, 70: 14, 71: 15, 72: 16, 80: 17, 81: 18,
    252: 0, 253: 6, 254: 5, 255: 7, 256: 4, 257: 4, 258: 3, 259: 4,
}


def load_semantic_labels(path: os.PathLike) -> np.ndarray:
    """Per-point training class (int64, IGNORE for unlabeled / outlier / other-structure /
    other-object) of a SemanticKITTI ``.label`` file."""
    raw = np.fromfile(path, dtype=np.uint32) & 0xFFFF
    lut = np.full(260, IGNORE, dtype=np.int64)
    for raw_id, train_id in _RAW_TO_TRAIN.items():
        lut[raw_id] = train_id
    out = np.full(raw.shape, IGNORE, dtype=np.int64)
    known = raw < len(lut)
    out[known] = lut[raw[known]]
    return out


def voxel_labels(point_labels: np.ndarray, point_voxel_id: np.ndarray, num_voxels: int,
                 num_classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Majority label of each voxel's labelled points (IGNORE for a voxel without any)."""
    keep = (point_voxel_id >= 0) & (point_labels != IGNORE)
    votes = np.zeros((num_voxels, num_classes), dtype=np.int64)
    np.add.at(votes, (point_voxel_id[keep], point_labels[keep]), 1)
    labels = votes.argmax(axis=1)
    labels[votes.sum(axis=1) == 0] = IGNORE
    return labels


def crop(points: np.ndarray, point_range: Sequence[float],
         labels: Optional[np.ndarray] = None):
    """The points (and labels) inside an (x, y, z) min/max box."""
    lo, hi = np.asarray(point_range[:3]), np.asarray(point_range[3:])
    keep = ((points[:, :3] >= lo) & (points[:, :3] < hi)).all(axis=1)
    return (points[keep], None if labels is None else labels[keep])
