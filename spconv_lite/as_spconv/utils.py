"""``spconv.utils``: spconv's CPU voxel generators ``Point2VoxelCPU1d`` .. ``Point2VoxelCPU4d``.

They wrap :class:`spconv_lite.PointToVoxel` (the same voxels, coordinates and counts as spconv)
with the constructor and methods of spconv's C++ classes, which OpenPCDet's data pipeline
uses: ``Point2VoxelCPU3d(vsize_xyz=..., coors_range_xyz=..., num_point_features=...,
max_num_points_per_voxel=..., max_num_voxels=...)`` then
``point_to_voxel(tv.from_numpy(points))`` and ``.numpy()`` on the three results.

spconv's classes take and return cumm ``tensorview`` tensors. These take a cumm tensor (when
cumm is installed), a numpy array or a torch tensor, and return the same kind; spconv_lite
itself does not need cumm.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..voxelize import PointToVoxel

__all__ = ["Point2VoxelCPU1d", "Point2VoxelCPU2d", "Point2VoxelCPU3d", "Point2VoxelCPU4d"]


def _is_cumm_tensor(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "cumm"


class _Point2VoxelCPU:
    """Voxel generator of spconv's ``Point2VoxelCPU{ndim}d`` (see the module docstring).

    Args:
        vsize_xyz: voxel size per axis (x, y, z, ...).
        coors_range_xyz: ``[x_min, y_min, ..., x_max, y_max, ...]``.
        num_point_features: columns of the point clouds.
        max_num_voxels: at most this many voxels per cloud.
        max_num_points_per_voxel: points kept per voxel.
    """

    ndim = 3

    def __init__(self, vsize_xyz: Sequence[float], coors_range_xyz: Sequence[float],
                 num_point_features: int, max_num_voxels: int,
                 max_num_points_per_voxel: int) -> None:
        if len(vsize_xyz) != self.ndim:
            raise ValueError(
                f"{type(self).__name__} needs {self.ndim} voxel sizes, got vsize_xyz "
                f"{list(vsize_xyz)}"
            )
        self._voxelizer = PointToVoxel(vsize_xyz, coors_range_xyz, num_point_features,
                                       max_num_voxels, max_num_points_per_voxel)

    @property
    def grid_size(self) -> list[int]:
        """Voxels per axis, last axis (x) last, as spconv's ``grid_size``."""
        return list(self._voxelizer.grid_size)

    def point_to_voxel(self, points, clear_voxels: bool = True) -> tuple:
        """``(voxels [M, P, C] float32, coordinates [M, ndim] int32 (z, y, x), num_points
        [M] int32)`` of one cloud, zeros in free slots; of the same kind as ``points``.
        ``clear_voxels`` is accepted for compatibility: outputs are always fresh."""
        return self._run(points, empty_mean=False)

    def point_to_voxel_empty_mean(self, points, clear_voxels: bool = True) -> tuple:
        """Like :meth:`point_to_voxel`, free slots filled with the mean of the voxel's points
        (spconv's CPU version adds the previous voxel's mean as well; this does not)."""
        return self._run(points, empty_mean=True)

    def _run(self, points, empty_mean: bool) -> tuple:
        if _is_cumm_tensor(points):
            outputs = self._voxelizer(points.numpy(), empty_mean=empty_mean)
            return tuple(_to_cumm(t.numpy()) for t in outputs)
        if isinstance(points, np.ndarray):
            outputs = self._voxelizer(points, empty_mean=empty_mean)
            return tuple(t.numpy() for t in outputs)
        if isinstance(points, torch.Tensor):
            return self._voxelizer(points, empty_mean=empty_mean)
        raise TypeError(
            f"points must be a cumm tensorview Tensor (tv.from_numpy(array)), a numpy array or "
            f"a torch tensor, got {type(points).__name__}"
        )

    def __repr__(self) -> str:
        return repr(self._voxelizer).replace("PointToVoxel", type(self).__name__, 1)


def _to_cumm(array: np.ndarray):
    """A cumm tensor that owns a copy of ``array`` (``tv.from_numpy`` would only borrow it)."""
    from cumm import tensorview as tv

    dtypes = {np.dtype(np.float32): tv.float32, np.dtype(np.int32): tv.int32}
    out = tv.zeros(list(array.shape), dtypes[array.dtype], -1)  # -1: CPU
    out.numpy_view()[...] = array
    return out


def _generator(ndim: int) -> type:
    name = f"Point2VoxelCPU{ndim}d"
    doc = f"spconv's ``{name}``: {ndim}-D voxels of point clouds on the CPU.\n\n" + (
        _Point2VoxelCPU.__doc__.split("\n\n", 1)[1])
    return type(name, (_Point2VoxelCPU,), {"ndim": ndim, "__doc__": doc,
                                           "__module__": __name__})


Point2VoxelCPU1d = _generator(1)
Point2VoxelCPU2d = _generator(2)
Point2VoxelCPU3d = _generator(3)
Point2VoxelCPU4d = _generator(4)
