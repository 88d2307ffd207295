"""Synthetic LiDAR sweeps and a numpy shorthand of the voxelizer, for demos, benchmarks and tests.

:func:`lidar_sweep` ray-casts a 64-beam spinning LiDAR (HDL-64E-like geometry) against a
small analytic street scene: a ground plane, box-shaped cars and building walls, and vertical
poles. The result looks like a KITTI ``velodyne`` frame (float32 ``[N, 4]``: x, y, z,
intensity in the sensor frame, ground at ``z = -sensor_height``) and is fully deterministic
for a given seed, so examples and tests need no data files.

:func:`voxelize_mean` voxelizes numpy points into numpy arrays (the mean of the points in each
voxel, no caps) with :class:`spconv_lite.PointToVoxel`: ``(z, y, x)`` coordinates, voxels in the
order of their first point.

Example:
    >>> points = lidar_sweep(seed=0, num_azimuth=1000)
    >>> points.shape[1], points.dtype
    (4, dtype('float32'))
    >>> feats, coords, shape = voxelize_mean(points, [0.1, 0.1, 0.1], [0, -40, -3, 70.4, 40, 1])
    >>> shape.tolist()
    [40, 800, 704]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Box", "Pole", "Scene", "lidar_sweep", "make_scene", "voxelize_mean"]


@dataclass(frozen=True)
class Box:
    """A box standing on the ground, rotated by ``yaw`` (radians) about the vertical axis.

    ``center`` is the (x, y) centre of its footprint; ``size`` is (length, width, height).
    """

    center: tuple[float, float]
    size: tuple[float, float, float]
    yaw: float
    reflectivity: float


@dataclass(frozen=True)
class Pole:
    """A vertical cylinder standing on the ground."""

    center: tuple[float, float]
    radius: float
    height: float
    reflectivity: float


@dataclass(frozen=True)
class Scene:
    """An analytic scene: a flat ground plane plus boxes and poles (heights above the ground)."""

    boxes: tuple[Box, ...]
    poles: tuple[Pole, ...]
    ground_reflectivity: float = 0.3


def make_scene(seed: int = 0) -> Scene:
    """A street scene: two rows of building walls, a few parked / driving cars and poles.

    The layout is fixed up to small seed-dependent jitter, so every seed gives a plausible
    street with objects in front of the sensor (positive x), where KITTI-style detectors look.
    """
    rng = np.random.default_rng(seed)
    boxes = []
    # Building facades on both sides of the street, with gaps between buildings.
    for side in (-1.0, 1.0):
        x = -40.0
        while x < 80.0:
            length = rng.uniform(12.0, 25.0)
            depth = rng.uniform(6.0, 10.0)
            offset = rng.uniform(11.0, 14.0)
            boxes.append(Box((x + length / 2, side * (offset + depth / 2)), (length, depth,
                             rng.uniform(4.0, 9.0)), 0.0, rng.uniform(0.15, 0.4)))
            x += length + rng.uniform(2.0, 6.0)
    # Cars: parked along both curbs and a few in the lanes, mostly ahead of the sensor.
    car_slots = [(8.0, -7.5), (15.0, 7.5), (22.0, -3.0), (30.0, 3.5), (37.0, -7.5),
                 (45.0, 2.0), (-9.0, 3.0), (-18.0, -7.5), (55.0, -3.5)]
    for x, y in car_slots:
        x += rng.uniform(-1.5, 1.5)
        y += rng.uniform(-0.4, 0.4)
        yaw = rng.uniform(-0.15, 0.15) + (np.pi if rng.random() < 0.3 else 0.0)
        size = (rng.uniform(3.8, 4.8), rng.uniform(1.6, 1.9), rng.uniform(1.4, 1.7))
        boxes.append(Box((x, y), size, yaw, rng.uniform(0.3, 0.9)))
    # Street lights / sign poles on the sidewalks.
    poles = []
    for x in (6.0, 26.0, 46.0, -14.0):
        side = 1.0 if rng.random() < 0.5 else -1.0
        poles.append(Pole((x + rng.uniform(-1.0, 1.0), side * rng.uniform(9.0, 10.0)),
                          rng.uniform(0.1, 0.2), rng.uniform(4.0, 7.0), 0.6))
    return Scene(tuple(boxes), tuple(poles))


def _hit_ground(origin_z: float, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the plane z = 0 along unit rays ``d`` from height ``origin_z``, and the
    cosine of the incidence angle."""
    with np.errstate(divide="ignore"):
        t = np.where(d[:, 2] < 0, -origin_z / d[:, 2], np.inf)
    return t, np.abs(d[:, 2])


def _hit_box(origin: np.ndarray, d: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Slab test of every ray against a yawed box; returns (distance or inf, |cos incidence|)."""
    c, s = np.cos(box.yaw), np.sin(box.yaw)
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # world -> box frame
    o = rot @ (origin - np.array([box.center[0], box.center[1], box.size[2] / 2]))
    dl = d @ rot.T
    half = np.array(box.size) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dl
        t0 = (-half - o) * inv
        t1 = (half - o) * inv
    t_near = np.minimum(t0, t1)
    t_far = np.maximum(t0, t1)
    # A ray parallel to a slab misses unless it lies inside it (then that slab never limits).
    inside = np.abs(o) <= half
    parallel = dl == 0
    t_near = np.where(parallel, np.where(inside, -np.inf, np.inf), t_near)
    t_far = np.where(parallel, np.where(inside, np.inf, -np.inf), t_far)
    entry_axis = np.argmax(t_near, axis=1)
    t_enter = t_near.max(axis=1)
    t_exit = t_far.min(axis=1)
    hit = (t_enter <= t_exit) & (t_enter > 0)
    t = np.where(hit, t_enter, np.inf)
    # The face hit is the one of the slab entered last; its normal is that box axis.
    cos = np.abs(np.take_along_axis(dl, entry_axis[:, None], axis=1)[:, 0])
    return t, cos


def _hit_pole(origin: np.ndarray, d: np.ndarray, pole: Pole) -> tuple[np.ndarray, np.ndarray]:
    """Ray / vertical cylinder intersection (side surface only)."""
    ox, oy = origin[0] - pole.center[0], origin[1] - pole.center[1]
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (ox * d[:, 0] + oy * d[:, 1])
    cc = ox**2 + oy**2 - pole.radius**2
    disc = b * b - 4 * a * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    z = origin[2] + t * d[:, 2]
    hit = (disc > 0) & (a > 0) & (t > 0) & (z >= 0) & (z <= pole.height)
    t = np.where(hit, t, np.inf)
    with np.errstate(invalid="ignore"):
        nx = (ox + t * d[:, 0]) / pole.radius
        ny = (oy + t * d[:, 1]) / pole.radius
        cos = np.abs(nx * d[:, 0] + ny * d[:, 1])
    return t, np.nan_to_num(cos)


def lidar_sweep(
    seed: int = 0,
    num_beams: int = 64,
    num_azimuth: int = 1800,
    elevation_range: tuple[float, float] = (-24.9, 2.0),
    sensor_height: float = 1.73,
    max_range: float = 120.0,
    range_noise: float = 0.02,
    dropout: float = 0.03,
    scene: Scene | None = None,
) -> np.ndarray:
    """One 360-degree sweep of a spinning multi-beam LiDAR over a synthetic street.

    Beams are spread evenly between the two elevation angles; each beam fires ``num_azimuth``
    times per turn. Each ray returns the nearest hit (ground, box or pole) within ``max_range``;
    rays that hit nothing (sky) give no point, and a random ``dropout`` fraction of returns is
    lost, as on a real sensor. Range gets Gaussian noise of ``range_noise`` metres.

    Intensity (0..1, like KITTI reflectance) = surface reflectivity * |cos incidence|, dimmed
    slowly with range, plus a little noise.

    Args:
        seed: seeds both the scene layout (when ``scene`` is None) and the sensor noise.
        num_beams: number of laser beams (rows).
        num_azimuth: firings per turn (columns); 1800 is a 0.2 degree step.
        elevation_range: (lowest, highest) beam elevation in degrees.
        sensor_height: height of the sensor above the ground; the output is in the sensor
            frame, so the ground lies at ``z = -sensor_height``.
        max_range: returns farther than this are dropped (metres).
        range_noise: standard deviation of the range noise (metres).
        dropout: fraction of returns randomly removed.
        scene: the scene to scan; ``make_scene(seed)`` by default.

    Returns:
        float32 ``[N, 4]``: x, y, z, intensity, ordered beam by beam (top beam first), then by
        azimuth. Deterministic for given arguments.

    Example:
        >>> pts = lidar_sweep(seed=1, num_azimuth=1000)
        >>> bool((pts[:, 2] > -1.8).all())  # nothing below the ground (up to noise)
        True
    """
    if num_beams < 1 or num_azimuth < 1:
        raise ValueError(f"num_beams and num_azimuth must be >= 1, got {num_beams}, {num_azimuth}")
    # An infinite range would turn the sky's rays into infinite points; NaN noise or dropout
    # would give NaN points or none.
    for name, value, valid, what in (
        ("sensor_height", sensor_height, sensor_height > 0, "a finite height > 0"),
        ("max_range", max_range, max_range > 0, "a finite range > 0"),
        ("range_noise", range_noise, range_noise >= 0, "a finite deviation >= 0"),
        ("dropout", dropout, 0 <= dropout <= 1, "a fraction in [0, 1]"),
    ):
        if not (valid and math.isfinite(value)):
            raise ValueError(f"{name} must be {what}, got {value!r}")
    if scene is None:
        scene = make_scene(seed)
    rng = np.random.default_rng([seed, 1])  # noise stream independent of the scene layout
    elev = np.deg2rad(np.linspace(elevation_range[1], elevation_range[0], num_beams))
    azim = np.linspace(-np.pi, np.pi, num_azimuth, endpoint=False)
    el, az = np.meshgrid(elev, azim, indexing="ij")
    d = np.stack(
        [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1
    ).reshape(-1, 3)
    origin = np.array([0.0, 0.0, sensor_height])  # world frame: ground at z = 0

    best_t, best_cos = _hit_ground(sensor_height, d)
    best_refl = np.full(len(d), scene.ground_reflectivity)
    surfaces = [(b, _hit_box) for b in scene.boxes] + [(p, _hit_pole) for p in scene.poles]
    for obj, hit_fn in surfaces:
        t, cos = hit_fn(origin, d, obj)
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        best_cos = np.where(closer, cos, best_cos)
        best_refl = np.where(closer, obj.reflectivity, best_refl)

    keep = (best_t <= max_range) & (rng.random(len(d)) >= dropout)
    t = best_t[keep] + rng.normal(0.0, range_noise, keep.sum())
    xyz = d[keep] * t[:, None]  # relative to the sensor: already the sensor frame
    intensity = best_refl[keep] * (0.3 + 0.7 * best_cos[keep]) * np.exp(-t / 200.0)
    intensity = np.clip(intensity + rng.normal(0.0, 0.02, len(t)), 0.0, 1.0)
    return np.concatenate([xyz, intensity[:, None]], axis=1).astype(np.float32)


def voxelize_mean(
    points: np.ndarray,
    voxel_size: Sequence[float],
    coors_range: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups points into voxels and averages each voxel's points, with numpy in and out.

    A shorthand for :meth:`spconv_lite.PointToVoxel.generate_voxel_mean` with no voxel cap:
    the voxel index of a point is ``floor((p - range_min) / voxel_size)`` computed in float32,
    as spconv's ``PointToVoxel`` does; points whose index falls outside the grid, or with a
    non-finite value, are dropped. The grid size per axis is
    ``round((range_max - range_min) / voxel_size)``.

    Args:
        points: ``[P, C]`` with C >= 3; columns 0..2 are x, y, z, the rest (e.g. intensity)
            are averaged too.
        voxel_size: (vx, vy, vz).
        coors_range: (x_min, y_min, z_min, x_max, y_max, z_max).

    Returns:
        ``(features, coords, spatial_shape)``: float32 ``[M, C]`` mean of all C columns of
        the points in each voxel; int32 ``[M, 3]`` voxel coordinates in (z, y, x) order;
        int64 ``[3]`` grid size in (z, y, x) order. Voxels are listed in the order of their
        first point in ``points``.

    Example:
        >>> pts = np.array([[0.05, 0.05, 0.05, 1.0], [0.15, 0.0, 0.0, 0.0],
        ...                 [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
        >>> f, c, s = voxelize_mean(pts, [0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1])
        >>> c.tolist(), f[:, 3].tolist(), s.tolist()
        ([[0, 0, 0], [0, 0, 1]], [0.5, 0.0], [10, 10, 10])
    """
    from .voxelize import PointToVoxel

    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be [P, C] with C >= 3, got shape {points.shape}")
    voxelizer = PointToVoxel(voxel_size, coors_range, points.shape[1], 2**31 - 1, 1)
    features, coords, _, _ = voxelizer.generate_voxel_mean(points.astype(np.float32))
    return features.numpy(), coords.numpy(), np.asarray(voxelizer.spatial_shape, dtype=np.int64)
