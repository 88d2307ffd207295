"""Point clouds to voxels: spconv-compatible ``PointToVoxel``, dynamic (mean) voxelization,
mapping voxel results back to points, and batching clouds into a ``SparseConvTensor``.

The grid follows spconv 2.x exactly: sizes and range are float32, the grid has
``round((max - min) / size)`` voxels per axis (float32 quotient, halves rounded up), and a
point's voxel is ``floor((p - min) / size)`` in float32, or in float64 for float64 points.
Points whose voxel falls outside the grid (possible slightly past ``max`` when the range is not
a multiple of the size) or that hold a NaN or infinite value are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import ops
from .tensor import SparseConvTensor, check_count

__all__ = ["GridGeometry", "PointToVoxel", "batch_point_clouds", "voxel_to_point"]

PointsLike = Union[Tensor, np.ndarray]
_AXES = "xyzw"
_MAX_KEY_VOLUME = 1 << 62  # voxel keys are int64
_MAX_COORD = 2**31 - 1  # coordinates are int32


def _float32_list(values: Sequence[float], name: str, length: Optional[int] = None) -> list[float]:
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from exc
    if length is not None and len(floats) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(floats)}: {floats}")
    as32 = np.asarray(floats, dtype=np.float32)
    if not np.isfinite(as32).all():
        raise ValueError(f"{name} must be finite in float32, got {floats}")
    return [float(v) for v in as32]


@dataclass(frozen=True)
class GridGeometry:
    """A checked voxel grid, per axis in x, y, z order (float32 values as Python floats)."""

    voxel_size: list[float]
    range_min: list[float]
    range_max: list[float]
    grid_size: list[int]

    @classmethod
    def from_spconv_args(
        cls, vsize_xyz: Sequence[float], coors_range_xyz: Sequence[float]
    ) -> "GridGeometry":
        """Checks spconv's ``vsize_xyz`` / ``coors_range_xyz`` and computes the grid.

        Raises:
            ValueError: naming the argument, for a size that is not positive, a range whose max
                is not above its min or that holds less than half a voxel, or a grid too large
                for int32 coordinates / int64 voxel keys.
        """
        size = _float32_list(vsize_xyz, "vsize_xyz")
        ndim = len(size)
        if not 1 <= ndim <= 4:
            raise ValueError(f"vsize_xyz must have 1 to 4 entries, got {ndim}: {size}")
        if any(s <= 0 for s in size):
            raise ValueError(f"vsize_xyz must be positive, got {list(vsize_xyz)}")
        bounds = _float32_list(coors_range_xyz, "coors_range_xyz", 2 * ndim)
        low, high = bounds[:ndim], bounds[ndim:]
        grid = []
        for d in range(ndim):
            if not high[d] > low[d]:
                raise ValueError(
                    f"coors_range_xyz {list(coors_range_xyz)} is inverted or empty along "
                    f"{_AXES[d]}: max {coors_range_xyz[ndim + d]} must be greater than min "
                    f"{coors_range_xyz[d]}"
                )
            with np.errstate(over="ignore"):  # an overflow to inf is refused below
                quotient = np.float32(high[d] - low[d]) / np.float32(size[d])  # as spconv
            cells = math.floor(float(quotient) + 0.5) if np.isfinite(quotient) else math.inf
            if cells < 1:
                raise ValueError(
                    f"coors_range_xyz {list(coors_range_xyz)} spans less than half a voxel of "
                    f"vsize_xyz {list(vsize_xyz)} along {_AXES[d]}"
                )
            if cells > _MAX_COORD:
                raise ValueError(
                    f"vsize_xyz {list(vsize_xyz)} and coors_range_xyz {list(coors_range_xyz)} "
                    f"give {cells} voxels along {_AXES[d]}, more than the 2^31 - 1 an axis may have"
                )
            grid.append(int(cells))
        if math.prod(grid) >= _MAX_KEY_VOLUME:
            raise ValueError(
                f"vsize_xyz {list(vsize_xyz)} and coors_range_xyz {list(coors_range_xyz)} give a "
                f"grid of {grid} voxels (x, y, z), more than 2^62 in all: too large to index"
            )
        return cls(size, low, high, grid)

    @property
    def spatial_shape(self) -> list[int]:
        """Grid size in (z, y, x) order, as ``SparseConvTensor`` and the coordinates use."""
        return self.grid_size[::-1]

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of the points the voxelizer keeps before its limits: every value finite
        and the voxel inside the grid (the same arithmetic as the op: float64 for float64
        points, else float32)."""
        pts = np.asarray(points)
        dtype = np.float64 if pts.dtype == np.float64 else np.float32
        pts = pts.astype(dtype, copy=False)
        ndim = len(self.voxel_size)
        low = np.asarray(self.range_min, dtype=np.float32).astype(dtype)
        size = np.asarray(self.voxel_size, dtype=np.float32).astype(dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            q = (pts[:, :ndim] - low) / size
            inside = (q >= 0) & (q < np.asarray(self.grid_size, dtype=np.float64))
        return np.isfinite(pts).all(axis=1) & inside.all(axis=1)


# The largest counts the voxelizing ops take: int64 arguments, int32 point counts per voxel.
_MOST_VOXELS, _MOST_POINTS_PER_VOXEL = (2**63 - 1, "2^63 - 1"), (2**31 - 1, "2^31 - 1")


class PointToVoxel:
    """spconv 2.x's ``spconv.pytorch.utils.PointToVoxel``, without the dense grid.

    Same constructor and outputs as spconv: ``voxels [M, P, C]`` float32 (the first ``P`` points
    of each voxel in input order, free slots zero), ``coordinates [M, 3]`` int32 in (z, y, x),
    ``num_points_per_voxel [M]`` int32; voxels appear in order of their first point and voxels
    past ``max_num_voxels`` are dropped with their points. Memory follows the number of points,
    not the grid volume, and nothing is allocated up front.

    Args:
        vsize_xyz: voxel size per axis (x, y, z).
        coors_range_xyz: ``[x_min, y_min, z_min, x_max, y_max, z_max]``.
        num_point_features: columns of the point clouds (x, y, z first).
        max_num_voxels: at most this many voxels per cloud.
        max_num_points_per_voxel: slots per voxel, ``P``.
        device: device of the point clouds and of the outputs (``"cpu"`` or a CUDA device;
            numpy clouds are copied there). Both give identical results.

    Attributes (as spconv, in z, y, x order): ``vsize``, ``grid_size``, ``grid_stride``,
    ``coors_range``; ``spatial_shape`` is ``grid_size`` as a list for ``SparseConvTensor``.

    Example:
        >>> gen = PointToVoxel([0.5, 0.5, 0.5], [0, 0, 0, 2, 2, 2], 4, 100, 3)
        >>> pts = torch.tensor([[0.1, 0.1, 0.1, 1.0], [0.2, 0.3, 0.1, 2.0], [1.9, 0.1, 0.7, 3.0]])
        >>> voxels, coords, num = gen(pts)
        >>> coords.tolist(), num.tolist()
        ([[0, 0, 0], [1, 0, 3]], [2, 1])
    """

    def __init__(
        self,
        vsize_xyz: Sequence[float],
        coors_range_xyz: Sequence[float],
        num_point_features: int,
        max_num_voxels: int,
        max_num_points_per_voxel: int,
        device: Union[torch.device, str] = "cpu",
    ) -> None:
        self.geometry = GridGeometry.from_spconv_args(vsize_xyz, coors_range_xyz)
        self.ndim = len(self.geometry.voxel_size)
        self.num_point_features = check_count(num_point_features, "num_point_features")
        if self.num_point_features < self.ndim:
            raise ValueError(
                f"num_point_features must be at least {self.ndim} (the coordinates), got "
                f"{num_point_features}"
            )
        self.max_num_voxels = check_count(max_num_voxels, "max_num_voxels", most=_MOST_VOXELS)
        self.max_num_points_per_voxel = check_count(
            max_num_points_per_voxel, "max_num_points_per_voxel", most=_MOST_POINTS_PER_VOXEL
        )
        self.device = torch.device(device)
        g = self.geometry
        self.vsize = g.voxel_size[::-1]
        self.grid_size = g.spatial_shape
        self.grid_stride = [math.prod(self.grid_size[d + 1 :]) for d in range(self.ndim)]
        self.coors_range = g.range_min[::-1] + g.range_max[::-1]

    @property
    def spatial_shape(self) -> list[int]:
        return list(self.grid_size)

    def _points(self, pc: PointsLike) -> Tensor:
        if isinstance(pc, np.ndarray):  # host memory: goes to this voxelizer's device
            if not pc.dtype.isnative:  # big-endian data: torch takes native byte order only
                pc = pc.astype(pc.dtype.newbyteorder("="))
            # (torch.from_numpy refuses negative strides, e.g. points[::-1]: copy those.)
            pc = torch.from_numpy(pc if all(s >= 0 for s in pc.strides)
                                  else np.ascontiguousarray(pc)).to(self.device)
        if not isinstance(pc, Tensor):
            raise TypeError(f"pc must be a torch.Tensor or numpy array, got {type(pc).__name__}")
        if not pc.is_floating_point():
            raise TypeError(f"pc must hold floating-point values, got {pc.dtype}")
        if pc.dim() != 2 or pc.shape[1] != self.num_point_features:
            raise ValueError(
                f"pc must have shape [N, {self.num_point_features}] (num_point_features), "
                f"got {list(pc.shape)}"
            )
        if pc.device.type != self.device.type:
            raise ValueError(f"pc is on {pc.device} but this PointToVoxel is for {self.device}")
        # float64 points are quantized in float64, as spconv does (map or UTM coordinates are
        # too large for float32); half types convert exactly to float32.
        return pc if pc.dtype == torch.float64 else pc.to(torch.float32)

    def __call__(
        self, pc: PointsLike, clear_voxels: bool = True, empty_mean: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Voxelizes one cloud: ``(voxels, coordinates, num_points_per_voxel)``.

        Args:
            pc: ``[N, num_point_features]`` points.
            clear_voxels: accepted for spconv compatibility; outputs are always fresh.
            empty_mean: fill free slots with the mean of the voxel's points instead of zeros.
        """
        return self.generate_voxel_with_id(pc, clear_voxels, empty_mean)[:3]

    def generate_voxel_with_id(
        self, pc: PointsLike, clear_voxels: bool = True, empty_mean: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Like ``__call__``, plus ``point_voxel_id [N]`` int64: each point's voxel row, or -1
        for a dropped point (outside the grid, non-finite, or its voxel past
        ``max_num_voxels``). A point beyond the ``P`` stored in its voxel still gets the id.
        """
        g = self.geometry
        return ops.voxelize(
            self._points(pc),
            g.voxel_size,
            g.range_min,
            g.grid_size,
            self.max_num_points_per_voxel,
            self.max_num_voxels,
            empty_mean,
        )

    def generate_voxel_mean(self, pc: PointsLike) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Dynamic voxelization: the mean of all of each voxel's points, with no cap on points.

        Returns:
            ``(features [M, C] float32, coordinates [M, 3] int32 (z, y, x),
            num_points_per_voxel [M] int32 (all points), point_voxel_id [N] int64)``.
        """
        g = self.geometry
        return ops.voxelize_mean(
            self._points(pc), g.voxel_size, g.range_min, g.grid_size, self.max_num_voxels
        )

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"PointToVoxel(vsize_xyz={g.voxel_size}, coors_range_xyz={g.range_min + g.range_max}"
            f", num_point_features={self.num_point_features}, max_num_voxels="
            f"{self.max_num_voxels}, max_num_points_per_voxel={self.max_num_points_per_voxel})"
        )


def checked_voxel_ids(ids: Tensor, voxel_values: Tensor, name: str) -> Tensor:
    """``ids`` as int64 on ``voxel_values``' device, after checking (eagerly) that they are
    integers, each a row of ``voxel_values`` or -1 (a point without a voxel)."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer voxel ids, got {ids.dtype}")
    ids = ids.to(device=voxel_values.device, dtype=torch.long)
    voxels = voxel_values.shape[0]
    if not torch.compiler.is_compiling() and ids.numel() > 0:
        low, high = int(ids.min()), int(ids.max())
        if low < -1 or high >= voxels:
            raise ValueError(
                f"{name} must hold voxel rows in [0, {voxels}) or -1, got values in "
                f"[{low}, {high}]"
            )
    return ids


def voxel_to_point(voxel_values: Tensor, point_voxel_id: Tensor, fill_value: float = 0) -> Tensor:
    """Gives every point the value of its voxel (e.g. segmentation logits per point).

    Args:
        voxel_values: ``[M, ...]`` one row per voxel.
        point_voxel_id: ``[N]`` from ``generate_voxel_with_id`` (-1 for dropped points).
        fill_value: value for dropped points.

    Returns:
        ``[N, ...]``: row ``i`` is ``voxel_values[point_voxel_id[i]]``, or ``fill_value``.

    Example:
        >>> voxel_to_point(torch.tensor([10.0, 20.0]), torch.tensor([1, -1, 0])).tolist()
        [20.0, 0.0, 10.0]
    """
    if point_voxel_id.dim() != 1:
        raise ValueError(f"point_voxel_id must be 1-D, got shape {list(point_voxel_id.shape)}")
    ids = checked_voxel_ids(point_voxel_id, voxel_values, "point_voxel_id")
    out = voxel_values.new_full((ids.shape[0], *voxel_values.shape[1:]), fill_value)
    kept = ids >= 0
    out[kept] = voxel_values[ids[kept]]
    return out


def batch_point_clouds(
    point_clouds: Sequence[PointsLike],
    voxelizer: PointToVoxel,
    dynamic: bool = False,
    return_point_ids: bool = False,
) -> Union[SparseConvTensor, tuple[SparseConvTensor, list[Tensor]]]:
    """Voxelizes a batch of clouds into one ``SparseConvTensor`` with mean voxel features.

    Args:
        point_clouds: clouds ``[N_i, C]`` (tensors or numpy arrays).
        voxelizer: the grid and limits, applied to each cloud separately.
        dynamic: mean of all of each voxel's points (``generate_voxel_mean``); otherwise the
            mean of the first ``max_num_points_per_voxel`` points, as OpenPCDet's MeanVFE.
        return_point_ids: also return, per cloud, each point's row in the batched tensor
            (-1 for dropped points), for mapping results back with :func:`voxel_to_point`.

    Returns:
        ``SparseConvTensor`` with ``indices [M, 4]`` int32 (batch, z, y, x), ``features [M, C]``,
        ``spatial_shape = voxelizer.spatial_shape``, ``batch_size = len(point_clouds)``;
        with ``return_point_ids``, also the list of per-point row ids.

    Example:
        >>> gen = PointToVoxel([1, 1, 1], [0, 0, 0, 4, 4, 4], 3, 100, 5)
        >>> x = batch_point_clouds([torch.rand(10, 3) * 4, torch.rand(7, 3) * 4], gen)
        >>> x.indices.shape[1], x.batch_size, x.spatial_shape
        (4, 2, [4, 4, 4])
    """
    if len(point_clouds) == 0:
        raise ValueError("point_clouds must hold at least one cloud")
    features, indices, point_ids = [], [], []
    rows = 0
    for b, pc in enumerate(point_clouds):
        if dynamic:
            feats, coords, _, ids = voxelizer.generate_voxel_mean(pc)
        else:
            voxels, coords, num, ids = voxelizer.generate_voxel_with_id(pc)
            # Free slots are zero, so the sum over slots is the sum of the stored points.
            feats = voxels.sum(dim=1) / num.clamp(min=1).unsqueeze(1).to(voxels.dtype)
        batch = torch.full((coords.shape[0], 1), b, dtype=torch.int32, device=coords.device)
        indices.append(torch.cat([batch, coords], dim=1))
        features.append(feats)
        point_ids.append(torch.where(ids >= 0, ids + rows, ids))
        rows += coords.shape[0]
    tensor = SparseConvTensor(
        torch.cat(features), torch.cat(indices), voxelizer.spatial_shape, len(point_clouds)
    )
    return (tensor, point_ids) if return_point_ids else tensor
