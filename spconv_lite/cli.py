"""The ``spconv-lite`` command (also ``python -m spconv_lite``).

``spconv-lite voxelize INPUT... --voxel-size VX VY VZ --range X0 Y0 Z0 X1 Y1 Z1`` voxelizes
point-cloud files (or directories of them) exactly as spconv's ``PointToVoxel`` would and writes
one ``<name>.voxels.npz`` per input with ``voxels``, ``coordinates`` (z, y, x) and
``num_points_per_voxel``. It never writes over an input, nor over any existing file unless
``--overwrite`` is given; both are refused before anything is read.
``spconv-lite info`` prints the version, build, registered ops, threads and CUDA status.
``spconv-lite bench NAME [ARGS...]`` runs a benchmark script of a source checkout
(``benchmarks/bench_NAME.py ARGS``; ``--help`` after the name lists its options).

Errors end the command with a one-line message and a non-zero status (2 for arguments the
parser refuses, such as a malformed number or an empty grid; 1 when an input or the output
path cannot be used, or an input fails); outputs are written under a temporary name and
renamed when complete, so a failure never leaves a partial file. A closed standard output
(``spconv-lite info | head -1``) ends the command quietly with status 141, as SIGPIPE ends
other tools.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import signal
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence, TextIO

import numpy as np

__all__ = ["main"]

PROG = "spconv-lite"
# The most --max-points-per-voxel (an int32) and --max-voxels take; the default of the latter,
# as no cloud has more voxels.
_MOST_COUNT = 2**31 - 1
_PREVIEW_MAX_SIDE = 2048  # larger grids are binned down to this many pixels per side
_OUTPUT_SUFFIX = ".voxels.npz"  # never a suffix of an input, so no default output is an input
_SIGPIPE_STATUS = 141


class CommandError(Exception):
    """A failure reported as one line; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > _MOST_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most 2^31 - 1, got {value}")
    return value


def _point_dims(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 3:
        raise argparse.ArgumentTypeError(f"must be at least 3 (x, y, z), got {value}")
    return value


class _TypedFloat(float):
    """A float argument that prints as the user typed it (``70.4``, not float32's
    ``70.4000015258789`` or ``80.0`` for ``80``)."""

    def __new__(cls, text: str) -> "_TypedFloat":
        try:
            value = super().__new__(cls, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        value.text = text
        return value

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole usage block by default)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="spconv_lite command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    vox = commands.add_parser(
        "voxelize",
        help="voxelize point-cloud files like spconv's PointToVoxel",
        description="Voxelize point clouds (.bin, .pcd.bin, .npy, .npz, .pcd, .ply) into .npz "
        "files holding voxels [M, P, C], coordinates [M, 3] (z, y, x) and "
        "num_points_per_voxel [M], identical to spconv 2.x's PointToVoxel.",
    )
    vox.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories")
    vox.add_argument(
        "--voxel-size", nargs=3, type=_TypedFloat, required=True, metavar=("VX", "VY", "VZ")
    )
    vox.add_argument(
        "--range",
        nargs=6,
        type=_TypedFloat,
        required=True,
        dest="coors_range",
        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
        help="grid range: minimum corner then maximum corner",
    )
    vox.add_argument(
        "--max-points-per-voxel",
        type=_positive_int,
        default=5,
        metavar="N",
        help="points kept per voxel (default 5)",
    )
    vox.add_argument(
        "--max-voxels",
        type=_positive_int,
        default=None,
        metavar="N",
        help="voxels kept per cloud, in order of first point (default: no limit)",
    )
    vox.add_argument(
        "--point-dims",
        type=_point_dims,
        default=None,
        metavar="C",
        help="float32 columns of raw .bin files (default 4); the other formats state their "
        "width (.pcd.bin: 5), and a --point-dims that differs is refused",
    )
    vox.add_argument(
        "--output",
        "-o",
        default=None,
        metavar="PATH",
        help="output .npz for one input file; a folder (an existing one, or a path ending in "
        f"'/') for several inputs or a folder input (default: NAME{_OUTPUT_SUFFIX} in the "
        "current folder)",
    )
    vox.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output and preview files (inputs are never written over)",
    )
    vox.add_argument(
        "--preview",
        default=None,
        metavar="PNG",
        help="also write a bird's-eye-view occupancy PNG (a directory of PNGs for several inputs)",
    )
    vox.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr for several files (auto: when a terminal)",
    )
    vox.set_defaults(run=_run_voxelize)

    info = commands.add_parser("info", help="version, build, ops, threads and CUDA")
    info.set_defaults(run=_run_info)

    bench = commands.add_parser(
        "bench",
        help="run a benchmark of the source checkout (benchmarks/bench_NAME.py)",
        description="Run benchmarks/bench_NAME.py of the source checkout with the remaining "
        "arguments, e.g. 'spconv-lite bench networks --threads 1,2 --json out.json'. "
        "'all' runs every CPU benchmark with its defaults. Benchmarks: "
        + "; ".join(f"{name}: {what}" for name, what in BENCHMARKS.items()),
    )
    bench.add_argument("name", choices=(*BENCHMARKS, "all"), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    bench.set_defaults(run=_run_bench)
    return parser


# ----------------------------------------------------------------------------- voxelize


@dataclass
class _Job:
    source: Path
    output: Path
    preview: Optional[Path]


def _output_stem(path: Path) -> str:
    from .io import SUPPORTED_SUFFIXES

    name = path.name
    for suffix in SUPPORTED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], bool]:
    """Expands directories into their point files (not this command's own outputs); returns
    (files, many outputs?)."""
    from .io import is_point_file

    files: list[Path] = []
    many = len(inputs) > 1
    for text in inputs:
        if not text:  # Path("") is the working directory: an unset shell variable, most likely
            raise CommandError("an input path is empty ('')", status=2)
        path = Path(text)
        if path.is_dir():
            many = True
            found = sorted(
                p for p in path.iterdir()
                if p.is_file() and is_point_file(p) and not p.name.endswith(_OUTPUT_SUFFIX)
            )
            if not found:
                raise CommandError(f"directory {text!r} holds no point-cloud files")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise CommandError(_not_found(text))
    return files, many


def _not_found(text: str) -> str:
    """Why an input that does not exist is missing: Path.exists() is False for a symbolic link
    loop or a link to nothing too, which 'no such file' would misreport."""
    try:
        os.stat(text)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{text!r} is a symbolic link loop ({exc.strerror})"
        if os.path.islink(text):
            return f"{text!r} is a symbolic link to nothing (it points to {os.readlink(text)!r})"
    return f"no such file or directory: {text!r}"


def _names_folder(text: str) -> bool:
    """Whether a typed path ends in a separator, so names a folder (Path drops it)."""
    return text.endswith(os.sep) or bool(os.altsep and text.endswith(os.altsep))


def _file_option(text: Optional[str], source: Path, suffix: str) -> Optional[Path]:
    """The file that ``--output`` / ``--preview`` names for one input: the path itself, or
    NAME``suffix`` inside it when it is a folder or ends in a separator."""
    if text is None:
        return None
    path = Path(text)
    if _names_folder(text) or path.is_dir():
        return path / f"{_output_stem(source)}{suffix}"
    return path


def _folder_option(text: Optional[str], option: str, suffix: str) -> Optional[Path]:
    """Checks that ``--output`` / ``--preview`` names a folder, as several inputs need."""
    if text is None:
        return None
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {str(path)!r} must be a folder for several inputs")
    if not path.exists() and path.name.lower().endswith(suffix) and not _names_folder(text):
        raise CommandError(
            f"several inputs need an output folder, but {option} {str(path)!r} names a "
            f"{suffix} file"
        )
    return path


def _plan(args: argparse.Namespace) -> list[_Job]:
    for option, text in (("--output", args.output), ("--preview", args.preview)):
        if text == "":
            raise CommandError(f"{option} is empty (''): give a file or a folder", status=2)
    files, many = _collect_inputs(args.inputs)
    if many:
        out_dir = _folder_option(args.output, "--output", ".npz") or Path(".")
        preview_dir = _folder_option(args.preview, "--preview", ".png")
        jobs = [
            _Job(
                f,
                out_dir / f"{_output_stem(f)}{_OUTPUT_SUFFIX}",
                preview_dir / f"{_output_stem(f)}.png" if preview_dir else None,
            )
            for f in files
        ]
    else:
        source = files[0]
        output = _file_option(args.output or ".", source, _OUTPUT_SUFFIX)
        jobs = [_Job(source, output, _file_option(args.preview, source, ".png"))]
    _check_destinations(jobs, files, args.overwrite)
    return jobs


def _check_destinations(jobs: Sequence[_Job], inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuses, before anything is read, a run that would write over an input, over an existing
    file without ``--overwrite``, twice to one file, or below a path that is a file."""
    input_ids = {_file_id(path) for path in inputs}
    writers: dict[str, _Job] = {}
    for job in jobs:
        for option, path in (("--output", job.output), ("--preview", job.preview)):
            if path is None:
                continue
            key = os.path.realpath(path)  # one file, whatever links lead to it
            if key in writers:
                first = writers[key]
                if first is job:
                    who = f"--output and --preview of {str(job.source)!r}"
                elif _file_id(first.source) == _file_id(job.source):
                    who = f"input {str(job.source)!r}, given twice,"
                else:
                    who = f"{str(first.source)!r} and {str(job.source)!r}"
                raise CommandError(f"{who} would both write {str(path)!r}")
            writers[key] = job
            # The write creates missing folders first, so a path through one and back out
            # ("new/../scan.npy") reaches a folder and a file that the typed path does not show
            # while "new" is missing: check those the write will reach.
            reached_folder = Path(os.path.realpath(path.parent))
            folder = reached_folder
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            if not folder.is_dir():
                raise CommandError(
                    f"cannot write {option} {str(path)!r}: {str(folder)!r} is a file, not a folder"
                )
            if not os.access(folder, os.W_OK | os.X_OK):
                raise CommandError(
                    f"cannot write {option} {str(path)!r}: folder {str(folder)!r} is not writable"
                )
            reached = reached_folder / path.name
            if not os.path.lexists(reached):  # (a link to nothing exists too)
                continue
            if reached.is_dir():
                raise CommandError(f"{option} {str(path)!r} is a folder, not a file")
            if reached.exists() and _file_id(reached) in input_ids:
                raise CommandError(f"{option} {str(path)!r} is an input: refusing to write over it")
            if reached.exists() and not reached.is_file():
                raise CommandError(
                    f"{option} {str(path)!r} is a device, FIFO or socket, not a file: refusing to "
                    "replace it"
                )
            if not overwrite:
                raise CommandError(
                    f"{option} {str(path)!r} exists: refusing to replace it (--overwrite replaces "
                    "existing outputs)"
                )


def _file_id(path: Path) -> tuple[int, int]:
    """The file behind ``path`` (links followed), to tell whether two paths are one file."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def write_atomically(path: Path, option: str, write: Callable[[BinaryIO], None],
                     overwrite: bool) -> None:
    """Writes through ``write(file)`` into a temporary file beside ``path``, then puts it in
    place: replacing what is there with ``overwrite``, else only where nothing is (a file that
    appeared since the run's checks, another run's say, is kept). A failure raises CommandError
    naming ``option`` and ``path`` (not the temporary file). The benchmarks' ``--json`` files
    are written through it too."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(path)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            if overwrite:
                os.replace(tmp, path)
            else:
                _move_where_nothing_is(tmp, path, option)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise CommandError(f"cannot write {option} {str(path)!r}: {exc.strerror or exc}") from None


def _move_where_nothing_is(tmp: Path, path: Path, option: str) -> None:
    """Renames ``tmp`` to ``path`` unless something is at ``path``: a hard link fails there,
    where a rename would replace it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: check, then rename (a narrow race)
        if not os.path.lexists(path):
            os.replace(tmp, path)
            return
    else:
        os.unlink(tmp)
        return
    raise CommandError(
        f"{option} {str(path)!r} appeared while this run wrote it: refusing to replace it "
        "(--overwrite replaces existing outputs)"
    )


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden file beside ``path``, opened for writing. Created with mode 0666 less the
    umask, as an ordinary output file (mkstemp's 0600 would need the umask, which a process can
    read only by setting it, racing other threads' file creation)."""
    # The output's name, cut to leave room for the 14 bytes around it: a file name has 255.
    stem = os.fsdecode(os.fsencode(path.name)[:241])
    while True:
        tmp = path.parent / f".{stem}.{secrets.token_hex(4)}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of an 8-bit image, grayscale ``[H, W]`` or RGB ``[H, W, 3]`` (no imaging
    library needed)."""
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    raw = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 per row
    raw[:, 1:] = image.reshape(height, width * channels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    colour_type = {1: 0, 3: 2}[channels]
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


# Colour ramp of the pictures: dark blue -> teal -> yellow, from low to high values.
_RAMP = np.array([[20, 30, 90], [30, 150, 140], [250, 230, 40]], dtype=np.float64)


def heat_colours(value: np.ndarray) -> np.ndarray:
    """RGB ``[..., 3]`` uint8 of values in [0, 1] (clipped) on a dark-blue -> yellow ramp."""
    pos = np.clip(value, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(pos.astype(np.int64), len(_RAMP) - 2)
    frac = (pos - low)[..., None]
    return np.rint(_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def bev_image(coordinates: np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
    """Bird's-eye view of voxel coordinates (z, y, x), RGB ``[H, W, 3]`` uint8: the occupied
    voxels of each (y, x) column on a log scale, from teal (one voxel) to yellow (the 99th
    percentile of the occupied pixels and above), empty pixels black; x to the right and y up.
    Grids wider than 2048 are binned down."""
    _, size_y, size_x = spatial_shape
    scale = max(1, -(-max(size_y, size_x) // _PREVIEW_MAX_SIDE))
    height, width = -(-size_y // scale), -(-size_x // scale)
    counts = np.zeros((height, width), dtype=np.int64)
    if len(coordinates):
        np.add.at(counts, (coordinates[:, 1] // scale, coordinates[:, 2] // scale), 1)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    occupied = counts > 0
    if occupied.any():
        # Most occupied columns hold a few voxels and a few hold hundreds: a linear scale to
        # the busiest pixel leaves almost everything black, so clip and take logarithms.
        top = max(float(np.percentile(counts[occupied], 99)), 2.0)
        value = np.log(counts[occupied]) / np.log(top)  # 0 for one voxel, 1 at the top
        image[occupied] = heat_colours(0.5 + 0.5 * value)
    return image[::-1]  # row 0 is the largest y


def _shown(path: object) -> str:
    """A path as printed in a report line: as it is, or quoted and escaped as repr does when it
    holds a newline or another character that is not printable, so that one record stays one
    line (and a terminal gets no control codes from a file name)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _summary(name: str, stats: dict) -> str:
    parts = [
        f"{stats['points']:,} points read" + (f" as {stats['layout']}" if stats["layout"] else ""),
        f"{stats['in_range']:,} in range",
        f"{stats['voxels']:,} voxels",
        f"{stats['dropped']:,} dropped by limits",
    ]
    if stats["non_finite"]:
        parts.append(f"{stats['non_finite']:,} non-finite dropped")
    report = ", ".join(parts)
    return f"{_shown(name)}: {report}, {stats['ms']:.1f} ms -> {_shown(stats['output'])}"


def read_input(path: Path, point_dims: Optional[int]) -> tuple[np.ndarray, str]:
    """Reads one input as the command does (:func:`spconv_lite.io.read_cloud`; float64 where
    the file's coordinates need it, so that the voxelizer bins them in float64).

    Raises:
        CommandError: any failure, as one line that names the file once and the command's
            option ``--point-dims``.
    """
    from .io import read_cloud

    try:
        return read_cloud(path, point_dims, dtype=None)  # float64 where coordinates need it
    except (OSError, ValueError) as exc:
        raise CommandError(_option_words(_about(path, exc))) from None
    except MemoryError:
        raise CommandError(f"{_shown(path)}: not enough memory to read it") from None


def _option_words(text: str) -> str:
    """The reader's argument names as the command's options."""
    return text.replace("point_dims=", "--point-dims ")


def _about(path: Path, exc: BaseException) -> str:
    """The one-line message of ``exc``, led by ``path`` unless it already names it (as is, or
    quoted as ``repr`` quotes it)."""
    message = _one_line(exc)
    named = str(path) in message or repr(str(path)) in message
    return message if named else f"{_shown(path)}: {message}"


def _bounding_box(points: np.ndarray) -> str:
    finite = points[np.isfinite(points[:, :3]).all(axis=1), :3]
    if not len(finite):
        return "none of the points read has finite x, y, z"
    low, high = finite.min(axis=0), finite.max(axis=0)
    return "the points read span " + ", ".join(
        f"{axis} [{lo:.6g}, {hi:.6g}]" for axis, lo, hi in zip("xyz", low, high)
    )


def _voxelize_file(job: _Job, args: argparse.Namespace, geometry) -> dict:
    import torch

    from .voxelize import PointToVoxel

    points, layout = read_input(job.source, args.point_dims)
    voxelizer = PointToVoxel(
        args.voxel_size,
        args.coors_range,
        points.shape[1],
        args.max_voxels or _MOST_COUNT,
        args.max_points_per_voxel,
    )
    start = time.perf_counter()
    voxels, coords, num = voxelizer(torch.from_numpy(points))
    elapsed_ms = (time.perf_counter() - start) * 1e3
    arrays = {
        "voxels": voxels.numpy(),
        "coordinates": coords.numpy(),
        "num_points_per_voxel": num.numpy(),
    }
    write_atomically(job.output, "--output", lambda f: np.savez(f, **arrays), args.overwrite)
    if job.preview is not None:
        png = png_bytes(bev_image(arrays["coordinates"], voxelizer.spatial_shape))
        write_atomically(job.preview, "--preview", lambda f: f.write(png), args.overwrite)
    in_range = int(geometry.contains(points).sum())
    warning = None
    if not in_range:
        typed = " ".join(map(str, args.coors_range))
        warning = (f"{PROG}: warning: {_shown(job.source)}: no point lies inside --range "
                   f"{typed}; {_bounding_box(points)}")
    return {
        "warning": warning,
        "points": len(points),
        "layout": _option_words(layout) if job.source.name.lower().endswith(".bin") else "",
        "non_finite": int((~np.isfinite(points).all(axis=1)).sum()),
        "in_range": in_range,
        "voxels": len(coords),
        "dropped": in_range - int(num.sum()),
        "ms": elapsed_ms,
        "output": str(job.output),
    }


class ProgressBar:
    """A one-line ``[#####.....] 3/10 name`` bar, redrawn in place on a terminal stream.

    The bar only shows how far the batch is: a stream that fails (a full disk, a pipe whose
    reader is gone) stops the bar, not the batch, whose summaries on stdout and exit status
    still say how each input went.
    """

    def __init__(self, total: int, stream: TextIO, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.failed = False

    def draw(self, done: int, label: str = "") -> None:
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        self._write(f"\r\x1b[K[{bar}] {done}/{self.total} {_shown(label)}"[:200])

    def clear(self) -> None:
        self._write("\r\x1b[K")

    def finish(self) -> None:
        self.draw(self.total)
        self._write("\n")

    def _write(self, text: str) -> None:
        if not self.failed:
            self.failed = not _write_quietly(self.stream, text)


def _run_voxelize(args: argparse.Namespace) -> int:
    from .voxelize import GridGeometry

    try:
        geometry = GridGeometry.from_spconv_args(args.voxel_size, args.coors_range)
    except ValueError as exc:
        raise CommandError(
            str(exc).replace("vsize_xyz", "--voxel-size").replace("coors_range_xyz", "--range"),
            status=2,
        ) from None
    try:
        jobs = _plan(args)
    except OSError as exc:  # a name too long, a folder that may not be listed or searched
        where = f"{str(exc.filename)!r}: " if exc.filename is not None else ""
        raise CommandError(f"{where}{exc.strerror or exc}") from None
    show = sys.stderr is not None and (args.progress == "always" or (
        args.progress == "auto" and len(jobs) > 1 and sys.stderr.isatty()
    ))
    bar = ProgressBar(len(jobs), sys.stderr) if show and len(jobs) > 1 else None
    failures = 0
    for done, job in enumerate(jobs):
        if bar:
            bar.draw(done, job.source.name)
        warning = error = line = None
        try:
            stats = _voxelize_file(job, args, geometry)
            warning, line = stats["warning"], _summary(str(job.source), stats)
        except CommandError as exc:
            failures += 1
            error = f"{PROG}: error: {exc}"
        except (OSError, ValueError, TypeError, ImportError, RuntimeError, MemoryError) as exc:
            failures += 1
            error = f"{PROG}: error: {_about(job.source, exc)}"
        if bar:
            bar.clear()
        for message in (warning, error):
            if message:
                _tell(message)
        if line:
            print(line, flush=True)
    if bar:
        bar.finish()
    if failures and len(jobs) > 1:
        raise CommandError(f"{failures} of {len(jobs)} inputs failed")
    return 1 if failures else 0


def _tell(message: str) -> None:
    """Prints a warning or an error on stderr. A stderr that cannot be written (a full disk, a
    closed pipe) loses the message but stops nothing: there is nowhere else to say it, and the
    exit status still tells."""
    if sys.stderr is not None:  # None: pythonw, or a daemon without one
        _write_quietly(sys.stderr, message + "\n")


def _write_quietly(stream: TextIO, text: str) -> bool:
    """Writes and flushes ``text``; False where the stream cannot take it."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):  # ValueError: the stream is closed
        return False
    return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


# ----------------------------------------------------------------------------- info


def _run_info(args: argparse.Namespace) -> int:
    import torch

    import spconv_lite

    from ._extension import _C

    ops = sorted(
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("spconv_lite::")
    )
    cuda_kernels = any(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"spconv_lite::{op}", "CUDA") for op in ops
    )
    cuda = (
        f"available ({torch.cuda.get_device_name(0)})"
        if torch.cuda.is_available()
        else "not available"
    )
    lines = [
        f"spconv_lite {spconv_lite.__version__} ({Path(spconv_lite.__file__).parent})",
        f"extension   {Path(_C.__file__).name}, CUDA kernels: {'yes' if cuda_kernels else 'no'}",
        f"torch       {torch.__version__} (CUDA runtime {torch.version.cuda or 'none'})",
        f"CUDA        {cuda}",
        f"threads     {torch.get_num_threads()} (inter-op {torch.get_num_interop_threads()})",
        f"ops         {', '.join(ops)}",
    ]
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- bench

# Benchmark scripts under benchmarks/: name -> what it measures.
BENCHMARKS = {
    "networks": "VoxelBackBone8x and spconv's benchmark net, forward and training step",
    "kernels": "per-layer kernel maps, gather / GEMM / scatter and fused conv",
    "core": "single ops on a KITTI frame: maps, convolutions, pooling",
    "voxelize": "PointToVoxel on a KITTI frame, time and peak memory",
    "io": "the .pcd / .ply readers (binary and LZF-compressed) against open3d's",
    "cuda": "the networks on a GPU, fp32 / fp16 (needs CUDA)",
}
_CPU_BENCHMARKS = ("core", "kernels", "networks", "voxelize", "io")


def benchmark_dir() -> Path:
    """The ``benchmarks/`` folder of the checkout this package was imported from."""
    import spconv_lite

    return Path(spconv_lite.__file__).resolve().parent.parent / "benchmarks"


def _run_bench(args: argparse.Namespace) -> int:
    import subprocess

    folder = benchmark_dir()
    names = _CPU_BENCHMARKS if args.name == "all" else (args.name,)
    if args.name == "all" and args.args:
        raise CommandError("'bench all' takes no script arguments; name one benchmark", 2)
    scripts = [folder / f"bench_{name}.py" for name in names]
    missing = [str(path) for path in scripts if not path.is_file()]
    if missing:
        raise CommandError(
            f"benchmark script not found: {', '.join(missing)} (the benchmarks ship with the "
            "source checkout, not with an installed wheel)"
        )
    for script in scripts:
        status = subprocess.call([sys.executable, str(script), *args.args])
        if status != 0:
            raise CommandError(f"{script.name} exited with status {status}", status)
    return 0


# ----------------------------------------------------------------------------- entry point


class _Terminated(BaseException):
    """SIGTERM or SIGHUP (``timeout``, a job scheduler, a closed terminal) as an exception, so
    that a half-written output's temporary file is removed as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _termination_as_exception():
    """Turns SIGTERM and SIGHUP into _Terminated while the command runs, where they have their
    default action (which kills the process mid-write) and this is the main thread."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):  # no SIGHUP on Windows
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command; returns the exit status (also used as the console script)."""
    args = _parser().parse_args(argv)
    try:
        with _termination_as_exception():
            return args.run(args)
    except CommandError as exc:
        _tell(f"{PROG}: error: {exc}")
        return exc.status
    except KeyboardInterrupt:
        _tell(f"{PROG}: interrupted")
        return 130
    except _Terminated as exc:
        _tell(f"{PROG}: terminated ({signal.Signals(exc.signum).name})")
        return 128 + exc.signum
    except BrokenPipeError:
        # The reader of our output went away (spconv-lite info | head -1): stop quietly.
        _silence_stdout()
        return _SIGPIPE_STATUS
    except OSError as exc:  # past the per-file errors: writing the report (a full disk, say)
        _silence_stdout()
        _tell(f"{PROG}: error: {_one_line(exc)}")
        return 1


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that Python's flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
