"""The ``spconv-lite`` command (also ``python -m spconv_lite``).

``spconv-lite voxelize INPUT... --voxel-size VX VY VZ --range X0 Y0 Z0 X1 Y1 Z1`` voxelizes
point-cloud files (or directories of them) exactly as spconv's ``PointToVoxel`` would and writes
one ``.npz`` per input with ``voxels``, ``coordinates`` (z, y, x) and ``num_points_per_voxel``.
``spconv-lite info`` prints the version, build, registered ops, threads and CUDA status.
``spconv-lite bench NAME [ARGS...]`` runs a benchmark script of a source checkout
(``benchmarks/bench_NAME.py ARGS``; ``--help`` after the name lists its options).

Errors end the command with a one-line message and a non-zero status (2 for bad arguments, 1
when an input fails); outputs are written under a temporary name and renamed when complete,
so a failure never leaves a partial file.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence, TextIO

import numpy as np

__all__ = ["main"]

PROG = "spconv-lite"
_NO_VOXEL_LIMIT = 2**31 - 1
_PREVIEW_MAX_SIDE = 2048  # larger grids are binned down to this many pixels per side


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
    return value


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
    vox.add_argument("--voxel-size", nargs=3, type=float, required=True, metavar=("VX", "VY", "VZ"))
    vox.add_argument(
        "--range",
        nargs=6,
        type=float,
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
        type=_positive_int,
        default=None,
        metavar="C",
        help="float32 columns of .bin files (default 4, 5 for .pcd.bin); for "
        "other formats, leading columns to keep",
    )
    vox.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        metavar="PATH",
        help="output .npz for one input file; a directory for several inputs or a "
        "directory input (default: the current directory)",
    )
    vox.add_argument(
        "--preview",
        type=Path,
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
    """Expands directories into their point files; returns (files, many outputs?)."""
    from .io import is_point_file

    files: list[Path] = []
    many = len(inputs) > 1
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            many = True
            found = sorted(p for p in path.iterdir() if p.is_file() and is_point_file(p))
            if not found:
                raise CommandError(f"directory {text!r} holds no point-cloud files")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise CommandError(f"no such file or directory: {text!r}")
    return files, many


def _plan(args: argparse.Namespace) -> list[_Job]:
    files, many = _collect_inputs(args.inputs)
    if many:
        out_dir = args.output or Path(".")
        if out_dir.exists() and not out_dir.is_dir():
            raise CommandError(f"--output {str(out_dir)!r} must be a directory for several inputs")
        preview_dir = args.preview
        if preview_dir is not None and preview_dir.exists() and not preview_dir.is_dir():
            raise CommandError(
                f"--preview {str(preview_dir)!r} must be a directory for several inputs"
            )
        jobs = [
            _Job(
                f,
                out_dir / f"{_output_stem(f)}.npz",
                preview_dir / f"{_output_stem(f)}.png" if preview_dir else None,
            )
            for f in files
        ]
    else:
        source = files[0]
        output = args.output or Path(f"{_output_stem(source)}.npz")
        if output.is_dir():
            output = output / f"{_output_stem(source)}.npz"
        jobs = [_Job(source, output, args.preview)]
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.output in seen:
            raise CommandError(
                f"{str(seen[job.output])!r} and {str(job.source)!r} would both write "
                f"{str(job.output)!r}"
            )
        seen[job.output] = job.source
    return jobs


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes through ``write(file)`` into a temporary file beside ``path``, then renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of ``image`` [H, W] uint8 (no imaging library needed)."""
    height, width = image.shape
    raw = np.zeros((height, width + 1), dtype=np.uint8)  # filter byte 0 per row
    raw[:, 1:] = image

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def bev_image(coordinates: np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
    """Bird's-eye view of voxel coordinates (z, y, x): occupied voxels per (y, x) column,
    scaled to 0..255, x to the right and y up; grids wider than 2048 are binned down."""
    _, size_y, size_x = spatial_shape
    scale = max(1, -(-max(size_y, size_x) // _PREVIEW_MAX_SIDE))
    height, width = -(-size_y // scale), -(-size_x // scale)
    counts = np.zeros((height, width), dtype=np.int64)
    if len(coordinates):
        np.add.at(counts, (coordinates[:, 1] // scale, coordinates[:, 2] // scale), 1)
    peak = counts.max() if counts.size else 0
    image = (counts * 255 // peak).astype(np.uint8) if peak else counts.astype(np.uint8)
    return image[::-1]  # row 0 is the largest y


def _summary(name: str, stats: dict) -> str:
    parts = [
        f"{stats['points']:,} points read",
        f"{stats['in_range']:,} in range",
        f"{stats['voxels']:,} voxels",
        f"{stats['dropped']:,} dropped by limits",
    ]
    if stats["non_finite"]:
        parts.append(f"{stats['non_finite']:,} non-finite dropped")
    return f"{name}: " + ", ".join(parts) + f", {stats['ms']:.1f} ms -> {stats['output']}"


def _voxelize_file(job: _Job, args: argparse.Namespace, geometry) -> dict:
    import torch

    from .io import read_points
    from .voxelize import PointToVoxel

    points = read_points(job.source, args.point_dims)
    voxelizer = PointToVoxel(
        args.voxel_size,
        args.coors_range,
        points.shape[1],
        args.max_voxels or _NO_VOXEL_LIMIT,
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
    _write_atomically(job.output, lambda f: np.savez(f, **arrays))
    if job.preview is not None:
        png = _png_bytes(bev_image(arrays["coordinates"], voxelizer.spatial_shape))
        _write_atomically(job.preview, lambda f: f.write(png))
    in_range = int(geometry.contains(points).sum())
    return {
        "points": len(points),
        "non_finite": int((~np.isfinite(points).all(axis=1)).sum()),
        "in_range": in_range,
        "voxels": len(coords),
        "dropped": in_range - int(num.sum()),
        "ms": elapsed_ms,
        "output": str(job.output),
    }


class ProgressBar:
    """A one-line ``[#####.....] 3/10 name`` bar, redrawn in place on a terminal stream."""

    def __init__(self, total: int, stream: TextIO, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width

    def draw(self, done: int, label: str = "") -> None:
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r\x1b[K[{bar}] {done}/{self.total} {label}"[:200])
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


def _run_voxelize(args: argparse.Namespace) -> int:
    from .voxelize import GridGeometry

    try:
        geometry = GridGeometry.from_spconv_args(args.voxel_size, args.coors_range)
    except ValueError as exc:
        raise CommandError(
            str(exc).replace("vsize_xyz", "--voxel-size").replace("coors_range_xyz", "--range"),
            status=2,
        ) from None
    jobs = _plan(args)
    show = args.progress == "always" or (
        args.progress == "auto" and len(jobs) > 1 and sys.stderr.isatty()
    )
    bar = ProgressBar(len(jobs), sys.stderr) if show and len(jobs) > 1 else None
    failures = 0
    for done, job in enumerate(jobs):
        if bar:
            bar.draw(done, job.source.name)
        try:
            line = _summary(str(job.source), _voxelize_file(job, args, geometry))
            stream = sys.stdout
        except (OSError, ValueError, TypeError, ImportError, RuntimeError) as exc:
            failures += 1
            line, stream = f"{PROG}: error: {job.source}: {_one_line(exc)}", sys.stderr
        if bar:
            bar.clear()
        print(line, file=stream, flush=True)
    if bar:
        bar.draw(len(jobs))
        sys.stderr.write("\n")
    if failures and len(jobs) > 1:
        raise CommandError(f"{failures} of {len(jobs)} inputs failed")
    return 1 if failures else 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


# ----------------------------------------------------------------------------- info


def _run_info(args: argparse.Namespace) -> int:
    import torch

    import spconv_lite

    from . import _C

    ops = sorted(
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("spconv_lite::")
    )
    cuda_kernels = any(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"spconv_lite::{op}", "CUDA") for op in ops
    )
    try:
        import open3d

        open3d_version = open3d.__version__
    except ImportError:
        open3d_version = "not installed (.pcd/.ply reading needs pip install 'spconv_lite[io]')"
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
        f"open3d      {open3d_version}",
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
    "cuda": "the networks on a GPU, fp32 / fp16 (needs CUDA)",
}
_CPU_BENCHMARKS = ("core", "kernels", "networks", "voxelize")


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command; returns the exit status (also used as the console script)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
