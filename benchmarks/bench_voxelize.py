"""Benchmark of spconv_lite.PointToVoxel against spconv 2.3.8's CPU PointToVoxel.

Input: the full KITTI object training frame 000000 (115,384 points) with OpenPCDet's KITTI
configuration: voxel 0.05 x 0.05 x 0.1 m, range x 0..70.4, y -40..40, z -3..1, 5 points per
voxel, 40,000 voxels (grid 1408 x 1600 x 40).

Time: both implementations run in the same process on the same tensor, alternating call by
call, after ``--warmup`` calls each; the median and the spread (min, max, interquartile range)
of ``--repeats`` calls are reported in milliseconds, with the ratio of the medians. spconv always
runs with one thread (its CPU code is only correct that way, and its voxelizer is serial); ours
is timed at each thread count of ``--threads``, on the frame and on 10 shifted copies of it
(1.15M points, enough for the op's multi-threaded passes). The outputs are checked to be
identical. The CPU time of each call (``time.process_time``: all threads of the process) is
reported too: on a shared machine it shows the work done, which wall time mixes with waiting
for a core.

Memory: for each implementation and grid, a fresh subprocess loads the points and imports the
implementation, then measures how much its peak resident set size grows (``VmHWM`` reset through
/proc/self/clear_refs on Linux, else ``ru_maxrss``; both see C++ allocations, unlike
tracemalloc) while building the voxelizer and voxelizing 10 times. Grids: the KITTI one,
the same range with voxels 2x finer on every axis (8x the volume), and 1 mm voxels (22e12
voxels: ours only; spconv would allocate 90 TB).

Usage (from the repository root):
    python benchmarks/bench_voxelize.py [--repeats 200] [--warmup 20] [--threads 1,2]
        [--data PATH] [--json out.json] [--no-memory]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from arguments import non_negative_int, positive_int, thread_counts
from results_file import check_results_path, write_json

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import spconv_lite  # noqa: E402

DEFAULT_DATA = (
    Path(os.environ.get("SPCONV_LITE_DATA") or REPO.parent / "shared" / "data" / "lidar")
    / "kitti_object_training_000000.bin"
)
RANGE = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]
GRIDS = {  # name: voxel size; spconv runs on the first two only
    "kitti": [0.05, 0.05, 0.1],
    "kitti-8x-volume": [0.025, 0.025, 0.05],
    "1mm": [0.001, 0.001, 0.001],
}
MAX_POINTS, MAX_VOXELS = 5, 40000


def load_points(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(-1, 4))


def make_voxelizer(impl: str, voxel_size: list[float]):
    if impl == "spconv":
        from spconv.pytorch.utils import PointToVoxel
    else:
        PointToVoxel = spconv_lite.PointToVoxel
    return PointToVoxel(voxel_size, RANGE, 4, MAX_VOXELS, MAX_POINTS)


def spread(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms)
    q1, median, q3 = np.percentile(t, [25, 50, 75])
    return {"median": median, "min": t.min(), "max": t.max(), "iqr": q3 - q1}


def time_alternating(points, threads: int, repeats: int, warmup: int) -> dict:
    ours = make_voxelizer("ours", GRIDS["kitti"])
    theirs = make_voxelizer("spconv", GRIDS["kitti"])

    def call(voxelizer, count):
        torch.set_num_threads(count)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = voxelizer(points)
        cpu_ms = (time.process_time() - cpu_start) * 1e3
        return (time.perf_counter() - start) * 1e3, out, cpu_ms

    a, b = call(ours, threads)[1], call(theirs, 1)[1]
    identical = all(torch.equal(x, y) for x, y in zip(a, b))
    for _ in range(warmup):
        call(ours, threads)
        call(theirs, 1)
    ours_ms, theirs_ms, ours_cpu, theirs_cpu = [], [], [], []
    for _ in range(repeats):
        wall, _, cpu = call(ours, threads)
        ours_ms.append(wall)
        ours_cpu.append(cpu)
        wall, _, cpu = call(theirs, 1)
        theirs_ms.append(wall)
        theirs_cpu.append(cpu)
    result = {"threads": threads, "identical": identical,
              "ours_ms": spread(ours_ms), "spconv_ms": spread(theirs_ms),
              "ours_cpu_ms": spread(ours_cpu), "spconv_cpu_ms": spread(theirs_cpu)}  # fmt: skip
    result["ratio"] = result["ours_ms"]["median"] / result["spconv_ms"]["median"]
    result["cpu_ratio"] = result["ours_cpu_ms"]["median"] / result["spconv_cpu_ms"]["median"]
    return result


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def memory_child(impl: str, grid: str, data: Path, repeats: int) -> None:
    """Runs in a subprocess: prints the peak RSS growth (MB) of building + voxelizing."""
    torch.set_num_threads(1)
    points = load_points(data)
    if impl == "spconv":
        import spconv.pytorch.utils  # noqa: F401  (imports are not what is measured)
    try:  # Linux: restart the peak (VmHWM) from the current RSS, so earlier peaks don't hide it
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_mb("VmRSS")
        peak = lambda: _status_mb("VmHWM")  # noqa: E731
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
        before = peak()
    voxelizer = make_voxelizer(impl, GRIDS[grid])
    for _ in range(repeats):
        voxels = voxelizer(points)[0]
    print(json.dumps({"impl": impl, "grid": grid, "peak_growth_mb": peak() - before,
                      "voxels": voxels.shape[0]}))  # fmt: skip


def measure_memory(impl: str, grid: str, data: Path, repeats: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", impl, grid, "--data", str(data),
         "--repeats", str(repeats)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        return {"impl": impl, "grid": grid, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=200)
    parser.add_argument("--warmup", type=non_negative_int, default=20)
    parser.add_argument("--threads", type=thread_counts, default="1,2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("IMPL", "GRID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_results_path(parser, args.json, args.data)
    if args.memory_child:
        memory_child(*args.memory_child, args.data, min(args.repeats, 10))
        return

    import spconv

    points = load_points(args.data)
    report = {
        "input": f"{args.data.name}: {len(points):,} points",
        "config": {
            "voxel_size": GRIDS["kitti"],
            "range": RANGE,
            "max_points": MAX_POINTS,
            "max_voxels": MAX_VOXELS,
        },  # fmt: skip
        "versions": {
            "spconv_lite": spconv_lite.__version__,
            "spconv": spconv.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "timing": [],
        "memory": [],
    }
    print(f"{report['input']}; spconv {spconv.__version__}, torch {torch.__version__}, "
          f"{report['cpu']}")  # fmt: skip
    print(f"{'threads':>7}  {'ours ms (min-max, iqr)':>28}  {'spconv ms (min-max, iqr)':>28}"
          f"  {'ratio':>6}  {'CPU ms ours / spconv (ratio)':>30}  identical")  # fmt: skip
    # The frame itself, then 10 shifted copies of it (1.15M points): clouds of 2^20 points or
    # more take the op's multi-threaded passes.
    copies = [points + torch.tensor([0.0173 * k, -0.0311 * k, 0.007 * k, 0.0]) for k in range(10)]
    inputs = {"frame": points, "frame x10": torch.cat(copies)}
    for (name, cloud), threads in itertools.product(inputs.items(), args.threads):
        r = time_alternating(cloud, threads, args.repeats, args.warmup)
        r["input"] = f"{name} ({len(cloud):,} points)"
        report["timing"].append(r)
        o, s = r["ours_ms"], r["spconv_ms"]
        if threads == args.threads[0]:
            print(r["input"])
        print(f"{threads:>7}  {o['median']:7.3f} ({o['min']:.2f}-{o['max']:.2f}, {o['iqr']:.2f})"
              f"{'':>4}  {s['median']:7.3f} ({s['min']:.2f}-{s['max']:.2f}, {s['iqr']:.2f})"
              f"{'':>3}  {r['ratio']:6.3f}  {r['ours_cpu_ms']['median']:10.3f} / "
              f"{r['spconv_cpu_ms']['median']:6.3f} ({r['cpu_ratio']:.3f})  "
              f"{r['identical']}")  # fmt: skip
    if not args.no_memory:
        print("peak RSS growth (fresh process, 1 thread): building the voxelizer + voxelizing")
        for grid in GRIDS:
            for impl in ("ours", "spconv") if grid != "1mm" else ("ours",):
                m = measure_memory(impl, grid, args.data, args.repeats)
                report["memory"].append(m)
                shape = spconv_lite.PointToVoxel(GRIDS[grid], RANGE, 4, 1, 1).grid_size
                text = m.get("error") or f"{m['peak_growth_mb']:8.1f} MB ({m['voxels']} voxels)"
                print(f"  {grid:>16} grid {shape} {impl:>7}: {text}")
    if args.json:
        write_json(args.json, report, indent=2, default=float)


if __name__ == "__main__":
    main()
