"""Cost of the checks that guard cached kernel maps and tensor consistency, in a real forward.

Runs OpenPCDet's VoxelBackBone8x + HeightCompression on the KITTI frame (as bench_networks.py's
"second" net) and measures, call by call, the time spent inside each check: reuse of a cached
map (``kernel_map._check_reuse``: grid, identity and version of the sites), the weight-shape
check of every conv, the features/indices row-count check of every layer, and the site check
of ``dense()`` (grid bounds and duplicates). Reported: the median forward time and the checks'
share of it.

Usage (from the repository root):
    python benchmarks/bench_map_checks.py [--repeats 20] [--threads 1] [--data DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from arguments import positive_int
from bench_networks import load_input
from common import DATA_DIR

import spconv_lite
from spconv_lite import kernel_map, tensor
from spconv_lite.models import HeightCompression, VoxelBackBone8x

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    features, indices, shape = load_input("second", args.data)
    grid_xyz = [shape[2], shape[1], shape[0] - 1]
    backbone = VoxelBackBone8x(4, grid_xyz).eval()
    to_bev = HeightCompression()

    kernel_map._check_reuse = timed("map reuse", kernel_map._check_reuse)
    tensor.check_sites = timed("dense() sites", tensor.check_sites)
    conv = spconv_lite.SparseConvolution
    conv._check_weight_shape = timed("weight shape", conv._check_weight_shape)
    tensor.SparseConvTensor.check_rows = timed("row counts", tensor.SparseConvTensor.check_rows)

    def forward():
        x = backbone.input_tensor(features, indices, 1)
        return to_bev(backbone(x)["encoded_spconv_tensor"])

    forwards, checks = [], []
    with torch.no_grad():
        for repeat in range(args.repeats + 2):
            SPENT.clear()
            start = time.perf_counter()
            forward()
            elapsed = time.perf_counter() - start
            if repeat >= 2:  # warm-up
                forwards.append(elapsed)
                checks.append(dict(SPENT))

    median = statistics.median(forwards)
    print(f"VoxelBackBone8x + HeightCompression on KITTI 000000 ({indices.shape[0]} voxels), "
          f"{args.threads} thread(s), {args.repeats} forwards: median {median * 1e3:.1f} ms")
    total = [sum(c.values()) for c in checks]
    for name in sorted(checks[0]):
        spent = statistics.median(c[name] for c in checks)
        print(f"  {name:14s} {spent * 1e6:8.1f} us  {spent / median:.4%}")
    spent = statistics.median(total)
    print(f"  {'all checks':14s} {spent * 1e6:8.1f} us  {spent / median:.4%} of the forward")


if __name__ == "__main__":
    main()
