"""The real LiDAR frames of shared/data/lidar and spconv 2.3.8's voxelization of them, for the
voxelizer, reader and command tests.

The folder is ``$SPCONV_LITE_DATA`` or ``<repo>/../shared/data/lidar``. Without it (or without
spconv / open3d) the tests that need it skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from helpers import lidar_data_dir, lidar_file, require

DATA_DIR = lidar_data_dir()


def unavailable(reason: str) -> None:
    """Skips the test, or fails it in CI where everything must be present."""
    require(False, reason)


data_file = lidar_file


def require_open3d() -> None:
    try:
        import open3d  # noqa: F401
    except ImportError:
        unavailable("open3d is not installed (pip install 'spconv_lite[io]')")


def spconv_point_to_voxel():
    """spconv 2.3.8's PointToVoxel class (it must run with one torch thread)."""
    try:
        from spconv.pytorch.utils import PointToVoxel
    except ImportError:
        unavailable("spconv 2.3.8 is not installed")
    return PointToVoxel


@dataclass(frozen=True)
class Frame:
    """One row of the data README's reference table (spconv 2.3.8, CPU, one thread)."""

    file: str
    point_dims: Optional[int]  # for read_points / --point-dims; None = the format's default
    vsize: tuple
    coors_range: tuple
    max_points: int
    max_voxels: int
    voxels: Optional[int]  # None where the README gives no reference
    points_kept: Optional[int]
    coords_sha16: Optional[str]

    @property
    def id(self) -> str:
        return "_".join(self.file.split("_")[:2]).split(".")[0] + f"-{self.max_voxels}"

    @property
    def path(self) -> Path:
        return data_file(self.file)

    def points(self) -> np.ndarray:
        from spconv_lite.io import read_points

        return read_points(self.path, self.point_dims)

    def cli_args(self) -> list[str]:
        args = ["--voxel-size", *map(str, self.vsize), "--range", *map(str, self.coors_range)]
        args += ["--max-points-per-voxel", str(self.max_points)]
        args += ["--max-voxels", str(self.max_voxels)]
        if self.point_dims is not None:
            args += ["--point-dims", str(self.point_dims)]
        return args


KITTI = (0.05, 0.05, 0.1), (0, -40, -3, 70.4, 40, 1)
FRAMES = [
    Frame("kitti_object_training_000000.bin", None, *KITTI, 5, 40000, 40000, 58238,
          "078e1ae131d17428"),
    Frame("kitti_object_training_000000.bin", None, *KITTI, 5, 1000000, 41281, 61603,
          "2f64d7415c7ca63c"),
    Frame("kitti_000008_reduced_mmdet3d_demo.bin", None, *KITTI, 5, 40000, 13092, 16780,
          "f871853f1d42c2c8"),
    Frame("nuscenes_LIDAR_TOP_1532402927647951.pcd.bin", None, (0.075, 0.075, 0.2),
          (-54, -54, -5, 54, 54, 3), 10, 160000, 17509, 25694, "1052f7015ac4e56a"),
    Frame("semantickitti_000000.bin", None, (0.05, 0.05, 0.05),
          (-51.2, -51.2, -4, 51.2, 51.2, 2.4), 5, 1000000, 90905, 119788, "7c798632ce4eb167"),
    Frame("waymo_mmdet3d_test_1000000.bin", 6, (0.1, 0.1, 0.15),
          (-75.2, -75.2, -2, 75.2, 75.2, 4), 5, 150000, 590, 639, "39e354cacdbc5152"),
    Frame("spconv_benchmark-pc.npz", None, (0.1, 0.1, 0.1), (-80, -80, -2, 80, 80, 6), 1,
          150000, 125562, 125562, "9d795fe05705db91"),
    Frame("fast_gicp_251370668.pcd", None, (0.1, 0.1, 0.1), (-80, -80, -10, 80, 80, 20), 5,
          1000000, 15774, 44150, "6158f67d47ee0cb7"),
    # Not in the README table: checked against spconv (and the exact voxels below) only.
    Frame("small_gicp_source.ply", None, (0.1, 0.1, 0.1), (-80, -80, -10, 80, 80, 20), 5,
          1000000, None, None, None),
]  # fmt: skip
FRAME_IDS = [f.id for f in FRAMES]


def sorted_coords_sha16(coordinates: torch.Tensor) -> str:
    """The README's hash: sha256 of the int32 (z, y, x) rows sorted lexicographically."""
    coords = coordinates.numpy().astype(np.int32)
    coords = coords[np.lexsort(coords.T[::-1])]
    return hashlib.sha256(np.ascontiguousarray(coords).tobytes()).hexdigest()[:16]


# A few voxels of spconv 2.3.8's output, written down: (frame index in FRAMES, voxel row,
# coordinates z, y, x, stored points, file rows of the stored points in slot order).
EXACT_VOXELS = [
    (0, 0, (38, 800, 366), 1, (0,)),
    (0, 6929, (31, 877, 42), 5, (15785, 15786, 17654, 17655, 17656)),  # 7 points, first 5 kept
    (0, 39999, (17, 735, 1), 4, (108874, 110238, 110239, 110240)),  # the last one under the cap
    (3, 0, (15, 714, 678), 8, (0, 32, 64, 96, 33920, 33952, 33984, 34016)),
    (3, 17508, (34, 720, 531), 1, (34685,)),
    (4, 84152, (48, 945, 968), 5, (106408, 106409, 106410, 108176, 108177)),
    (5, 295, (33, 976, 818), 1, (386,)),
    (8, 0, (84, 825, 800), 5, (0, 32, 64, 96, 128)),  # 13 points, first 5 kept
    (8, 15950, (91, 826, 799), 1, (69748,)),
]


class SpconvCache:
    """spconv's output per frame, computed once per test session: each spconv PointToVoxel
    allocates a dense grid of the whole volume (up to 3 GB here), freed right after use."""

    _outputs: dict = {}

    @classmethod
    def voxelize(cls, frame: Frame, points: np.ndarray) -> tuple:
        if frame.id not in cls._outputs:
            reference = spconv_point_to_voxel()(
                list(frame.vsize), list(frame.coors_range), points.shape[1], frame.max_voxels,
                frame.max_points,
            )  # fmt: skip
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # spconv 2.3.8's CPU code is only correct on one thread
            try:
                cls._outputs[frame.id] = reference.generate_voxel_with_id(torch.from_numpy(points))
            finally:
                torch.set_num_threads(threads)
        return cls._outputs[frame.id]
