"""spconv_lite demo: a synthetic LiDAR sweep through a small SECOND-style sparse backbone.

Steps: ray-cast a 64-beam sweep of a synthetic street (``spconv_lite.synthetic``), voxelize it
(0.1 m voxels, mean of the points), wrap it in a ``SparseConvTensor``, run a sparse 3D
backbone (submanifold convs, strided convs, an inverse conv that reuses a strided conv's kernel
map through ``indice_key``, a max pool), print what each layer did and how long it took, turn
the result into a bird's-eye-view map, and check one layer against the pure-PyTorch reference.

Run from the repository root after ``pip install --no-build-isolation -e .``:

    python examples/demo.py [--seed 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import spconv_lite as spconv
from spconv_lite import reference
from spconv_lite.synthetic import lidar_sweep, voxelize_mean

VOXEL_SIZE = [0.1, 0.1, 0.1]  # x, y, z (metres)
POINT_RANGE = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]  # x/y/z min, then x/y/z max (KITTI front)


def block(conv: nn.Module, channels: int) -> spconv.SparseSequential:
    """conv + BatchNorm1d + ReLU on the features, the unit SECOND's backbone is made of."""
    return spconv.SparseSequential(conv, nn.BatchNorm1d(channels), nn.ReLU())


def build_backbone(in_channels: int) -> list[tuple[str, nn.Module]]:
    """A small SECOND-like encoder (x1 -> x2 -> x4) with one decoder step back to x2 and a
    max pool that flattens height for the BEV map. Layers sharing an ``indice_key`` share one
    kernel map; the inverse conv reuses the map that the x4 strided conv cached."""
    return [
        ("subm1a", block(spconv.SubMConv3d(in_channels, 16, 3, bias=False,
                                           indice_key="subm1"), 16)),
        ("subm1b", block(spconv.SubMConv3d(16, 16, 3, bias=False, indice_key="subm1"), 16)),
        ("down2", block(spconv.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False,
                                            indice_key="down2"), 32)),
        ("subm2", block(spconv.SubMConv3d(32, 32, 3, bias=False, indice_key="subm2"), 32)),
        ("down4", block(spconv.SparseConv3d(32, 64, 3, stride=2, padding=1, bias=False,
                                            indice_key="down4"), 64)),
        ("subm4", block(spconv.SubMConv3d(64, 64, 3, bias=False, indice_key="subm4"), 64)),
        ("up2", block(spconv.SparseInverseConv3d(64, 32, 3, bias=False, indice_key="down4"), 32)),
        ("pool", spconv.SparseMaxPool3d(kernel_size=(4, 1, 1), stride=(4, 1, 1))),
    ]


def counting_from(low: int):
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=counting_from(0), default=0, help="scene and noise seed")
    parser.add_argument("--threads", type=counting_from(1), default=None,
                        help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"spconv_lite {spconv.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    points = lidar_sweep(seed=args.seed)
    t1 = time.perf_counter()
    features, coords, spatial_shape = voxelize_mean(points, VOXEL_SIZE, POINT_RANGE)
    t2 = time.perf_counter()
    print(f"sweep: {len(points)} points (64 beams, synthetic street) in {t1 - t0:.2f} s")
    print(f"voxels: {len(features)} of size {VOXEL_SIZE} m over {POINT_RANGE}, "
          f"grid (z, y, x) {spatial_shape.tolist()}, in {t2 - t1:.3f} s")

    # Batch of one: prepend the batch index column to the (z, y, x) voxel coordinates.
    indices = torch.nn.functional.pad(torch.from_numpy(coords), (1, 0), value=0)
    x = spconv.SparseConvTensor(torch.from_numpy(features), indices, spatial_shape, batch_size=1)

    layers = build_backbone(in_channels=features.shape[1])
    nn.ModuleList(module for _, module in layers).eval()  # BatchNorm: running statistics

    def forward(x: spconv.SparseConvTensor, report: bool) -> tuple[spconv.SparseConvTensor, dict]:
        """Runs the layers in order; returns the output and each layer's input."""
        seen = {}
        total = 0.0
        for name, module in layers:
            seen[name] = x
            first = module[0] if isinstance(module, spconv.SparseSequential) else module
            key = getattr(first, "indice_key", None)
            kmap = "reused" if key is not None and key in x.indice_dict else "built"
            start = time.perf_counter()
            x = module(x)
            ms = (time.perf_counter() - start) * 1e3
            total += ms
            if report:
                print(f"{name:<8} {type(first).__name__:<20} {kmap:<7} {x.features.shape[0]:>7} "
                      f"{x.features.shape[1]:>4}  {x.spatial_shape!s:<16} {ms:>7.1f}")
        if report:
            print(f"{'total':<8} {'':<20} {'':<7} {'':>7} {'':>4}  {'':<16} {total:>7.1f}")
        return x, seen

    with torch.no_grad():
        # A first pass pays one-time costs (allocator, thread pool); time the second one.
        forward(spconv.SparseConvTensor(x.features, x.indices, x.spatial_shape, 1), False)
        print(f"\n{'layer':<8} {'op':<20} {'map':<7} {'sites':>7} {'ch':>4}  "
              f"{'spatial (z,y,x)':<16} {'ms':>7}")
        print(f"{'input':<8} {'':<20} {'':<7} {x.features.shape[0]:>7} {x.features.shape[1]:>4}  "
              f"{x.spatial_shape!s:<16}")
        x, inputs = forward(x, True)

        dense = x.dense()  # [B, C, D, H, W]
        b, c, d, h, w = dense.shape
        bev = dense.reshape(b, c * d, h, w)
        occupied = (bev.abs().sum(dim=1) > 0).float().mean().item()
        print(f"\nBEV map: dense {list(dense.shape)} -> [B, C*D, H, W] {list(bev.shape)} "
              f"({occupied:.1%} of BEV cells occupied)")

        # Check the second submanifold conv (16 -> 16, no bias) on the whole input against the
        # slow pure-PyTorch reference; float64 on both sides so the error is rounding only.
        conv = copy.deepcopy(layers[1][1][0]).double()
        x_in = inputs["subm1b"]
        feats64 = x_in.features.double()
        ours = conv(x_in.replace_feature(feats64)).features
        start = time.perf_counter()
        expected = reference.subm_conv(feats64, x_in.indices, x_in.spatial_shape, conv.weight)
        ref_s = time.perf_counter() - start
        err = (ours - expected).abs().max().item()
        scale = expected.abs().max().item()
        status = "OK" if err <= 1e-9 * max(scale, 1.0) else "FAILED"
        print(f"reference check: {status} (max abs err {err:.2e}, max |value| {scale:.2f}, "
              f"subm1b on all {len(feats64)} sites, reference took {ref_s:.1f} s)")
        if status != "OK":
            raise SystemExit(1)


if __name__ == "__main__":
    main()
