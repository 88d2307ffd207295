"""The ``spconv-lite`` command: outputs identical to spconv 2.3.8 on every frame, several inputs,
the preview picture, and bad input (one-line error, non-zero status, no file left behind).

Most cases call ``cli.main`` in-process (fast); two run ``python -m spconv_lite`` for real.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from lidar_frames import DATA_DIR, FRAME_IDS, FRAMES, SpconvCache, require_open3d, unavailable

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


def test_outputs_get_the_umask_mode_without_touching_the_umask(tmp_path, capsys, monkeypatch):
    """Files are created 0666 less the umask, like any tool's; the umask is never set, not even
    briefly to read it (that races other threads' file creation: their files came out 0666)."""
    source = write_bin(tmp_path / "c.bin", [[0.5, 0.5, 0.5]])
    previous = os.umask(0o027)
    try:
        def refuse(mask):
            raise AssertionError(f"the command set the umask to {mask:o}")

        monkeypatch.setattr(os, "umask", refuse)
        status, _, err = run(capsys, "voxelize", source, *SMALL, "--point-dims", 3,
                             "-o", tmp_path / "c.npz", "--preview", tmp_path / "c.png")
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert status == 0, err
    for name in ("c.npz", "c.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert files_in(tmp_path) == ["c.bin", "c.npz", "c.png"]


def test_summary_counts(tmp_path, capsys):
    points = [[0.5, 0.5, 0.5], [0.6, 0.5, 0.5], [0.7, 0.5, 0.5], [9, 9, 9], [np.nan, 1, 1],
              [1.5, 1.5, np.inf], [2.5, 2.5, 2.5]]  # fmt: skip
    source = write_bin(tmp_path / "c.bin", points)
    args = ["voxelize", source, *SMALL, "--point-dims", 3, "--max-points-per-voxel", 2]
    status, out, err = run(capsys, *args, "-o", tmp_path / "c.npz")
    assert status == 0, err
    assert ("7 points read as 3 float32 columns (--point-dims 3), 4 in range, 2 voxels, "
            "1 dropped by limits, 2 non-finite dropped") in out
    with np.load(tmp_path / "c.npz") as saved:
        assert saved["num_points_per_voxel"].tolist() == [2, 1]


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_empty_input_is_an_error(tmp_path, capsys, suffix):
    source = tmp_path / f"empty{suffix}"
    if suffix == ".npy":
        np.save(source, np.zeros((0, 4), dtype=np.float32))
    else:
        write_bin(source, np.zeros((0, 4)))
    status, out, err = run(capsys, "voxelize", source, *SMALL, "-o", tmp_path / "e.npz")
    assert status == 1 and out == ""
    assert err == f"spconv-lite: error: {str(source)!r} holds no points\n"
    assert not (tmp_path / "e.npz").exists()


def test_no_point_in_range_warns_with_range_and_bounding_box(tmp_path, capsys):
    source = write_bin(tmp_path / "far.bin", [[100.5, -3, 7.25, 1], [120, 4.5, 8, 0.5]])
    wanted = ["--voxel-size", "0.05", "0.05", "0.1", "--range", "0", "-40", "-3", "70.4", "40",
              "1"]
    status, out, err = run(capsys, "voxelize", source, *wanted, "-o", tmp_path / "far.npz")
    assert status == 0 and "2 points read" in out and "0 in range" in out
    assert err == (f"spconv-lite: warning: {source}: no point lies inside --range 0 -40 -3 70.4 "
                   "40 1; the points read span x [100.5, 120], y [-3, 4.5], z [7.25, 8]\n")
    with np.load(tmp_path / "far.npz") as saved:
        assert saved["voxels"].shape == (0, 5, 4) and saved["coordinates"].shape == (0, 3)


def test_float64_file_is_binned_in_float64(tmp_path, capsys):
    """A float64 cloud in a UTM frame is voxelized in float64, as PointToVoxel bins float64
    points; read as float32 (as before), about half of its points moved to other voxels."""
    rng = np.random.default_rng(3)
    points = np.array([512_345.0, 4_180_123.0, 35.0]) + rng.uniform(0, 20, (400, 3))
    np.save(tmp_path / "utm.npy", points)
    voxel_size, coors_range = [0.1, 0.1, 0.1], [512_340, 4_180_120, 30, 512_370, 4_180_150, 60]
    status, _, err = run(capsys, "voxelize", tmp_path / "utm.npy", "--voxel-size", *voxel_size,
                         "--range", *coors_range, "-o", tmp_path / "utm.npz")
    assert status == 0, err
    from spconv_lite import PointToVoxel

    voxelizer = PointToVoxel(voxel_size, coors_range, 3, 2**31 - 1, 5)
    coords = voxelizer(torch.from_numpy(points))[1].numpy()
    rounded = voxelizer(torch.from_numpy(points).float())[1].numpy()
    assert len(set(map(tuple, coords)) - set(map(tuple, rounded))) > 100
    with np.load(tmp_path / "utm.npz") as saved:
        np.testing.assert_array_equal(saved["coordinates"], coords)
        assert saved["voxels"].dtype == np.float32


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
    assert files_in(out) == ["a.voxels.npz", "b.voxels.npz", "c.voxels.npz"]
    assert len(stdout.strip().splitlines()) == 3
    assert "[" + "#" * 30 + "] 3/3" in stderr  # the finished progress bar
    with np.load(out / "c.voxels.npz") as saved:
        expected = torch.from_numpy(np.load(folder / "c.npy"))
        from spconv_lite import PointToVoxel

        voxels = PointToVoxel([1, 1, 1], [0, 0, 0, 4, 4, 4], 4, 2**31 - 1, 5)(expected)[0]
        np.testing.assert_array_equal(saved["voxels"], voxels.numpy())


def test_unreadable_files_in_a_folder_fail_alone(tmp_path, capsys):
    """An empty or corrupt file is reported on one line; the other inputs are still voxelized."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ["a.npy", "d.npy"]:
        np.save(folder / name, np.random.default_rng(0).uniform(0, 4, (50, 4)))
    (folder / "b.npz").write_bytes(b"")
    (folder / "c.npy").write_bytes(b"\x93NUMPY")
    out = tmp_path / "voxels"
    status, stdout, stderr = run(capsys, "voxelize", folder, *SMALL, "-o", out)
    assert status == 1 and "Traceback" not in stderr
    assert files_in(out) == ["a.voxels.npz", "d.voxels.npz"]
    errors = stderr.strip().splitlines()
    assert re.search(r"error: '.*b\.npz' is not a readable \.npz file", errors[0]), stderr
    assert re.search(r"error: '.*c\.npy' is not a readable \.npy file", errors[1]), stderr
    assert errors[2:] == ["spconv-lite: error: 2 of 4 inputs failed"]


def test_outputs_that_would_collide_are_refused(tmp_path, capsys):
    write_bin(tmp_path / "x.bin", np.zeros((2, 4)))
    np.save(tmp_path / "x.npy", np.zeros((2, 4)))
    status, _, err = run(
        capsys, "voxelize", tmp_path / "x.bin", tmp_path / "x.npy", *SMALL, "-o", tmp_path / "o"
    )
    assert status == 1 and "would both write" in err
    assert not (tmp_path / "o").exists()


def cloud_npz(path: Path) -> Path:
    """A small cloud saved as an .npz with one array, as spconv's benchmark cloud is."""
    np.savez(path, pc=np.random.default_rng(1).uniform(0, 4, (40, 3)).astype(np.float32))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_default_output_is_beside_not_over_the_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cloud_npz(tmp_path / "pc.npz")
    before = (tmp_path / "pc.npz").read_bytes()
    status, out, err = run(capsys, "voxelize", "pc.npz", *SMALL)
    assert status == 0, err
    assert (tmp_path / "pc.npz").read_bytes() == before
    assert files_in(tmp_path) == ["pc.npz", "pc.voxels.npz"] and out.endswith("pc.voxels.npz\n")
    # Run again: the output now exists and is not this run's, so it is refused ...
    status, _, err = run(capsys, "voxelize", "pc.npz", *SMALL)
    assert status == 1 and "--output 'pc.voxels.npz' exists" in err and "--overwrite" in err
    # ... unless --overwrite is given.
    status, _, err = run(capsys, "voxelize", "pc.npz", *SMALL, "--overwrite")
    assert status == 0, err
    assert (tmp_path / "pc.npz").read_bytes() == before


def test_folder_output_into_the_input_folder(tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    cloud_npz(folder / "a.npz")
    write_bin(folder / "b.bin", np.ones((5, 4)))
    inputs = snapshot(folder)
    status, _, err = run(capsys, "voxelize", folder, *SMALL, "-o", folder)
    assert status == 0, err
    assert files_in(folder) == ["a.npz", "a.voxels.npz", "b.bin", "b.voxels.npz"]
    assert {k: v for k, v in snapshot(folder).items() if k in inputs} == inputs
    # A second run neither reads its own outputs as inputs nor replaces them unasked.
    status, _, err = run(capsys, "voxelize", folder, *SMALL, "-o", folder, "--overwrite")
    assert status == 0, err
    assert files_in(folder) == ["a.npz", "a.voxels.npz", "b.bin", "b.voxels.npz"]


@pytest.mark.parametrize("case, inputs, extra, message", [
    ("output is the input", ["pc.npz"], ["-o", "pc.npz", "--overwrite"],
     r"--output '.*pc\.npz' is an input: refusing to write over it"),
    ("output links to the input", ["pc.npz"], ["-o", "link.npz", "--overwrite"],
     r"--output '.*link\.npz' is an input"),
    ("preview is the input", ["pc.npz"], ["--preview", "pc.npz", "--overwrite", "-o", "new.npz"],
     r"--preview '.*pc\.npz' is an input"),
    ("output exists", ["pc.npz"], ["-o", "old.npz"], r"--output '.*old\.npz' exists: refusing"),
    ("preview exists", ["pc.npz"], ["-o", "new.npz", "--preview", "old.npz"],
     r"--preview '.*old\.npz' exists"),
    ("output in a folder input", ["scans"], ["-o", "scans", "--preview", "scans"],
     r"--preview '.*scans/a\.png' exists"),
    ("several inputs, one file", ["pc.npz", "scans"], ["-o", "single.npz"],
     r"several inputs need an output folder, but --output '.*single\.npz' names a \.npz file"),
    ("several previews, one file", ["pc.npz", "scans"], ["-o", "out", "--preview", "one.png"],
     r"several inputs need an output folder, but --preview '.*one\.png' names a \.png file"),
    ("below a file", ["pc.npz"], ["-o", "old.npz/out.npz"],
     r"cannot write --output '.*old\.npz/out\.npz': '.*old\.npz' is a file, not a folder"),
    ("output and preview collide", ["pc.npz"], ["-o", "same", "--preview", "same"],
     r"--output and --preview of 'pc\.npz' would both write 'same'"),
    ("preview is the output through a linked folder", ["pc.npz"],
     ["-o", "dest/out.npz", "--preview", "alias/out.npz"],
     r"--output and --preview of 'pc\.npz' would both write 'alias/out\.npz'"),
    ("one input given twice", ["pc.npz", "pc.npz"], ["-o", "out"],
     r"input 'pc\.npz', given twice, would both write 'out/pc\.voxels\.npz'"),
    ("a link to nothing at the output", ["pc.npz"], ["-o", "dangling.npz"],
     r"--output 'dangling\.npz' exists: refusing"),
    # A path through a folder that does not exist yet reaches the file the write reaches.
    ("output is the input through a missing folder", ["pc.npz"],
     ["-o", "new/../pc.npz", "--overwrite"], r"--output 'new/\.\./pc\.npz' is an input"),
    ("output exists through a missing folder", ["pc.npz"], ["-o", "new/../old.npz"],
     r"--output 'new/\.\./old\.npz' exists: refusing"),
    ("below a file through a missing folder", ["pc.npz"], ["-o", "new/../old.npz/out.npz"],
     r"cannot write --output 'new/\.\./old\.npz/out\.npz': '.*old\.npz' is a file"),
    ("a FIFO at the output", ["pc.npz"], ["-o", "fifo.npz", "--overwrite"],
     r"--output 'fifo\.npz' is a device, FIFO or socket, not a file: refusing to replace it"),
])  # fmt: skip
def test_unsafe_destination_refused_before_reading(tmp_path, capsys, monkeypatch, case, inputs,
                                                   extra, message):
    cloud_npz(tmp_path / "pc.npz")
    (tmp_path / "old.npz").write_bytes(b"someone else's file")
    (tmp_path / "link.npz").symlink_to(tmp_path / "pc.npz")
    (tmp_path / "dangling.npz").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo.npz")
    (tmp_path / "dest").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "dest")
    (tmp_path / "scans").mkdir()
    cloud_npz(tmp_path / "scans" / "a.npz")
    (tmp_path / "scans" / "a.png").write_bytes(b"an older picture")

    def state():
        return {p: os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file()
                else stat.S_IFMT(p.lstat().st_mode) for p in tmp_path.rglob("*")}  # fmt: skip

    before = state()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "read_input", lambda *a: pytest.fail("an input was read"))
    status, out, err = run(capsys, "voxelize", *inputs, *SMALL, *extra)
    assert status == 1 and out == ""
    assert len(err.splitlines()) == 1 and re.search(f"^spconv-lite: error: {message}", err), err
    assert state() == before


@pytest.mark.parametrize("extra, message", [
    (["", "-o", "out.npz"], "an input path is empty"),
    (["pc.npz", "-o", ""], "--output is empty"),
    (["pc.npz", "--preview", ""], "--preview is empty"),
])  # fmt: skip
def test_empty_paths_are_argument_errors(tmp_path, capsys, monkeypatch, extra, message):
    """``voxelize "$FILE"`` with FILE unset: Path("") would be the working directory."""
    cloud_npz(tmp_path / "pc.npz")
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "voxelize", *extra, *SMALL)
    assert status == 2 and out == "" and err.startswith(f"spconv-lite: error: {message}")
    assert files_in(tmp_path) == ["pc.npz"]


def test_output_name_of_most_bytes_is_written(tmp_path, capsys):
    """A 255-byte output name (the most a name may have): its temporary name is shortened."""
    source = write_bin(tmp_path / ("\u00e9" * 122 + ".bin"), [[0.5, 0.5, 0.5]])  # 2 bytes each
    status, _, err = run(capsys, "voxelize", source, *SMALL, "--point-dims", 3, "-o", tmp_path)
    assert status == 0, err
    assert files_in(tmp_path) == sorted([source.name, "\u00e9" * 122 + ".voxels.npz"])


def test_name_too_long_for_its_output_is_one_line(tmp_path, capsys):
    source = write_bin(tmp_path / ("c" * 250 + ".bin"), [[0.5, 0.5, 0.5]])  # a legal name
    status, out, err = run(capsys, "voxelize", source, *SMALL, "--point-dims", 3)
    assert status == 1 and out == "" and len(err.splitlines()) == 1
    assert "c.voxels.npz': File name too long" in err


def refuse_hard_links(*args):
    raise PermissionError(errno.EPERM, "Operation not permitted")  # as FAT or some FUSE mounts


@pytest.mark.parametrize("hard_links", [True, False])
def test_output_that_appears_while_writing_is_kept(tmp_path, capsys, monkeypatch, hard_links):
    """Another run (or anyone) creates the output after this run's checks: without
    --overwrite their file stays and this run fails; no temporary file is left (also on a file
    system without hard links)."""
    if not hard_links:
        monkeypatch.setattr(os, "link", refuse_hard_links)
    source = write_bin(tmp_path / "c.bin", [[0.5, 0.5, 0.5]])
    out = tmp_path / "c.npz"
    savez = np.savez

    def savez_while_another_writes(file, **arrays):
        savez(file, **arrays)
        out.write_bytes(b"another run's output")

    monkeypatch.setattr(cli.np, "savez", savez_while_another_writes)
    status, _, err = run(capsys, "voxelize", source, *SMALL, "--point-dims", 3, "-o", out)
    assert status == 1 and err == (f"spconv-lite: error: --output {str(out)!r} appeared while "
                                   "this run wrote it: refusing to replace it (--overwrite "
                                   "replaces existing outputs)\n")
    assert out.read_bytes() == b"another run's output"
    assert files_in(tmp_path) == ["c.bin", "c.npz"]


@pytest.mark.parametrize("hard_links", [True, False])
def test_output_is_written_where_nothing_is(tmp_path, capsys, monkeypatch, hard_links):
    if not hard_links:
        monkeypatch.setattr(os, "link", refuse_hard_links)
    source = write_bin(tmp_path / "c.bin", [[0.5, 0.5, 0.5]])
    status, _, err = run(capsys, "voxelize", source, *SMALL, "--point-dims", 3, "-o",
                         tmp_path / "c.npz")
    assert status == 0, err
    assert files_in(tmp_path) == ["c.bin", "c.npz"] and (tmp_path / "c.npz").stat().st_nlink == 1
    with np.load(tmp_path / "c.npz") as saved:
        assert len(saved["coordinates"]) == 1


def test_termination_signal_leaves_no_partial_file(tmp_path):
    """SIGTERM (``timeout``, a job scheduler) mid-write: the temporary file goes, as on Ctrl-C."""
    write_bin(tmp_path / "c.bin", [[0.5, 0.5, 0.5]])
    script = ("import os, signal, sys\nimport numpy as np\nfrom spconv_lite import cli\n"
              "def savez(file, **arrays):\n    file.write(b'PK partial')\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "np.savez = savez\n"
              f"sys.exit(cli.main(['voxelize', 'c.bin', *{SMALL}, '--point-dims', '3', "
              "'-o', 'c.npz']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 128 + 15 and done.stderr == "spconv-lite: terminated (SIGTERM)\n"
    assert files_in(tmp_path) == ["c.bin"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_report_on_a_full_disk_is_one_line(tmp_path):
    write_bin(tmp_path / "c.bin", [[0.5, 0.5, 0.5]])
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "spconv_lite", "voxelize", "c.bin", *SMALL, "--point-dims",
             "3", "-o", "c.npz"], stdout=full, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == "spconv-lite: error: [Errno 28] No space left on device\n"


class FullForPNGs(io.BufferedWriter):
    """A file on a disk that fills up while a PNG is written: part of it lands, then ENOSPC."""

    def write(self, data):
        if bytes(data[:8]) != b"\x89PNG\r\n\x1a\n":
            return super().write(data)
        super().write(data[:20])
        self.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("existing", [False, True])
def test_failed_preview_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch, existing):
    """The preview is written as the outputs are: a failure mid-write leaves no partial PNG and
    no temporary file, and an old preview that --overwrite would replace stays whole."""
    source = write_bin(tmp_path / "c.bin", [[0.5, 0.5, 0.5]])
    preview = tmp_path / "c.png"
    if existing:
        preview.write_bytes(b"old preview")
    monkeypatch.setattr(cli.os, "fdopen", lambda fd, mode: FullForPNGs(io.FileIO(fd, mode)))
    status, _, err = run(capsys, "voxelize", source, *SMALL, "--point-dims", 3, "-o",
                         tmp_path / "c.npz", "--preview", preview, "--overwrite")
    assert status == 1 and err == (f"spconv-lite: error: cannot write --preview {str(preview)!r}: "
                                   f"{os.strerror(errno.ENOSPC)}\n")
    assert files_in(tmp_path) == ["c.bin", "c.npz"] + (["c.png"] if existing else [])
    assert not existing or preview.read_bytes() == b"old preview"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("progress", ["always", "never"])
def test_failing_stderr_stops_no_input(tmp_path, progress):
    """stderr on a full disk: with --progress always the batch stopped at the first redraw with
    no word and status 1, and a warning's or an error's line stopped it too (the warned input
    counted as failed); the bar and the messages are lost, every input is voxelized and the
    status still counts the failure."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ["a.bin", "d.bin"]:
        write_bin(folder / name, [[0.5, 0.5, 0.5]])
    write_bin(folder / "b.bin", np.zeros((0, 3)))  # an error
    write_bin(folder / "c.bin", [[9, 9, 9]])  # a warning: nothing in range
    command = [sys.executable, "-m", "spconv_lite", "voxelize", "scans", *SMALL, "--point-dims",
               "3", "-o", "out", "--progress", progress]  # fmt: skip
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=full, text=True,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                              timeout=300)  # fmt: skip
    assert done.returncode == 1
    assert files_in(tmp_path / "out") == ["a.voxels.npz", "c.voxels.npz", "d.voxels.npz"]
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        "scans/a.bin", "scans/c.bin", "scans/d.bin"]


def test_warnings_and_errors_start_on_a_cleared_bar(tmp_path, capsys):
    """The warning was printed while the bar was drawn, on the bar's line."""
    folder = tmp_path / "scans"
    folder.mkdir()
    write_bin(folder / "a.bin", [[9, 9, 9]])  # a warning
    write_bin(folder / "b.bin", np.zeros((0, 3)))  # an error
    _, _, err = run(capsys, "voxelize", folder, *SMALL, "--point-dims", 3, "-o",
                    tmp_path / "out", "--progress", "always")
    pieces = [line for part in err.split("\r\x1b[K") for line in part.split("\n")]
    messages = [piece for piece in pieces if "spconv-lite:" in piece]
    assert [m.split(":")[:2] for m in messages] == [
        ["spconv-lite", " warning"], ["spconv-lite", " error"], ["spconv-lite", " error"]]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (
        kind == b"IHDR"
        and zlib.crc32(data[12 : 16 + length])
        == struct.unpack(">I", data[16 + length : 20 + length])[0]
    )
    return struct.unpack(">II", data[16:24])


def png_pixels(data: bytes) -> np.ndarray:
    """The pixels ``[H, W, 3]`` of an 8-bit RGB PNG with one IDAT chunk and no row filters."""
    width, height = png_size(data)
    assert data[24:26] == bytes([8, 2])  # 8 bits, RGB
    (idat_length,) = struct.unpack(">I", data[33:37])
    assert data[37:41] == b"IDAT"
    rows = np.frombuffer(zlib.decompress(data[41 : 41 + idat_length]), np.uint8)
    rows = rows.reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) @ [0.299, 0.587, 0.114]


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
    pixels = png_pixels(data)
    # two voxels in column (y=0, x=0), one in (y=1, x=3); row 0 is the largest y
    occupied = pixels.any(axis=2)
    assert occupied.sum() == 2 and occupied[3, 0] and occupied[2, 3]
    assert luminance(pixels[3, 0]) > luminance(pixels[2, 3])


def test_preview_is_readable(tmp_path, capsys):
    """A busy column (a wall) must not turn the many columns of one or two voxels (the ground)
    almost black, as a linear scale to the busiest pixel did: they get a clearly visible
    colour, and more voxels a brighter one."""
    rng = np.random.default_rng(0)
    ground = np.c_[rng.uniform(0, 40, (3000, 2)), rng.uniform(0, 0.2, 3000)]  # one voxel high
    wall = np.c_[np.full(400, 20.5), np.full(400, 20.5), np.linspace(0, 3.9, 400)]
    source = write_bin(tmp_path / "scene.bin", np.vstack([ground, wall]))
    status, _, err = run(
        capsys, "voxelize", source, "--voxel-size", "0.1", "0.1", "0.1", "--range", "0", "0", "0",
        "40", "40", "4", "--point-dims", 3, "-o", tmp_path / "s.npz", "--preview",
        tmp_path / "s.png",
    )  # fmt: skip
    assert status == 0, err
    pixels = png_pixels((tmp_path / "s.png").read_bytes())
    light = luminance(pixels)
    occupied = pixels.any(axis=2)
    assert np.median(light[occupied]) > 90  # of 255
    wall_pixel = (400 - 1 - 205, 205)  # (y, x) = (205, 205); row 0 is the largest y
    assert light[wall_pixel] == light.max() and light.max() > 1.5 * np.median(light[occupied])
    assert len(np.unique(pixels[occupied], axis=0)) > 1  # a colour map, not one grey


@pytest.mark.parametrize(
    "case, extra, status, message",
    [
        ("missing file", ["missing.bin"], 1, "no such file or directory: .*missing.bin"),
        ("bin size", ["bad.bin", "--point-dims", "3"], 1, "not a multiple of 4 \\* point_dims"),
        ("inverted range", ["ok.bin", "--range", *"0 0 0 4 -4 4".split()], 2, "--range .*inver"),
        ("zero voxel", ["ok.bin", "--voxel-size", "1", "0", "1"], 2, "--voxel-size must be posi"),
        ("negative voxel", ["ok.bin", "--voxel-size", "1", "-1", "1"], 2, "--voxel-size must be"),
        ("grid too large", ["ok.bin", "--voxel-size", "1e-9", "1", "1"], 2, r"than the 2\^31 - 1"),
        ("bad option", ["ok.bin", "--max-voxels", "0"], 2, "must be at least 1"),
        ("huge count", ["ok.bin", "--max-voxels", "1" + "0" * 22], 2,
         "--max-voxels: must be at most 2\\^31 - 1, got 1" + "0" * 22),
        ("huge points", ["ok.bin", "--max-points-per-voxel", "3000000000"], 2,
         "--max-points-per-voxel: must be at most 2\\^31 - 1, got 3000000000"),
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


def scan_points(count: int, columns: int) -> np.ndarray:
    """A scan-ordered cloud (consecutive points are neighbours, as a LiDAR records them) with
    ``columns - 3`` extra columns; the last one a timestamp, as in Waymo's files."""
    angle = np.linspace(0, 2 * np.pi, count, endpoint=False)
    xyz = np.c_[20 * np.cos(angle), 20 * np.sin(angle), np.full(count, -1.5)]
    extra = np.random.default_rng(2).uniform(0, 1, (count, columns - 3))
    if columns > 4:
        extra[:, -1] = 1.5e15
    return np.c_[xyz, extra].astype(np.float32)


# The input is written by ``make(path)``; the message names the file once, then what is wrong.
@pytest.mark.parametrize("case, name, make, dims, message", [
    ("npy narrower", "c.npy", lambda p: np.save(p, scan_points(50, 4)), 3,
     r"has 4 columns, but --point-dims 3: the \.npy format states its width"),
    ("npz wider", "c.npz", lambda p: np.savez(p, pc=scan_points(50, 3)), 4,
     r"has 3 columns, but --point-dims 4: the \.npz format states its width"),
    ("pcd.bin not 5", "c.pcd.bin", lambda p: write_bin(p, scan_points(60, 5)), 4,
     r"is named as a nuScenes \.pcd\.bin file, which has 5 float32 columns .* but "
     r"--point-dims 4"),
    ("timestamp column", "w.bin", lambda p: write_bin(p, scan_points(400, 6)), None,
     r"read as 4 float32 columns \(the \.bin default\): 33% of its points have a coordinate "
     r"beyond 10,000 km.*6 float32 columns give plausible coordinates: pass --point-dims 6$"),
    ("float64 file", "d.bin", lambda p: scan_points(400, 4).astype("<f8").tofile(p), None,
     r"read as 4 float32 columns .* no float32 column count from 3 to 16 gives plausible "
     r"coordinates: is it float32\?$"),
    ("truncated", "trunc.bin", lambda p: p.write_bytes(bytes(20)), None,
     r"has 20 bytes, not a multiple of 4 \* point_dims = 16"),
])  # fmt: skip
def test_input_that_contradicts_its_layout_is_refused(tmp_path, capsys, case, name, make, dims,
                                                      message):
    source = tmp_path / name
    make(source)
    dims_args = [] if dims is None else ["--point-dims", dims]
    status, out, err = run(capsys, "voxelize", source, *SMALL, *dims_args, "-o", tmp_path / "o")
    assert status == 1 and out == ""
    assert re.search(rf"^spconv-lite: error: {re.escape(repr(str(source)))} {message}",
                     err.strip()), err
    assert err.count(name) == 1, err  # the file is named once
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, columns, dims", [
    ("c.npy", 5, None), ("c.npy", 5, 5), ("c.pcd.bin", 5, None), ("c.pcd.bin", 5, 5),
    ("w.bin", 6, 6), ("k.bin", 4, None), ("k.bin", 4, 4),
])  # fmt: skip
def test_input_read_with_its_own_width(tmp_path, capsys, name, columns, dims):
    points = scan_points(400, columns)
    source = tmp_path / name
    np.save(source, points) if name.endswith(".npy") else write_bin(source, points)
    dims_args = [] if dims is None else ["--point-dims", dims]
    status, out, err = run(capsys, "voxelize", source, *SMALL, *dims_args, "-o", tmp_path / "o")
    assert status == 0, err
    with np.load(tmp_path / "o") as saved:
        assert saved["voxels"].shape[2] == columns
    if name.endswith(".bin"):  # the command says how it read a raw file
        default = {".pcd.bin": "(nuScenes .pcd.bin)", ".bin": "(the .bin default)"}
        how = default[".pcd.bin" if name.endswith(".pcd.bin") else ".bin"]
        if dims is not None and not name.endswith(".pcd.bin"):
            how = f"(--point-dims {dims})"
        assert f"400 points read as {columns} float32 columns {how}," in out


@pytest.mark.parametrize("value", ["0", "2", "-1"])
def test_point_dims_below_three_is_an_argument_error(tmp_path, capsys, value):
    source = write_bin(tmp_path / "c.bin", np.zeros((3, 4)))
    with pytest.raises(SystemExit) as info:
        cli.main(["voxelize", str(source), *SMALL, "--point-dims", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"spconv-lite voxelize: error: argument --point-dims: must be at least 3 "
                   f"(x, y, z), got {value} (see spconv-lite voxelize -h)\n")


@pytest.mark.parametrize("option, values, message", [
    ("--range", "80 -40 -3 70.4 40 1",
     "--range [80, -40, -3, 70.4, 40, 1] is inverted or empty along x: max 70.4 must be "
     "greater than min 80"),
    ("--voxel-size", "0.05 -0.05 0.1", "--voxel-size must be positive, got [0.05, -0.05, 0.1]"),
    ("--voxel-size", "1e-40 0.05 0.1",  # 70.4 / 1e-40 overflows float32: no numpy warning
     "--voxel-size [1e-40, 0.05, 0.1] and --range [0, -40, -3, 70.4, 40, 1] give inf voxels "
     "along x, more than the 2^31 - 1 an axis may have"),
])  # fmt: skip
def test_grid_errors_print_values_as_typed(tmp_path, capsys, option, values, message):
    source = write_bin(tmp_path / "c.bin", np.zeros((3, 4)))
    args = {"--range": "0 -40 -3 70.4 40 1", "--voxel-size": "0.05 0.05 0.1"}
    args[option] = values
    argv = [a for opt, text in args.items() for a in (opt, *text.split())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status, _, err = run(capsys, "voxelize", source, *argv)
    assert status == 2 and err == f"spconv-lite: error: {message}\n"


def test_closed_stdout_ends_quietly():
    """``spconv-lite info | head -1``: the reader is gone before the output is written."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "spconv_lite", "info"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # no reader: every write to stdout fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_failed_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    source = write_bin(tmp_path / "c.bin", np.ones((10, 4)))

    def broken_savez(file, **arrays):
        file.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(cli.np, "savez", broken_savez)
    status, _, err = run(capsys, "voxelize", source, *SMALL, "-o", tmp_path / "out" / "c.npz")
    # the output is named, not the input or the hidden temporary file
    assert status == 1 and err == (f"spconv-lite: error: cannot write --output "
                                   f"{str(tmp_path / 'out' / 'c.npz')!r}: disk full\n")
    assert files_in(tmp_path / "out") == []


def test_unwritable_output_folder_refused_before_reading(tmp_path, capsys, monkeypatch):
    source = write_bin(tmp_path / "c.bin", np.ones((10, 4)))
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: real_access(path, mode)
                        and Path(path) != tmp_path)  # fmt: skip
    monkeypatch.setattr(cli, "read_input", lambda *a: pytest.fail("an input was read"))
    status, _, err = run(capsys, "voxelize", source, *SMALL, "-o", tmp_path / "new" / "c.npz")
    assert status == 1 and err == (f"spconv-lite: error: cannot write --output "
                                   f"{str(tmp_path / 'new' / 'c.npz')!r}: folder "
                                   f"{str(tmp_path)!r} is not writable\n")


def test_output_ending_in_a_separator_is_a_folder(tmp_path, capsys, monkeypatch):
    """'-o newdir/' for one input wrote a file named newdir."""
    monkeypatch.chdir(tmp_path)
    write_bin(tmp_path / "c.bin", np.ones((10, 4)))
    status, out, err = run(capsys, "voxelize", "c.bin", *SMALL, "-o", "newdir/",
                           "--preview", "pictures/")
    assert status == 0, err
    assert files_in(tmp_path / "newdir") == ["c.voxels.npz"]
    assert files_in(tmp_path / "pictures") == ["c.png"]
    assert out.endswith(" -> newdir/c.voxels.npz\n")


def test_given_point_dims_is_trusted(tmp_path, capsys):
    """Rows that look like two neighbouring points (x, y, z and the point in the previous
    sweep's frame) were refused even with --point-dims 6."""
    xyz = np.random.default_rng(0).uniform(-40, 40, (2000, 3))
    source = write_bin(tmp_path / "flow.bin", np.c_[xyz, xyz + [0.8, 0.05, 0]])
    status, out, err = run(capsys, "voxelize", source, *SMALL, "--point-dims", 6,
                           "-o", tmp_path / "o.npz")
    assert status == 0, err
    assert "2,000 points read as 6 float32 columns (--point-dims 6)" in out


def test_memory_error_fails_one_input(tmp_path, capsys, monkeypatch):
    """A tiny .npy declaring a huge array (numpy raised MemoryError: a traceback, and the
    other inputs were not voxelized), and a MemoryError from any reader, fail that file alone."""
    folder = tmp_path / "scans"
    folder.mkdir()
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 3), }"
    header = header.ljust(117) + "\n"
    (folder / "a.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                                   + header.encode() + bytes(48))
    write_bin(folder / "b.bin", np.random.default_rng(0).uniform(0, 4, (50, 4)))
    write_bin(folder / "c.bin", np.random.default_rng(1).uniform(0, 4, (50, 4)))
    from spconv_lite import io

    read_cloud = io.read_cloud

    def out_of_memory_for_c(path, point_dims, dtype):
        if Path(path).name == "c.bin":
            raise MemoryError
        return read_cloud(path, point_dims, dtype)

    monkeypatch.setattr(io, "read_cloud", out_of_memory_for_c)
    status, _, err = run(capsys, "voxelize", folder, *SMALL, "-o", tmp_path / "out")
    assert status == 1 and "Traceback" not in err
    assert files_in(tmp_path / "out") == ["b.voxels.npz"]
    errors = err.strip().splitlines()
    assert re.search(r"error: '.*a\.npy' is not a readable \.npy file: its header declares an "
                     r"array of shape \[100000000000, 3\]", errors[0]), err
    assert errors[1:] == [f"spconv-lite: error: {folder / 'c.bin'}: not enough memory to read it",
                          "spconv-lite: error: 2 of 3 inputs failed"]


def test_fifo_input_is_not_a_regular_file(tmp_path, capsys):
    """A FIFO was reported as 'no such file'."""
    os.mkfifo(tmp_path / "pipe.bin")
    status, _, err = run(capsys, "voxelize", tmp_path / "pipe.bin", *SMALL, "-o", tmp_path / "o")
    assert status == 1
    assert err == f"spconv-lite: error: {str(tmp_path / 'pipe.bin')!r} is not a regular file\n"


def test_symlink_loop_input_is_named_as_such(tmp_path, capsys):
    """A link to itself was reported as 'no such file or directory'."""
    loop = tmp_path / "loop.bin"
    os.symlink(loop.name, loop)
    status, _, err = run(capsys, "voxelize", loop, *SMALL, "-o", tmp_path / "o")
    assert status == 1 and err == (f"spconv-lite: error: {str(loop)!r} is a symbolic link loop "
                                   f"({os.strerror(errno.ELOOP)})\n")


def test_link_to_nothing_input_is_named_as_such(tmp_path, capsys):
    """It was reported as 'no such file or directory'."""
    link = tmp_path / "scan.bin"
    os.symlink("moved/scan.bin", link)
    status, _, err = run(capsys, "voxelize", link, *SMALL, "-o", tmp_path / "o")
    assert status == 1 and err == (f"spconv-lite: error: {str(link)!r} is a symbolic link to "
                                   "nothing (it points to 'moved/scan.bin')\n")


def test_control_characters_in_names_keep_one_record_per_line(tmp_path, capsys):
    """A newline in a file name split its summary, warning or error line in two; such names are
    printed quoted and escaped as repr does, ordinary ones as they are."""
    folder = tmp_path / "scans"
    folder.mkdir()
    far = write_bin(folder / "far\naway.bin", [[9, 9, 9]])  # a warning: nothing in range
    empty = write_bin(folder / "em\npty.bin", np.zeros((0, 3)))  # an error
    plain = write_bin(folder / "plain.bin", [[0.5, 0.5, 0.5]])
    out = tmp_path / "out"
    status, stdout, stderr = run(capsys, "voxelize", folder, *SMALL, "--point-dims", 3, "-o", out)
    assert status == 1
    summaries = stdout.splitlines()
    assert len(summaries) == 2
    assert summaries[0].startswith(f"{str(far)!r}: 1 points read")
    assert summaries[0].endswith(f" -> {str(out / far.name.replace('.bin', '.voxels.npz'))!r}")
    assert summaries[1].startswith(f"{plain}: 1 points read")
    assert summaries[1].endswith(f" -> {out / 'plain.voxels.npz'}")
    assert stderr.splitlines() == [
        f"spconv-lite: error: {str(empty)!r} holds no points",
        f"spconv-lite: warning: {str(far)!r}: no point lies inside --range 0 0 0 4 4 4; the "
        "points read span x [9, 9], y [9, 9], z [9, 9]",
        "spconv-lite: error: 1 of 3 inputs failed",
    ]
    drawn = io.StringIO()
    cli.ProgressBar(3, drawn).draw(1, far.name)
    assert drawn.getvalue() == "\r\x1b[K[##########....................] 1/3 'far\\naway.bin'"


def test_pcd_error_is_one_clean_line(tmp_path, capsys):
    """open3d's RuntimeError came through with colour codes and a C++ signature."""
    source = tmp_path / "s3.pcd"
    source.write_bytes(b"VERSION 0.7\nFIELDS x y z\nSIZE 3 3 3\nTYPE F F F\nCOUNT 1 1 1\n"
                       b"WIDTH 1\nHEIGHT 1\nPOINTS 1\nDATA binary\n" + bytes(9))
    status, _, err = run(capsys, "voxelize", source, *SMALL, "-o", tmp_path / "o")
    assert status == 1 and err == (
        f"spconv-lite: error: {str(source)!r} has a malformed header line 'TYPE F F F': field "
        "'x' has TYPE F and SIZE 3 (from 'SIZE 3 3 3'), which PCD does not define\n")


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


def test_bench_io_times_the_readers_against_open3d(tmp_path):
    if not DATA_DIR.is_dir():
        unavailable(f"LiDAR test data {DATA_DIR} not found")
    require_open3d()
    out = tmp_path / "io.json"
    done = subprocess.run(
        [sys.executable, "-m", "spconv_lite", "bench", "io", "--repeats", "1", "--warmup", "0",
         "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert [r["input"] for r in results] == [
        "fast_gicp_251370668.pcd", "small_gicp_source.ply", "fast_gicp (binary_compressed)",
        "kitti 000000 (binary_compressed)", "helix 1M (binary_compressed)"]
    assert all(r["ours"]["median_ms"] > 0 and r["speedup_vs_open3d"] > 0 for r in results)


def test_bench_without_scripts_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "benchmark_dir", lambda: tmp_path)
    status, _, err = run(capsys, "bench", "networks")
    assert status == 1 and err.count("\n") == 1
    assert "bench_networks.py" in err and "source checkout" in err
    status, _, err = run(capsys, "bench", "all", "--repeats", "1")
    assert status == 2 and "takes no script arguments" in err


@pytest.mark.parametrize("name, data, results", [
    ("core", "frame.bin", "frame.bin"),  # --data names the frame
    ("core", "frame.bin", "new/../frame.bin"),  # through a folder the write would make
    ("networks", "frames", "frames/frame.bin"),  # --data names the folder of frames
    ("networks", "frames", "frames/results.json"),  # not a frame yet, but in the folder
])  # fmt: skip
def test_bench_refuses_a_results_file_that_is_an_input(tmp_path, name, data, results):
    (tmp_path / "frames").mkdir()
    for frame in (tmp_path / "frame.bin", tmp_path / "frames" / "frame.bin"):
        frame.write_bytes(b"a LiDAR frame")
    done = subprocess.run(
        [sys.executable, "-m", "spconv_lite", "bench", name, "--data", data, "--json", results],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert f"--json '{results}' is an input" in done.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "frames" / "results.json").exists()
    for frame in (tmp_path / "frame.bin", tmp_path / "frames" / "frame.bin"):
        assert frame.read_bytes() == b"a LiDAR frame"
