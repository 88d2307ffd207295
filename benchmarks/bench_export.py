"""The exported package (AOTInductor, spconv_lite.export) against the eager model, on the CPU.

Model: SECOND's backbone as deployed, ``BEVBackbone(VoxelBackBone8x, HeightCompression(256))``
(random weights, eval mode), exported once with ``spconv_lite.export.export_model``. Input: the
KITTI object training frame 000000 voxelized with OpenPCDet's KITTI test setting (0.05 x 0.05 x
0.1 m over 0 -40 -3 70.4 40 1, 5 points per voxel, 40,000 voxels), mean voxel features. One call
is voxel features and indices -> the BEV map ``[1, 256, 200, 176]`` (kernel maps built inside,
as in real use).

Both run in the same process on the same inputs, alternating call by call after ``--warmup``
calls each; reported per thread count: the median and spread (interquartile range, min-max) of
``--repeats`` calls in ms, and the ratio of the medians (package / eager: below 1 means the
package is faster). The outputs are checked to agree (max |package - eager| / max |eager|). The
time to export and compile the package is printed too.

Usage (from the repository root):
    python benchmarks/bench_export.py [--threads 1,2] [--repeats 20] [--warmup 3]
        [--data PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from arguments import non_negative_int, positive_int, thread_counts
from common import (
    DATA_DIR,
    cpu_name,
    fmt,
    time_alternating,
)
from results_file import check_results_path, write_json

import spconv_lite as sp
from spconv_lite.export import BEVBackbone, export_model, load_package
from spconv_lite.io import read_points
from spconv_lite.models import HeightCompression, VoxelBackBone8x

FRAME = "kitti_object_training_000000.bin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=thread_counts, default="1,2",
                        help="comma-separated thread counts")
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder of the frames")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    check_results_path(parser, args.json, args.data)
    path = args.data / FRAME
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (pass --data DIR, the folder of the frames)")

    torch.manual_seed(0)
    voxelizer = sp.PointToVoxel([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], 4, 40000, 5)
    backbone = VoxelBackBone8x(4, voxelizer.geometry.grid_size)
    model = BEVBackbone(backbone, HeightCompression(256)).eval()
    x = sp.batch_point_clouds([read_points(path)], voxelizer)
    features, indices = x.features, x.indices

    def eager():
        x = sp.SparseConvTensor(features, indices, backbone.sparse_shape, 1)
        return model(x)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        example = sp.SparseConvTensor(features, indices, backbone.sparse_shape, 1)
        package_path = export_model(model, example, Path(tmp) / "second_bev.pt2")
        export_s = time.perf_counter() - start
        package = load_package(package_path)

    def packaged():
        return package(features, indices)[0]

    print(f"spconv_lite {sp.__version__} | torch {torch.__version__} | {cpu_name()} | "
          f"Python {platform.python_version()}")
    print(f"{FRAME}: {len(indices)} voxels; export + AOTInductor compile {export_s:.1f} s")
    print(f"  {'threads':>7} {'what':<8} {'median ms [IQR] (min-max)':<40} {'ratio':>6}")
    results = []
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            want, got = eager(), packaged()
            error = float((got - want).abs().max() / want.abs().max())
            stats = time_alternating({"eager": eager, "package": packaged}, args.warmup,
                                     args.repeats)
            ratio = stats["package"]["median_ms"] / stats["eager"]["median_ms"]
            for what in ("eager", "package"):
                tail = f"{ratio:6.2f}" if what == "package" else ""
                print(f"  {threads:>7} {what:<8} {fmt(stats[what]):<40} {tail}")
            print(f"  {'':>7} max |package - eager| / max |eager| = {error:.1e}")
            results.append({"threads": threads, "ratio": ratio, "relative_error": error,
                            **{what: stats[what] for what in stats}})
    if args.json:
        meta = {"torch": torch.__version__, "cpu": cpu_name(), "export_s": export_s,
                "voxels": len(indices), "argv": sys.argv}
        write_json(args.json, {"meta": meta, "results": results}, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
