"""PointToVoxel, dynamic voxelization and the batching helpers.

Layered oracles: a plain Python loop (``reference_voxelize``, written from the rules in the data
README) checks the op on synthetic clouds built to hit voxel and range borders; spconv 2.3.8
checks it on the same clouds and on every real frame; the README's counts and coordinate hashes
and a few voxels written down from spconv check it even where spconv is not installed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEVICES
from lidar_frames import (
    EXACT_VOXELS,
    FRAME_IDS,
    FRAMES,
    Frame,
    SpconvCache,
    sorted_coords_sha16,
    spconv_point_to_voxel,
)

import spconv_lite
from spconv_lite import PointToVoxel, batch_point_clouds, ops, voxel_to_point
from spconv_lite.voxelize import GridGeometry

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- oracle


def reference_voxelize(points: np.ndarray, vsize, coors_range, max_points: int, max_voxels: int):
    """One point at a time, in input order, as the README describes spconv's rules: float64
    points are quantized in float64, others in float32. Returns (voxels, coordinates,
    num_points_per_voxel, point_voxel_id, means of all points)."""
    geometry = GridGeometry.from_spconv_args(vsize, coors_range)
    ndim = len(vsize)
    dtype = np.float64 if np.asarray(points).dtype == np.float64 else np.float32
    low = np.asarray(geometry.range_min, dtype=np.float32).astype(dtype)
    size = np.asarray(geometry.voxel_size, dtype=np.float32).astype(dtype)
    pts = np.asarray(points, dtype=dtype)
    rows: dict[tuple, int] = {}
    members: list[list[np.ndarray]] = []
    ids = np.full(len(pts), -1, dtype=np.int64)
    for i, p in enumerate(pts):
        if not np.isfinite(p).all():
            continue
        with np.errstate(over="ignore"):
            cell = np.floor((p[:ndim] - low) / size)  # in the points' precision
        if (cell < 0).any() or (cell >= np.asarray(geometry.grid_size)).any():
            continue
        key = tuple(int(c) for c in cell[::-1])
        if key not in rows:
            if len(rows) == max_voxels:
                continue
            rows[key] = len(rows)
            members.append([])
        ids[i] = rows[key]
        members[rows[key]].append(p)
    count = len(rows)
    voxels = np.zeros((count, max_points, pts.shape[1]), dtype=np.float32)
    num = np.zeros(count, dtype=np.int32)
    means = np.zeros((count, pts.shape[1]), dtype=np.float32)
    for v, group in enumerate(members):
        kept = group[:max_points]
        voxels[v, : len(kept)] = kept
        num[v] = len(kept)
        total = np.zeros(pts.shape[1], dtype=np.float64)
        for p in group:  # float64, input order, like the op
            total += p
        means[v] = total / len(group)
    coords = np.asarray(list(rows), dtype=np.int32).reshape(count, ndim)
    return voxels, coords, num, ids, means


def fill_empty_with_mean(voxels: np.ndarray, num: np.ndarray) -> np.ndarray:
    out = voxels.copy()
    for v in range(len(out)):
        mean = out[v, : num[v]].astype(np.float64).sum(axis=0) / num[v]
        out[v, num[v] :] = mean.astype(np.float32)
    return out


def synthetic_cloud(case: str, vsize, coors_range, columns: int, n: int = 2500) -> np.ndarray:
    """Points in and around the range, a third of them exactly on voxel borders, some repeated,
    a few past either end, plus NaN / infinite rows."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    ndim = len(vsize)
    low, high = np.array(coors_range[:ndim]), np.array(coors_range[ndim:])
    span = high - low
    pts = rng.uniform(-0.1, 1.1, size=(n, columns)) * np.concatenate(
        [span, np.ones(columns - ndim)]
    )
    pts[:, :ndim] += low
    border = rng.random(n) < 0.3
    steps = np.round((pts[:, :ndim] - low) / vsize)
    pts[border, :ndim] = (low + steps * np.asarray(vsize))[border]
    pts[rng.integers(0, n, n // 10)] = pts[rng.integers(0, n, n // 10)]  # same voxel, later
    pts = pts.astype(np.float32)
    pts[rng.integers(0, n, 5), 0] = np.nan
    pts[rng.integers(0, n, 3), 1] = np.inf
    if columns > ndim:  # a non-finite feature drops the point too (first and last feature)
        pts[rng.integers(0, n, 3), ndim] = -np.inf
        pts[rng.integers(0, n, 3), columns - 1] = np.nan
    return pts


CONFIGS = {
    # name: (vsize, coors_range, columns, max_points, max_voxels)
    "kitti": ((0.05, 0.05, 0.1), (0, -40, -3, 70.4, 40, 1), 4, 5, 40000),
    "grid-rounded-up": ((0.4, 0.4, 0.4), (0, 0, 0, 1, 1, 1), 4, 2, 100),
    "grid-rounded-down": ((0.3, 0.3, 0.3), (0, 0, 0, 1, 1, 1), 3, 3, 100),
    "voxel-cap": ((0.5, 0.5, 0.5), (-2, -2, -2, 2, 2, 2), 5, 1, 7),
    "one-slot": ((0.2, 0.1, 0.3), (-1.5, -0.7, -0.1, 1.3, 0.9, 0.7), 3, 1, 100000),
    "2d": ((0.25, 0.5), (0, 0, 4, 4), 3, 3, 1000),
    # 4e9 cells: keys past int32, so the op's int32 (AVX2) key path is not taken
    "over-2^31-cells": ((0.002, 0.002, 0.002), (0, -2, -1, 4, 2, 1), 4, 3, 5000),
    # 2^61 cells, but padded to powers of two per axis 2^63: the CPU op's exact row-major keys
    "unpadded-keys": ((1.0, 1.0, 1.0), (0, 0, 0, 2**21 + 1, 2**21 + 1, 2**19), 4, 3, 5000),
}
HUGE_GRIDS = ("over-2^31-cells", "unpadded-keys")  # spconv would allocate the dense grid
SPCONV_CONFIGS = [c for c in CONFIGS if len(CONFIGS[c][0]) == 3 and c not in HUGE_GRIDS]


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def assert_outputs_equal(ours, expected) -> None:
    for name, a, b in zip(("voxels", "coordinates", "num", "point_voxel_id"), ours, expected):
        a, b = a.cpu(), torch.as_tensor(b)
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert torch.equal(a, b), name


def on(device: str, outputs: tuple) -> tuple:
    """Checks that every output is on ``device`` and returns CPU copies."""
    assert all(t.device.type == device for t in outputs)
    return tuple(t.cpu() for t in outputs)


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CONFIGS))
def test_matches_reference_loop(case, device):
    vsize, coors_range, columns, max_points, max_voxels = CONFIGS[case]
    pts = synthetic_cloud(case, vsize, coors_range, columns)
    gen = PointToVoxel(vsize, coors_range, columns, max_voxels, max_points, device=device)
    voxels, coords, num, ids, means = reference_voxelize(
        pts, vsize, coors_range, max_points, max_voxels
    )
    pc = torch.from_numpy(pts).to(device)
    assert_outputs_equal(on(device, gen.generate_voxel_with_id(pc)), (voxels, coords, num, ids))
    mean_out = on(device, gen.generate_voxel_mean(pc))
    counts = np.bincount(ids[ids >= 0], minlength=len(coords)).astype(np.int32)
    assert_outputs_equal(mean_out, (means, coords, counts, ids))
    filled = on(device, gen.generate_voxel_with_id(pc, empty_mean=True))[0]
    assert torch.equal(filled, torch.from_numpy(fill_empty_with_mean(voxels, num)))


@pytest.mark.parametrize("case", SPCONV_CONFIGS)
def test_matches_spconv_on_borders(case, threads):
    vsize, coors_range, columns, max_points, max_voxels = CONFIGS[case]
    pts = synthetic_cloud(case, vsize, coors_range, columns)
    finite = np.isfinite(pts).all(axis=1)  # spconv 2.3.8 keeps non-finite points: compare the rest
    pts = pts[finite]
    reference = spconv_point_to_voxel()(
        list(vsize), list(coors_range), columns, max_voxels, max_points
    )
    gen = PointToVoxel(vsize, coors_range, columns, max_voxels, max_points)
    assert gen.grid_size == list(reference.grid_size)
    assert gen.grid_stride == list(reference.grid_stride)
    threads(1)  # spconv 2.3.8's CPU code is only correct on one thread
    expected = reference.generate_voxel_with_id(torch.from_numpy(pts))
    assert_outputs_equal(gen.generate_voxel_with_id(torch.from_numpy(pts)), expected)


@pytest.mark.parametrize(
    "vsize, coors_range",
    [
        ((0.05, 0.05, 0.1), (0, -40, -3, 70.4, 40, 1)),
        ((0.4, 0.25, 0.16), (0, 0, 0, 1, 1, 1)),  # 2.5 voxels: the half rounds up
        ((0.075, 0.075, 0.2), (-54, -54, -5, 54, 54, 3)),
        ((0.024, 0.3, 0.7), (-1.1, 2.0, -3.0, 7.3, 9.5, 4.1)),
    ],
)
def test_grid_size_as_spconv(vsize, coors_range):
    reference = spconv_point_to_voxel()(list(vsize), list(coors_range), 3, 1, 1)
    gen = PointToVoxel(vsize, coors_range, 3, 1, 1)
    assert gen.grid_size == list(reference.grid_size)
    assert gen.vsize == list(reference.vsize)
    assert gen.coors_range == list(reference.coors_range)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_cloud(device):
    gen = PointToVoxel((0.1, 0.1, 0.1), (0, 0, 0, 1, 1, 1), 4, 10, 3, device=device)
    empty = torch.zeros(0, 4, device=device)
    voxels, coords, num, ids = on(device, gen.generate_voxel_with_id(empty))
    assert voxels.shape == (0, 3, 4) and coords.shape == (0, 3) and num.shape == (0,)
    assert ids.shape == (0,) and ids.dtype == torch.int64
    features, coords, num, ids = on(device, gen.generate_voxel_mean(empty))
    assert features.shape == (0, 4) and coords.shape == (0, 3)


def test_outputs_do_not_claim_a_gradient_for_points_that_require_one():
    """Voxelizing is not differentiable (spconv runs it under no_grad): its outputs must not
    require grad, or a loss on them would backpropagate nothing to the points, silently."""
    points = (torch.rand(50, 4) * 4).requires_grad_()
    gen = PointToVoxel((1, 1, 1), (0, 0, 0, 4, 4, 4), 4, 100, 3)
    outputs = [*gen(points), *gen.generate_voxel_mean(points)]
    outputs += [*ops.voxelize(points, (1, 1, 1), (0, 0, 0), (4, 4, 4), 3, 100)]
    assert not any(out.requires_grad for out in outputs)
    with pytest.raises(RuntimeError, match="does not require grad"):
        outputs[0].sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_points_are_dropped(device):
    gen = PointToVoxel((1, 1, 1), (0, 0, 0, 4, 4, 4), 4, 10, 3, device=device)
    pts = torch.tensor(
        [[0.5, 0.5, 0.5, 1], [np.nan, 0.5, 0.5, 1], [0.5, np.inf, 0.5, 1], [0.6, 0.5, 0.5, np.nan],
         [0.7, 0.5, 0.5, 2], [-np.inf, 0, 0, 0]]
    )  # fmt: skip
    voxels, coords, num, ids = on(device, gen.generate_voxel_with_id(pts.to(device)))
    assert ids.tolist() == [0, -1, -1, -1, 0, -1]
    assert num.tolist() == [2] and torch.isfinite(voxels).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])  # the vector and the scalar CPU code
@pytest.mark.parametrize("columns", [5, 6])
@pytest.mark.parametrize("count", [16, 13])  # whole blocks of 8 points, and a tail
def test_non_finite_extra_columns_drop_their_points(count, columns, dtype, device):
    """Columns past the fourth are checked too (one voxel per point, room for all)."""
    gen = PointToVoxel((1, 1, 1), (0, 0, 0, 4, 4, 4), columns, count, 1, device=device)
    rng = np.random.default_rng(count * columns)
    pts = np.zeros((count, columns), dtype=dtype)
    pts[:, :3] = np.stack(np.unravel_index(rng.permutation(64)[:count], (4, 4, 4)), 1) + 0.5
    pts[:, 3:] = rng.uniform(-1, 1, (count, columns - 3))
    bad = [1, 7, count - 1]  # NaN, inf and -inf in the fifth column or later only
    for row, value in zip(bad, [np.nan, np.inf, -np.inf]):
        pts[row, 3 + 1 + row % (columns - 4)] = value
    voxels, coords, num, ids = on(device, gen.generate_voxel_with_id(
        torch.from_numpy(pts).to(device)))
    kept = [i for i in range(count) if i not in bad]
    assert [i for i, v in enumerate(ids.tolist()) if v < 0] == bad
    assert num.tolist() == [1] * len(kept) and torch.isfinite(voxels).all()
    torch.testing.assert_close(voxels[:, 0], torch.from_numpy(pts[kept]).float())


def utm_cloud():
    """A KITTI-style cloud (float64) and its range, moved into a UTM frame, where float32
    coordinates have a ulp of 3-6 cm."""
    vsize, coors_range, columns, max_points, max_voxels = CONFIGS["kitti"]
    offset = [512345.3, 4102345.7, 0.0]
    shifted = [r + offset[i % 3] for i, r in enumerate(coors_range)]
    pts = synthetic_cloud("kitti-utm", vsize, coors_range, columns).astype(np.float64)
    pts[:, :3] += offset
    return pts, (vsize, shifted, columns, max_points, max_voxels)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_points_are_quantized_in_float64(device):
    pts, (vsize, coors_range, columns, max_points, max_voxels) = utm_cloud()
    voxels, coords, num, ids, means = reference_voxelize(pts, vsize, coors_range, max_points,
                                                         max_voxels)
    # (Rounded to float32 first, many of these points land in another voxel.)
    rounded = reference_voxelize(pts.astype(np.float32), vsize, coors_range, max_points,
                                 max_voxels)[3]
    assert (rounded != ids).mean() > 0.5
    # The CLI's "points inside the range" count uses the same arithmetic (no voxel cap here).
    assert np.array_equal(GridGeometry.from_spconv_args(vsize, coors_range).contains(pts),
                          ids >= 0)
    gen = PointToVoxel(vsize, coors_range, columns, max_voxels, max_points, device=device)
    pc = torch.from_numpy(pts).to(device)
    assert_outputs_equal(on(device, gen.generate_voxel_with_id(pc)), (voxels, coords, num, ids))
    counts = np.bincount(ids[ids >= 0], minlength=len(coords)).astype(np.int32)
    assert_outputs_equal(on(device, gen.generate_voxel_mean(pc)), (means, coords, counts, ids))
    filled = on(device, gen.generate_voxel_with_id(pc, empty_mean=True))[0]
    assert torch.equal(filled, torch.from_numpy(fill_empty_with_mean(voxels, num)))


def test_float64_points_match_spconv(threads):
    pts, (vsize, coors_range, columns, max_points, max_voxels) = utm_cloud()
    pts = torch.from_numpy(pts[np.isfinite(pts).all(axis=1)])  # spconv keeps the others
    reference = spconv_point_to_voxel()(list(vsize), coors_range, columns, max_voxels,
                                        max_points)
    gen = PointToVoxel(vsize, coors_range, columns, max_voxels, max_points)
    threads(1)  # spconv 2.3.8's CPU code is only correct on one thread
    assert_outputs_equal(gen.generate_voxel_with_id(pts), reference.generate_voxel_with_id(pts))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    pts = synthetic_cloud("strided", (0.3, 0.3, 0.3), (0, 0, 0, 2, 2, 2), 4)
    expected = PointToVoxel((0.3, 0.3, 0.3), (0, 0, 0, 2, 2, 2), 4, 1000, 4)(
        torch.from_numpy(pts)
    )
    gen = PointToVoxel((0.3, 0.3, 0.3), (0, 0, 0, 2, 2, 2), 4, 1000, 4, device=device)
    wide = torch.zeros(len(pts), 8, device=device)
    wide[:, ::2] = torch.from_numpy(pts).to(device)
    assert_outputs_equal(on(device, gen(wide[:, ::2])), expected)
    reversed_rows = pts[::-1]  # a numpy view with a negative stride
    assert_outputs_equal(on(device, gen(reversed_rows)),
                         PointToVoxel((0.3, 0.3, 0.3), (0, 0, 0, 2, 2, 2), 4, 1000, 4)(
                             torch.from_numpy(reversed_rows.copy())))
    big_endian = pts.astype(">f4")  # as read from a big-endian file: torch refused it
    assert_outputs_equal(on(device, gen(big_endian)), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_points_past_a_full_voxel_keep_their_id(device):
    gen = PointToVoxel((1, 1, 1), (0, 0, 0, 2, 2, 2), 3, 10, 2, device=device)
    pts = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.1, 0.1], [1.5, 0.1, 0.1], [0.3, 0.1, 0.1]])
    voxels, coords, num, ids = on(device, gen.generate_voxel_with_id(pts.to(device)))
    assert ids.tolist() == [0, 0, 1, 0] and num.tolist() == [2, 1]
    assert coords.tolist() == [[0, 0, 0], [0, 0, 1]]
    assert torch.equal(voxels[0], pts[:2])



def test_calls_do_not_leak_into_each_other():
    """The op keeps per-thread buffers between calls: a call after a larger, a smaller and a
    huge cloud (whose buffers are released) gives the same result as the first."""
    vsize, coors_range, columns, max_points, max_voxels = CONFIGS["kitti"]
    gen = PointToVoxel(vsize, coors_range, columns, max_voxels, max_points)
    cloud = torch.from_numpy(synthetic_cloud("kitti", vsize, coors_range, columns))
    first = gen.generate_voxel_with_id(cloud)
    rng = np.random.default_rng(7)
    for n in (len(cloud) * 3, 50, (1 << 22) + 1):
        other = rng.uniform(-5, 20, size=(n, columns)).astype(np.float32)
        gen.generate_voxel_with_id(torch.from_numpy(other))
        gen.generate_voxel_mean(torch.from_numpy(other))
        assert_outputs_equal(gen.generate_voxel_with_id(cloud), first)


def test_outputs_stay_valid_while_later_calls_reuse_freed_storage():
    """The op's outputs come from blocks that freed outputs hand back: live outputs never
    change, blocks move between threads, and an output can still grow with resize_."""
    vsize, coors_range, columns, max_points, max_voxels = CONFIGS["kitti"]
    gen = PointToVoxel(vsize, coors_range, columns, max_voxels, max_points)
    clouds = [
        torch.from_numpy(synthetic_cloud("kitti", vsize, coors_range, columns)[k:])
        for k in range(0, 4000, 500)
    ]
    expected = [tuple(t.clone() for t in gen.generate_voxel_with_id(c)) for c in clouds]
    kept = [gen.generate_voxel_with_id(c) for c in clouds[::2]]  # alive through the rest
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # allocated there, freed here
        for _ in range(3):
            for out, want in zip(pool.map(gen.generate_voxel_with_id, clouds), expected):
                assert_outputs_equal(out, want)
    for out, want in zip(kept, expected[::2]):
        assert_outputs_equal(out, want)
    voxels = kept[0][0]
    voxels.resize_(voxels.shape[0] * 3, *voxels.shape[1:])
    assert torch.equal(voxels[: len(expected[0][0])], expected[0][0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_voxelizes_leaves_a_working_child():
    """A process forked while another thread is inside the output allocator (a DataLoader
    starting its workers while a thread voxelizes) must still voxelize: the allocator's lock
    is not left held in the child. Run in a fresh process; a hung child is killed by SIGALRM."""
    script = """
import os, signal, sys, threading, torch
from spconv_lite import ops
torch.set_num_threads(1)
points = torch.rand(64, 4) * 4
def voxelize():
    return ops.voxelize(points, [1, 1, 1], [0, 0, 0], [4, 4, 4], 4, 100)
def spin():
    while True:
        voxelize()
for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
for fork in range(400):
    pid = os.fork()
    if pid == 0:
        signal.alarm(3)
        voxelize()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        print(f"child of fork {fork} ended with status {status}", flush=True)
        os._exit(1)
os._exit(0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- real frames


@pytest.fixture(scope="module")
def frame_outputs():
    """Our PointToVoxel output per frame and device (computed once), as CPU tensors."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(frame: Frame, device: str = "cpu"):
        if (frame.id, device) not in cache:
            pts = frame.points()
            gen = PointToVoxel(
                frame.vsize, frame.coors_range, pts.shape[1], frame.max_voxels, frame.max_points,
                device=device,
            )
            outputs = gen.generate_voxel_with_id(torch.from_numpy(pts).to(device))
            cache[frame.id, device] = (pts, on(device, outputs))
        return cache[frame.id, device]

    return get


README_FRAMES = [f for f in FRAMES if f.voxels is not None]  # the .ply is not in its table


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frame", README_FRAMES, ids=[f.id for f in README_FRAMES])
def test_frame_counts_and_hash_as_readme(frame, device, frame_outputs):
    _, (voxels, coords, num, _) = frame_outputs(frame, device)
    assert len(coords) == frame.voxels
    assert int(num.sum()) == frame.points_kept
    assert sorted_coords_sha16(coords) == frame.coords_sha16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("frame", FRAMES, ids=FRAME_IDS)
def test_frame_matches_spconv(frame, device, frame_outputs):
    pts, ours = frame_outputs(frame, device)
    assert_outputs_equal(ours, SpconvCache.voxelize(frame, pts))


@pytest.mark.parametrize(
    "frame_index, row, coordinates, stored, file_rows",
    EXACT_VOXELS,
    ids=[f"{FRAMES[e[0]].id}-voxel{e[1]}" for e in EXACT_VOXELS],
)
@pytest.mark.parametrize("device", DEVICES)
def test_exact_voxels(frame_index, row, coordinates, stored, file_rows, device, frame_outputs):
    pts, (voxels, coords, num, ids) = frame_outputs(FRAMES[frame_index], device)
    assert tuple(coords[row].tolist()) == coordinates
    assert int(num[row]) == stored
    assert torch.equal(voxels[row, :stored], torch.from_numpy(pts[list(file_rows)]))
    assert not voxels[row, stored:].any()
    assert (ids[list(file_rows)] == row).all()


@pytest.fixture(scope="module")
def large_cloud() -> np.ndarray:
    """Ten shifted copies of the KITTI frame (1.15M points): large enough for the op's
    multi-threaded passes (clouds under 2^20 points run on one thread)."""
    pts = FRAMES[0].points()
    copies = [pts + np.float32([0.0173 * k, -0.0311 * k, 0.007 * k, 0.0]) for k in range(10)]
    return np.concatenate(copies).astype(np.float32)


@pytest.mark.parametrize("mode", ["static", "empty_mean", "dynamic"])
def test_results_do_not_depend_on_thread_count(mode, large_cloud, threads):
    pts = torch.from_numpy(large_cloud)
    gen = PointToVoxel(FRAMES[0].vsize, FRAMES[0].coors_range, 4, 150000, 5)
    run = {
        "static": lambda: gen.generate_voxel_with_id(pts),
        "empty_mean": lambda: gen.generate_voxel_with_id(pts, empty_mean=True),
        "dynamic": lambda: gen.generate_voxel_mean(pts),
    }[mode]
    results = []
    for count in (1, 2):
        threads(count)
        results.append(run())
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if mode == "static":  # and the multi-threaded result is spconv's
        reference = spconv_point_to_voxel()(
            list(FRAMES[0].vsize), list(FRAMES[0].coors_range), 4, 150000, 5
        )
        threads(1)
        assert_outputs_equal(results[1], reference.generate_voxel_with_id(pts))


def test_memory_does_not_grow_with_grid_volume():
    """A 2e6 x 2e6 x 2e5 grid (8e17 voxels; spconv would allocate its volume in int32) takes
    about as much memory as a small one: measured in a fresh process."""
    script = """
import json, resource, sys, torch
import spconv_lite
# 1% inside the range: a coordinate within a float32 rounding of its upper bound quantizes
# to the cell past the grid and is dropped (as spconv drops it).
scale = torch.tensor([198.0, 198.0, 19.8, 1.0])
pts = (torch.rand(200000, 4, generator=torch.Generator().manual_seed(0))
       - torch.tensor([0.5, 0.5, 0.5, 0.0])) * scale
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
spconv_lite.PointToVoxel([0.1, 0.1, 0.1], [-100, -100, -10, 100, 100, 10], 4, 10**6, 5)(pts)
small = peak_mb()
out = spconv_lite.PointToVoxel([1e-4] * 3, [-100, -100, -10, 100, 100, 10], 4, 10**6, 5)(pts)
print(json.dumps({"small": small, "huge": peak_mb(), "voxels": out[1].shape[0]}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["voxels"] == 200000
    assert stats["huge"] - stats["small"] < 64, stats  # MB


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(vsize_xyz=[0.1, 0.0, 0.1]), "vsize_xyz"),
        (dict(vsize_xyz=[0.1, -0.1, 0.1]), "vsize_xyz"),
        (dict(vsize_xyz=[0.1, float("nan"), 0.1]), "vsize_xyz"),
        (dict(vsize_xyz=[0.1, 0.1]), "coors_range_xyz"),
        (dict(coors_range_xyz=[0, 0, 0, 1, -1, 1]), "coors_range_xyz"),
        (dict(coors_range_xyz=[0, 0, 0, 0.01, 1, 1]), "coors_range_xyz"),
        (dict(vsize_xyz=[1e-9, 1e-9, 1e-9]), "vsize_xyz"),  # 2^31 or more voxels on an axis
        (dict(vsize_xyz=[1e-5, 1e-5, 1e-5], coors_range_xyz=[0, 0, 0, 2e4, 2e4, 2e4]), "grid"),
        (dict(num_point_features=2), "num_point_features"),
        (dict(max_num_voxels=0), "max_num_voxels"),
        (dict(max_num_points_per_voxel=-1), "max_num_points_per_voxel"),
        (dict(max_num_voxels=2**63),
         r"max_num_voxels must be at most 2\^63 - 1, got 9223372036854775808$"),
        (dict(max_num_points_per_voxel=2**31),
         r"max_num_points_per_voxel must be at most 2\^31 - 1, got 2147483648$"),
    ],
)
def test_bad_configuration_raises_value_error(kwargs, name):
    args = dict(
        vsize_xyz=[0.1, 0.1, 0.1], coors_range_xyz=[0, 0, 0, 1, 1, 1], num_point_features=4,
        max_num_voxels=10, max_num_points_per_voxel=5,
    )  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        PointToVoxel(**args)


@pytest.mark.parametrize(
    "points, error, name",
    [
        (torch.zeros(5, 3), ValueError, "num_point_features"),
        (torch.zeros(5), ValueError, "num_point_features"),
        (torch.zeros(5, 4, dtype=torch.int32), TypeError, "floating"),
        ([[0.0, 0.0, 0.0, 0.0]], TypeError, "pc must be"),
    ],
)
def test_bad_points_raise(points, error, name):
    gen = PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1], 4, 10, 5)
    with pytest.raises(error, match=name):
        gen(points)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(voxel_size=[0.1, 0.0, 0.1]), "voxel_size"),
        (dict(range_min=[0.0, float("inf"), 0.0]), "range_min"),
        (dict(grid_size=[10, 0, 10]), "grid_size"),
        (dict(grid_size=[10, 20, 0]), r"grid_size must be positive, got \[10, 20, 0\]"),  # x, y, z
        (dict(grid_size=[2**31, 1, 1]), "grid_size"),
        (dict(grid_size=[2**30, 2**30, 2**30]), "grid_size"),
        (dict(grid_size=[10, 10]), "same length"),
        (dict(max_points_per_voxel=0), "max_points_per_voxel"),
        (dict(max_points_per_voxel=2**62), r"max_points_per_voxel must be in \[1, 2\^31 - 1\]"),
        (dict(max_voxels=-1), "max_voxels"),
        (dict(points=torch.zeros(4, 2)), "points"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_op_checks_its_arguments(kwargs, name, device):
    args = dict(
        points=torch.zeros(4, 3), voxel_size=[0.1] * 3, range_min=[0.0] * 3, grid_size=[10] * 3,
        max_points_per_voxel=5, max_voxels=10,
    )  # fmt: skip
    args.update(kwargs)
    args["points"] = args["points"].to(device)
    with pytest.raises(ValueError, match=name):
        ops.voxelize(**args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid_size=[2.7, 2, 2]), r"grid_size must hold whole numbers, got \[2.7, 2, 2\]"),
    (dict(max_voxels=2.9), r"max_voxels must be a whole number, got 2.9"),
    (dict(max_points_per_voxel=True), r"max_points_per_voxel must be a whole number, got True"),
])  # fmt: skip
def test_op_refuses_fractional_counts(kwargs, message):
    # They were truncated: grid_size 2.7 became 2 and dropped the points in the third voxel.
    args = dict(points=torch.tensor([[0.1, 0.1, 0.1], [2.5, 0.1, 0.1]]), voxel_size=[1.0] * 3,
                range_min=[0.0] * 3, grid_size=[3, 2, 2], max_points_per_voxel=4, max_voxels=10)
    args.update(kwargs)
    with pytest.raises(TypeError, match=message):
        ops.voxelize(**args)
    whole = ops.voxelize(args["points"], [1.0] * 3, [0.0] * 3, [3.0, 2.0, 2.0], 4.0, 10.0)
    assert whole[1].tolist() == [[0, 0, 0], [0, 0, 2]]


@pytest.mark.parametrize("device", DEVICES)
def test_op_rejects_points_neither_float32_nor_float64(device):
    points = torch.zeros(4, 3, dtype=torch.float16, device=device)
    with pytest.raises(TypeError, match="points must be float32 or float64, got Half"):
        ops.voxelize(points, [1.0] * 3, [0.0] * 3, [2] * 3, 1, 1)


# ----------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["voxelize", "voxelize_mean"])
def test_opcheck(op, dtype):
    pts = torch.from_numpy(synthetic_cloud("opcheck", (0.5,) * 3, (0, 0, 0, 2, 2, 2), 4, n=200))
    pts = pts.to(dtype)
    geometry = ([0.5] * 3, [0.0] * 3, [4] * 3)
    args = (pts, *geometry, 3, 100, False) if op == "voxelize" else (pts, *geometry, 100)
    torch.library.opcheck(getattr(torch.ops.spconv_lite, op).default, args)


# ----------------------------------------------------------------------------- helpers


def test_voxel_to_point_maps_results_back():
    pts = torch.from_numpy(synthetic_cloud("seg", (0.5,) * 3, (0, 0, 0, 2, 2, 2), 4))
    gen = PointToVoxel([0.5] * 3, [0, 0, 0, 2, 2, 2], 4, 1000, 5)
    features, coords, _, ids = gen.generate_voxel_mean(pts)
    per_point = voxel_to_point(coords.float(), ids, fill_value=-1)
    kept = ids >= 0
    assert torch.equal(per_point[kept], coords[ids[kept]].float())
    assert (per_point[~kept] == -1).all()
    with pytest.raises(ValueError, match=r"point_voxel_id must hold voxel rows in \[0, 1\) or -1"):
        voxel_to_point(coords[:1].float(), ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["mean-of-kept", "dynamic"])
def test_batch_point_clouds(dynamic, device):
    gen = PointToVoxel([0.5] * 3, [0, 0, 0, 2, 2, 2], 4, 1000, 2, device=device)
    clouds = [
        torch.from_numpy(synthetic_cloud(f"batch{b}", (0.5,) * 3, (0, 0, 0, 2, 2, 2), 4, n=300))
        for b in range(3)
    ]
    x, point_rows = batch_point_clouds(
        [c.to(device) for c in clouds], gen, dynamic=dynamic, return_point_ids=True
    )
    assert isinstance(x, spconv_lite.SparseConvTensor)
    assert x.features.device.type == device and x.indices.device.type == device
    x = spconv_lite.SparseConvTensor(x.features.cpu(), x.indices.cpu(), x.spatial_shape, 3)
    point_rows = [rows.cpu() for rows in point_rows]
    assert x.batch_size == 3 and x.spatial_shape == [4, 4, 4]
    start = 0
    for b, cloud in enumerate(clouds):
        voxels, coords, num, ids, means = reference_voxelize(
            cloud, [0.5] * 3, [0, 0, 0, 2, 2, 2], 2, 1000
        )
        expected = means if dynamic else (voxels.sum(axis=1) / num[:, None]).astype(np.float32)
        rows = slice(start, start + len(coords))
        assert (x.indices[rows, 0] == b).all()
        assert torch.equal(x.indices[rows, 1:], torch.from_numpy(coords))
        torch.testing.assert_close(x.features[rows], torch.from_numpy(expected))
        expected_rows = np.where(ids >= 0, ids + start, ids)
        assert torch.equal(point_rows[b], torch.from_numpy(expected_rows))
        start += len(coords)
    assert x.indices.shape[0] == start
    with pytest.raises(ValueError, match="at least one"):
        batch_point_clouds([], gen)
