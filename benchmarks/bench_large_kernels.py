"""Regular (non-submanifold) convs with large kernels at stride 1, against spconv 2.3.8.

Such a layer has up to N x K output sites, and our neighbour table holds a row of K entries for
each: its memory and the scan over it grow with N x K^2 where spconv's pair lists grow with
N x K. This is where our table layout costs most; the cases bracket it:
  isolated k7   4,000 sites 16 voxels apart (no two share an output), SparseConv3d 16 -> 16,
                kernel 7, padding 3: every output has exactly one neighbour among 343 offsets
  sweep k5      the demo's synthetic LiDAR sweep (seed 0, voxelized as examples/demo.py does),
                SparseConv3d 4 -> 16, kernel 5, padding 2
  kitti k5      the KITTI frame of bench_core.py, random 16-channel features, SparseConv3d
                16 -> 16, kernel 5, padding 2
Each call builds its map (a fresh SparseConvTensor), as a network's forward does. Reported per
case: input and output sites, our table size (int32 [N_out, K]), the median and spread of
``--repeats`` forward calls after one warm-up, alternating ours and spconv call by call, one
thread (spconv's CPU conv is only correct with one), and the ratio.

Usage (from the repository root):
    python benchmarks/bench_large_kernels.py [--repeats 5] [--data FRAME.bin]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from arguments import positive_int
from bench_core import DEFAULT_DATA, load_voxels
from common import SPCONV_VERSION, fmt, spconv_torch, time_alternating

import spconv_lite
from spconv_lite.synthetic import lidar_sweep, voxelize_mean

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def isolated_sites() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """4,000 sites of a lattice of spacing 16 (seeded choice), 16 random channels."""
    gen = torch.Generator().manual_seed(0)
    axes = [torch.arange(0, size, 16) for size in (640, 640, 160)]
    lattice = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    sites = lattice[torch.randperm(len(lattice), generator=gen)[:4000]]
    indices = torch.nn.functional.pad(sites, (1, 0), value=0).int()
    return torch.randn(4000, 16, generator=gen), indices, [640, 640, 160]


def sweep_sites() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The demo's sweep and voxels (mean point features: 4 channels)."""
    sys.path.insert(0, str(EXAMPLES))
    import demo

    points = lidar_sweep(seed=0)
    features, coords, shape = voxelize_mean(points, demo.VOXEL_SIZE, demo.POINT_RANGE)
    indices = torch.nn.functional.pad(torch.from_numpy(coords), (1, 0), value=0).int()
    return torch.from_numpy(features), indices, shape.tolist()


def kitti_sites(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    _, indices, shape = load_voxels(path)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(len(indices), 16, generator=gen), indices.int(), list(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a KITTI .bin frame")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"spconv_lite {spconv_lite.__version__} | torch {torch.__version__} | "
          f"spconv {SPCONV_VERSION or 'absent'} | 1 thread")
    cases = [("isolated k7", isolated_sites, 16, 7), ("sweep k5", sweep_sites, 16, 5)]
    if args.data.exists():
        cases.append(("kitti k5", lambda: kitti_sites(args.data), 16, 5))
    else:
        print(f"{args.data} not found: the kitti case is skipped")
    print(f"{'case':<12} {'sites in':>9} {'sites out':>10} {'table MB':>9} "
          f"{'ours ms':>36} {'spconv ms':>36} {'spconv/ours':>12}")
    for name, make, c_out, kernel in cases:
        features, indices, shape = make()
        c_in = features.shape[1]
        fns = {}
        for lib in (spconv_lite, spconv_torch):
            if lib is None:
                continue
            torch.manual_seed(0)
            layer = lib.SparseConv3d(c_in, c_out, kernel, padding=kernel // 2, bias=False)

            def forward(lib=lib, layer=layer):
                with torch.no_grad():
                    return layer(lib.SparseConvTensor(features, indices, shape, 1))

            fns[lib.__name__.split(".")[0]] = forward
        sites_out = fns["spconv_lite"]().indices.shape[0]
        stats = time_alternating(fns, 1, args.repeats)
        ours = stats["spconv_lite"]
        theirs = stats.get("spconv")
        ratio = f"{theirs['median_ms'] / ours['median_ms']:.2f}x" if theirs else "-"
        table_mb = sites_out * kernel ** 3 * 4 / 1e6
        print(f"{name:<12} {len(indices):>9} {sites_out:>10} {table_mb:>9.0f} "
              f"{fmt(ours):>36} {fmt(theirs):>36} {ratio:>12}")


if __name__ == "__main__":
    main()
