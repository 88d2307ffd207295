"""The ``spconv-lite`` command: outputs identical to spconv 2.3.8 on every frame, several inputs,
the preview picture, and bad input (one-line error, non-zero status, no file left behind).

Most cases call ``cli.main`` in-process (fast); two run ``python -m spconv_lite`` for real.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from lidar_frames import DATA_DIR, FRAME_IDS, FRAMES, SpconvCache, unavailable

from spconv_lite import cli

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--voxel-size", "1", "1", "1", "--range", "0", "0", "0", "4", "4", "4"]


def run(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_bin(path: Path, points) -> Path:
    np.asarray(points, dtype="<f4").tofile(path)
    return path


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("frame", FRAMES, ids=FRAME_IDS)
def test_voxelize_frame_as_spconv(frame, tmp_path, capsys):
    points = frame.points()
    out = tmp_path / "out.npz"
    status, stdout, stderr = run(capsys, "voxelize", frame.path, *frame.cli_args(), "-o", out)
    assert status == 0, stderr
    expected = SpconvCache.voxelize(frame, points)
    with np.load(out) as saved:
        assert sorted(saved.files) == ["coordinates", "num_points_per_voxel", "voxels"]
        for name, reference in zip(["voxels", "coordinates", "num_points_per_voxel"], expected):
            assert saved[name].dtype == reference.numpy().dtype, name
            np.testing.assert_array_equal(saved[name], reference.numpy(), err_msg=name)
    assert f"{len(points):,} points read" in stdout
    assert f"{len(expected[1]):,} voxels" in stdout
    assert files_in(tmp_path) == ["out.npz"]


def test_summary_counts(tmp_path, capsys):
    points = [[0.5, 0.5, 0.5], [0.6, 0.5, 0.5], [0.7, 0.5, 0.5], [9, 9, 9], [np.nan, 1, 1],
              [1.5, 1.5, np.inf], [2.5, 2.5, 2.5]]  # fmt: skip
    source = write_bin(tmp_path / "c.bin", points)
    args = ["voxelize", source, *SMALL, "--point-dims", 3, "--max-points-per-voxel", 2]
    status, out, err = run(capsys, *args, "-o", tmp_path / "c.npz")
    assert status == 0, err
    assert "7 points read, 4 in range, 2 voxels, 1 dropped by limits, 2 non-finite dropped" in out
    with np.load(tmp_path / "c.npz") as saved:
        assert saved["num_points_per_voxel"].tolist() == [2, 1]


def test_empty_cloud_gives_valid_file(tmp_path, capsys):
    source = write_bin(tmp_path / "empty.bin", np.zeros((0, 4)))
    status, out, err = run(capsys, "voxelize", source, *SMALL, "-o", tmp_path / "e.npz")
    assert status == 0, err
    with np.load(tmp_path / "e.npz") as saved:
        assert saved["voxels"].shape == (0, 5, 4) and saved["coordinates"].shape == (0, 3)
    assert "0 points read" in out and "0 voxels" in out


def test_several_inputs_and_directory(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ["a.bin", "b.bin", "c.npy"]:
        points = rng.uniform(0, 4, size=(50, 4)).astype(np.float32)
        (
            np.save(folder / name, points)
            if name.endswith(".npy")
            else write_bin(folder / name, points)
        )
    (folder / "notes.txt").write_text("not a cloud")
    out = tmp_path / "voxels"
    status, stdout, stderr = run(
        capsys, "voxelize", folder, *SMALL, "-o", out, "--progress", "always"
    )
    assert status == 0, stderr
    assert files_in(out) == ["a.npz", "b.npz", "c.npz"]
    assert len(stdout.strip().splitlines()) == 3
    assert "[" + "#" * 30 + "] 3/3" in stderr  # the finished progress bar
    with np.load(out / "c.npz") as saved:
        expected = torch.from_numpy(np.load(folder / "c.npy"))
        from spconv_lite import PointToVoxel

        voxels = PointToVoxel([1, 1, 1], [0, 0, 0, 4, 4, 4], 4, 2**31 - 1, 5)(expected)[0]
        np.testing.assert_array_equal(saved["voxels"], voxels.numpy())


def test_outputs_that_would_collide_are_refused(tmp_path, capsys):
    write_bin(tmp_path / "x.bin", np.zeros((2, 4)))
    np.save(tmp_path / "x.npy", np.zeros((2, 4)))
    status, _, err = run(
        capsys, "voxelize", tmp_path / "x.bin", tmp_path / "x.npy", *SMALL, "-o", tmp_path / "o"
    )
    assert status == 1 and "would both write" in err
    assert not (tmp_path / "o").exists()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (
        kind == b"IHDR"
        and zlib.crc32(data[12 : 16 + length])
        == struct.unpack(">I", data[16 + length : 20 + length])[0]
    )
    return struct.unpack(">II", data[16:24])


def test_preview_png(tmp_path, capsys):
    points = [[0.5, 0.5, 0.5], [0.5, 0.5, 2.5], [3.5, 1.5, 0.5]]
    source = write_bin(tmp_path / "c.bin", points)
    status, _, err = run(
        capsys, "voxelize", source, *SMALL, "--point-dims", 3, "-o", tmp_path / "c.npz",
        "--preview", tmp_path / "bev.png",
    )  # fmt: skip
    assert status == 0, err
    data = (tmp_path / "bev.png").read_bytes()
    assert png_size(data) == (4, 4)  # x by y voxels
    (idat_length,) = struct.unpack(">I", data[33:37])
    rows = zlib.decompress(data[41 : 41 + idat_length])
    pixels = np.frombuffer(rows, np.uint8).reshape(4, 5)[:, 1:]  # a filter byte per row
    # two voxels in column (y=0, x=0): the brightest; row 0 is the largest y
    assert pixels[3, 0] == 255 and pixels[2, 3] == 127 and pixels.sum() == 255 + 127


@pytest.mark.parametrize(
    "case, extra, status, message",
    [
        ("missing file", ["missing.bin"], 1, "no such file or directory: .*missing.bin"),
        ("bin size", ["bad.bin", "--point-dims", "3"], 1, "not a multiple of 4 \\* point_dims"),
        ("inverted range", ["ok.bin", "--range", *"0 0 0 4 -4 4".split()], 2, "--range .*inver"),
        ("zero voxel", ["ok.bin", "--voxel-size", "1", "0", "1"], 2, "--voxel-size must be posi"),
        ("negative voxel", ["ok.bin", "--voxel-size", "1", "-1", "1"], 2, "--voxel-size must be"),
        ("grid too large", ["ok.bin", "--voxel-size", "1e-9", "1", "1"], 2, "more than int32"),
        ("bad option", ["ok.bin", "--max-voxels", "0"], 2, "must be at least 1"),
    ],
)  # fmt: skip
def test_bad_input_one_line_error_no_output(tmp_path, capsys, case, extra, status, message):
    write_bin(tmp_path / "bad.bin", np.zeros(5))
    write_bin(tmp_path / "ok.bin", np.zeros((3, 4)))
    out = tmp_path / "out"
    out.mkdir()
    inputs = [str(tmp_path / a) if a.endswith(".bin") else a for a in extra]
    try:
        code, _, stderr = run(capsys, "voxelize", *SMALL, *inputs, "-o", out / "r.npz")
    except SystemExit as exc:  # argparse rejects bad options itself
        code, stderr = exc.code, capsys.readouterr().err
    assert code == status
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and "Traceback" not in stderr
    assert any(re.search(message, line) for line in lines), stderr
    assert len(lines) == 1 and lines[0].startswith("spconv-lite"), stderr
    assert files_in(out) == []


def test_failed_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    source = write_bin(tmp_path / "c.bin", np.ones((10, 4)))

    def broken_savez(file, **arrays):
        file.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(cli.np, "savez", broken_savez)
    status, _, err = run(capsys, "voxelize", source, *SMALL, "-o", tmp_path / "out" / "c.npz")
    assert status == 1 and "disk full" in err
    assert files_in(tmp_path / "out") == []


def test_module_entry_point_runs(tmp_path):
    """``python -m spconv_lite`` in a fresh process: voxelize, then info."""
    if not DATA_DIR.is_dir():
        unavailable(f"LiDAR test data {DATA_DIR} not found")
    frame = FRAMES[2]
    command = [sys.executable, "-m", "spconv_lite"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*command, "voxelize", str(frame.path), *frame.cli_args(), "-o", str(tmp_path / "k.npz")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "13,092 voxels" in done.stdout
    info = subprocess.run([*command, "info"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert info.returncode == 0, info.stderr
    assert "voxelize" in info.stdout and "threads" in info.stdout and "CUDA" in info.stdout
    missing = subprocess.run(
        [*command, "voxelize", "nope.bin", *SMALL],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "nope.bin" in missing.stderr


def test_bench_runs_a_checkout_benchmark(tmp_path):
    """``spconv-lite bench voxelize ...`` runs benchmarks/bench_voxelize.py with the arguments."""
    if not DATA_DIR.is_dir():
        unavailable(f"LiDAR test data {DATA_DIR} not found")
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "spconv_lite", "bench", "voxelize", "--repeats", "2",
         "--warmup", "1", "--threads", "1", "--no-memory", "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "frame (115,384 points)" in done.stdout
    assert json.loads(out.read_text())["timing"]


def test_bench_without_scripts_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "benchmark_dir", lambda: tmp_path)
    status, _, err = run(capsys, "bench", "networks")
    assert status == 1 and err.count("\n") == 1
    assert "bench_networks.py" in err and "source checkout" in err
    status, _, err = run(capsys, "bench", "all", "--repeats", "1")
    assert status == 2 and "takes no script arguments" in err
