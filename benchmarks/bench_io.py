"""Benchmark of the point-cloud readers (spconv_lite.io.read_points) against open3d's.

Inputs: the real .pcd (binary) and .ply (binary little-endian) frames of ``--data``, and
binary_compressed .pcd files that open3d writes into a temporary folder (PCL's LZF): the .pcd
frame's points, a KITTI frame (x, y, z, intensity) and a smooth synthetic cloud of 1M points
(a helix: long LZF back-references, the decoder's slowest case per byte).

Time: both readers run in the same process on the same file, alternating call by call, after
``--warmup`` calls each; the median and the spread of ``--repeats`` calls are reported in
milliseconds, with the ratio of the medians. open3d's time includes building its tensors of
every field; ours returns x, y, z and the other fields as one float32 array. The positions are
checked to be identical. Without open3d only ours is timed.

Usage (from the repository root):
    python benchmarks/bench_io.py [--repeats 20] [--warmup 3] [--data FOLDER] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from arguments import non_negative_int, positive_int
from common import DATA_DIR, fmt, time_alternating
from results_file import check_results_path, write_json

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from spconv_lite import io  # noqa: E402

try:
    import open3d as o3d
except ImportError:  # the baseline is optional
    o3d = None

FRAMES = ["fast_gicp_251370668.pcd", "small_gicp_source.ply"]
KITTI = "kitti_object_training_000000.bin"


def write_compressed(path: Path, points: np.ndarray) -> Path:
    """points [N, 4] as a binary_compressed .pcd (x, y, z, intensity), written by open3d."""
    cloud = o3d.t.geometry.PointCloud()
    cloud.point.positions = o3d.core.Tensor(np.ascontiguousarray(points[:, :3]))
    cloud.point.intensity = o3d.core.Tensor(np.ascontiguousarray(points[:, 3:4]))
    if not o3d.t.io.write_point_cloud(str(path), cloud, write_ascii=False, compressed=True):
        raise RuntimeError(f"open3d could not write {path}")
    return path


def helix(count: int) -> np.ndarray:
    t = np.linspace(0, 100, count, dtype=np.float32)
    return np.stack([30 * np.sin(t), 30 * np.cos(t), 0.01 * t, np.ones_like(t)], 1)


def inputs(data: Path, folder: Path) -> dict[str, Path]:
    files = {name: data / name for name in FRAMES}
    if o3d is not None:  # compressed copies need open3d to write them
        pcd = io.read_points(data / FRAMES[0])  # x, y, z, intensity
        kitti = np.fromfile(data / KITTI, dtype=np.float32).reshape(-1, 4)
        files["fast_gicp (binary_compressed)"] = write_compressed(folder / "gicp.pcd", pcd)
        files["kitti 000000 (binary_compressed)"] = write_compressed(folder / "kitti.pcd", kitti)
        files["helix 1M (binary_compressed)"] = write_compressed(folder / "helix.pcd",
                                                                 helix(1_000_000))
    return files


def open3d_positions(path: Path) -> np.ndarray:
    return o3d.t.io.read_point_cloud(str(path)).point.positions.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder of the frames")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    check_results_path(parser, args.json, args.data)
    results = []
    print(f"open3d {o3d.__version__ if o3d else 'not installed: ours only'}; "
          f"median [p25-p75] (min-max) ms over {args.repeats} calls")
    with tempfile.TemporaryDirectory() as folder:
        for name, path in inputs(args.data, Path(folder)).items():
            readers = {"spconv_lite": lambda path=path: io.read_points(path)}
            if o3d is not None:
                readers["open3d"] = lambda path=path: open3d_positions(path)
                if not np.array_equal(io.read_points(path)[:, :3], open3d_positions(path)):
                    raise SystemExit(f"{name}: the readers' positions differ")
            timed = time_alternating(readers, args.warmup, args.repeats)
            ours, theirs = timed["spconv_lite"], timed.get("open3d")
            ratio = theirs["median_ms"] / ours["median_ms"] if theirs else None
            print(f"{name:34s} {len(io.read_points(path)):>9,} points  ours {fmt(ours)}  "
                  f"open3d {fmt(theirs)}" + (f"  {ratio:.1f}x" if ratio else ""))
            results.append({"input": name, "ours": ours, "open3d": theirs,
                            "speedup_vs_open3d": ratio})
    if args.json:
        write_json(args.json, results, indent=1)


if __name__ == "__main__":
    main()
