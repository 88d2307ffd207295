"""Benchmark of spconv_lite's core ops on a real KITTI frame, against spconv 2.3.8 when present.

Input: KITTI object training frame 000000 (HDL-64E, 115k points), voxelized at
0.05 x 0.05 x 0.1 m over x 0..70.4, y -40..40, z -3..1 (mean of the points per voxel,
``spconv_lite.synthetic.voxelize_mean``): about 41k voxels on a
``[40, 1600, 1408]`` (z, y, x) grid. The conv layers get random 16 / 32-channel features on
those sites (seeded), since their inputs in a network are the output of earlier layers.

Cases:
  kmap subm k3          submanifold kernel map (3x3x3) of the voxels
  kmap conv k3s2        regular conv kernel map (kernel 3, stride 2, padding 1) and output sites
  subm 16->16 / 32->32  SubMConv3d forward with the kernel map already cached (``indice_key``
                        reuse, as for every subm layer after the first in a block)
  conv 16->32 k3s2      SparseConv3d(16, 32, 3, stride=2, padding=1) forward, map built each call
  subm 32->32 f16       the 32-channel SubMConv3d in float16 (features and weight)
  subm 16->16 k5        a 5x5x5 SubMConv3d (125 offsets, most of them empty at each site)
  subm 16->16 k1        a 1x1 SubMConv3d (one product on the input's own rows, no map)
  subm 128->128 k1      a wide 1x1 SubMConv3d (Pointcept's and VoxelNeXt's 1x1 layers)
  subm 128->128         a wide SubMConv3d (the width of deep stages, here on the full frame)
  ... fwd+bwd           forward plus backward (gradients of features and weight)

Every case runs ``--warmup`` times, then ``--repeats`` timed times; the median and the spread
(min, max, interquartile range) are reported in milliseconds. spconv is timed in the same run,
on the same input and weights, alternating call by call with ours, and only with 1 thread: its
CPU kernels give wrong results with more than one OpenMP thread. Ours is also timed with every
thread count in ``--threads``. Outputs are compared (same output sites after sorting, max
relative feature error).

Usage (from the repository root):
    python benchmarks/bench_core.py [--repeats 30] [--warmup 3] [--threads 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from arguments import non_negative_int, positive_int, thread_counts
from common import (
    SPCONV_VERSION,
    Case,
    ConvAlgo,
    cpu_name,
    fmt,
    probe,
    spconv_ops,
    spconv_torch,
    time_case,
)
from results_file import check_results_path, write_json

import spconv_lite
from spconv_lite import ops
from spconv_lite.synthetic import voxelize_mean

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lidar" / "kitti_object_training_000000.bin"
VOXEL_SIZE = [0.05, 0.05, 0.1]
POINT_RANGE = [0.0, -40.0, -3.0, 70.4, 40.0, 1.0]

# ---------------------------------------------------------------------------------------------
# Input


def load_voxels(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """KITTI .bin -> (mean features [N, 4], int32 indices [N, 4] with batch 0, (z, y, x) shape)."""
    if not path.is_file():
        raise SystemExit(
            f"error: KITTI frame not found at {path}\n"
            "Expected the shared data folder beside the repository "
            "(<repo>/../shared/data/lidar/kitti_object_training_000000.bin); "
            "pass --data PATH to use another file (raw float32 x, y, z, intensity)."
        )
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    features, coords, shape = voxelize_mean(points, VOXEL_SIZE, POINT_RANGE)
    indices = torch.nn.functional.pad(torch.from_numpy(coords), (1, 0), value=0)
    return torch.from_numpy(features), indices.contiguous(), shape.tolist()


# ---------------------------------------------------------------------------------------------
# Cases: each gives a zero-argument callable for ours and (optionally) for spconv, plus a check
# comparing the two outputs.


def sort_rows(indices: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Permutation sorting sites by (batch, z, y, x)."""
    idx = indices.long()
    key = ((idx[:, 0] * shape[0] + idx[:, 1]) * shape[1] + idx[:, 2]) * shape[2] + idx[:, 3]
    return torch.argsort(key)


def compare(ours, theirs) -> str:
    """Same output sites (after sorting) and the max feature error relative to max |value|."""
    perm_a = sort_rows(ours.indices, ours.spatial_shape)
    perm_b = sort_rows(theirs.indices, list(theirs.spatial_shape))
    if not torch.equal(ours.indices[perm_a], theirs.indices[perm_b]):
        return f"DIFFERENT SITES ({len(perm_a)} vs {len(perm_b)})"
    a, b = ours.features[perm_a], theirs.features[perm_b]
    rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return f"sites equal, rel err {rel:.1e}"


def kmap_cases(indices: torch.Tensor, shape: list[int]) -> list[Case]:
    k3, one, zero = [3, 3, 3], [1, 1, 1], [0, 0, 0]
    out_shape = [(n + 2 - 2 - 1) // 2 + 1 for n in shape]
    cases = []
    for name, subm in (("kmap subm k3", True), ("kmap conv k3s2", False)):
        if subm:
            def ours(): return ops.build_subm_map(indices, shape, 1, k3, one)
        else:
            def ours(): return ops.build_conv_map(indices, shape, 1, out_shape, k3, [2] * 3,
                                                  one, one, False)
        theirs = check = None
        if spconv_torch is not None:
            stride, pad = (one, one) if subm else ([2] * 3, one)

            def theirs(stride=stride, pad=pad, subm=subm):
                return spconv_ops.get_indice_pairs(indices, 1, shape, ConvAlgo.Native, k3,
                                                   stride, pad, one, zero, subm=subm)

            def check(ours=ours, theirs=theirs, subm=subm):
                # Pairs per kernel offset and number of output sites must agree.
                nbr = ours()[0 if subm else 1]
                out_a = len(indices) if subm else len(ours()[0])
                out_b, _, pair_num = theirs()
                counts_a = (nbr >= 0).sum(0).tolist()
                counts_b = pair_num.tolist()
                if subm:
                    # spconv lists only the offsets before the centre (the rest mirror them).
                    half = len(counts_a) // 2
                    counts_a, counts_b = counts_a[:half], counts_b[:half]
                if out_a != len(out_b) or counts_a != counts_b:
                    return f"DIFFERENT MAPS (sites {out_a} vs {len(out_b)})"
                return f"pairs/offset equal ({int((nbr >= 0).sum())} pairs)"
        cases.append(Case(name, ours, theirs, check))
    return cases


def conv_cases(indices: torch.Tensor, shape: list[int], n_sites: int) -> list[Case]:
    cases = []
    specs = [  # name, c_in, c_out, subm, dtype, kernel size
        ("subm 16->16", 16, 16, True, torch.float32, 3),
        ("subm 32->32", 32, 32, True, torch.float32, 3),
        ("conv 16->32 k3s2", 16, 32, False, torch.float32, 3),
        ("subm 32->32 f16", 32, 32, True, torch.float16, 3),
        ("subm 16->16 k5", 16, 16, True, torch.float32, 5),
        ("subm 16->16 k1", 16, 16, True, torch.float32, 1),
        ("subm 128->128 k1", 128, 128, True, torch.float32, 1),
        ("subm 128->128", 128, 128, True, torch.float32, 3),
    ]
    for name, c_in, c_out, subm, dtype, kernel in specs:
        torch.manual_seed(c_in * 100 + c_out)
        feats = torch.randn(n_sites, c_in).to(dtype)
        if subm:
            ours_layer = spconv_lite.SubMConv3d(c_in, c_out, kernel, bias=False,
                                                indice_key="subm")
        else:
            ours_layer = spconv_lite.SparseConv3d(c_in, c_out, 3, stride=2, padding=1,
                                                  bias=False)
        ours_layer.to(dtype)
        # subm: one tensor whose indice_dict holds the map, built once before the timing (a
        # layer's output carries its map, in both libraries); strided conv: a fresh tensor per
        # call, so the map is built every time.
        ours_x = spconv_lite.SparseConvTensor(feats, indices, shape, 1)
        if subm:
            with torch.no_grad():
                ours_x.indice_dict = ours_layer(ours_x).indice_dict

        def ours_input(x=ours_x, subm=subm, feats=feats):
            return x if subm else spconv_lite.SparseConvTensor(feats, indices, shape, 1)

        theirs_input = their_layer = None
        if spconv_torch is not None:
            if subm:
                their_layer = spconv_torch.SubMConv3d(c_in, c_out, kernel, bias=False,
                                                      indice_key="subm")
            else:
                their_layer = spconv_torch.SparseConv3d(c_in, c_out, 3, stride=2, padding=1,
                                                        bias=False)
            their_layer.to(dtype).weight.data.copy_(ours_layer.weight.data)  # [C_out, k.., C_in]
            their_x = spconv_torch.SparseConvTensor(feats, indices, shape, 1)
            if subm:
                with torch.no_grad():
                    their_x.indice_dict = their_layer(their_x).indice_dict

            def theirs_input(x=their_x, subm=subm, feats=feats):
                return x if subm else spconv_torch.SparseConvTensor(feats, indices, shape, 1)

        def forward(layer, make_input):
            with torch.no_grad():
                return layer(make_input())

        def forward_backward(layer, make_input):
            x = make_input()
            x = x.replace_feature(x.features.detach().requires_grad_())
            out = layer(x)
            grad = torch.ones_like(out.features)
            return torch.autograd.grad(out.features, [x.features, layer.weight], grad)

        def bind(fn, layer, make_input):
            return None if layer is None else (lambda: fn(layer, make_input))

        fwd_ours = bind(forward, ours_layer, ours_input)
        fwd_theirs = bind(forward, their_layer, theirs_input)
        check = None
        if fwd_theirs is not None:
            def check(a=fwd_ours, b=fwd_theirs):
                return compare(a(), b())
        cases.append(Case(f"{name} fwd", fwd_ours, fwd_theirs, check))
        cases.append(Case(f"{name} fwd+bwd", bind(forward_backward, ours_layer, ours_input),
                          bind(forward_backward, their_layer, theirs_input)))
    return cases


# ---------------------------------------------------------------------------------------------
# Timing


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Time spconv_lite's kernel maps and convs on a KITTI frame (vs spconv).")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"KITTI .bin point cloud (default: {DEFAULT_DATA})")
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed runs per case")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed runs first")
    parser.add_argument("--threads", type=thread_counts, default="1,2",
                        help="comma-separated torch thread counts for ours (spconv: 1 only)")
    parser.add_argument("--no-spconv", action="store_true", help="skip the spconv baseline")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args()
    check_results_path(parser, args.json, args.data)
    threads = args.threads
    use_spconv = spconv_torch is not None and not args.no_spconv

    features, indices, shape = load_voxels(args.data)
    meta = {
        "spconv_lite": spconv_lite.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "spconv": SPCONV_VERSION if use_spconv else None,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "data": str(args.data),
        "points": int(args.data.stat().st_size // 16),
        "voxels": len(features),
        "spatial_shape_zyx": shape,
        "voxel_size_xyz": VOXEL_SIZE,
        "point_range": POINT_RANGE,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": threads,
    }
    print(f"spconv_lite {meta['spconv_lite']} | torch {meta['torch']} | "
          f"spconv {meta['spconv'] or 'not available'} | python {meta['python']}")
    print(f"CPU: {meta['cpu']} ({meta['cpu_count']} logical cores)")
    print(f"input: {args.data.name}, {meta['points']} points -> {meta['voxels']} voxels, "
          f"grid (z, y, x) {shape}")
    print(f"timing: {args.warmup} warm-up + {args.repeats} timed runs per case, "
          "median [IQR] (min-max) in ms")
    if use_spconv and 1 not in threads:
        print("note: spconv is only timed with 1 thread; add 1 to --threads to compare")

    cases = kmap_cases(indices, shape) + conv_cases(indices, shape, len(features))
    results = []
    checks = {}
    if use_spconv:
        torch.set_num_threads(1)  # spconv is only correct with one thread
        for case in cases:
            if case.check is not None:
                reason = probe(case.theirs)
                checks[case.name] = case.check() if reason is None else f"spconv failed: {reason}"
    baseline = {}  # case -> spconv median at 1 thread
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for case in cases:
            res = time_case(case, args.warmup, args.repeats, use_spconv and n_threads == 1)
            for impl, st in res["stats"].items():
                results.append({"case": case.name, "impl": impl, "threads": n_threads, **st})
            if "spconv" in res["stats"]:
                baseline[case.name] = res["stats"]["spconv"]["median_ms"]
            if "spconv" in res["errors"]:
                results.append({"case": case.name, "impl": "spconv", "threads": n_threads,
                                "error": res["errors"]["spconv"]})
            print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)

    header = (f"{'case':<24} {'thr':>3}  {'spconv_lite ms':<32} {'spconv 2.3.8 ms (1 thread)':<32} "
              f"{'spconv/ours':>11}  check")
    print("\n" + header)
    print("-" * len(header))
    by_key = {(r["case"], r["impl"], r["threads"]): r for r in results}
    failures = {}
    for n_threads in threads:
        for case in cases:
            ours = by_key[(case.name, "spconv_lite", n_threads)]
            theirs = by_key.get((case.name, "spconv", 1))
            if theirs is None:
                their_text, ratio = ("-" if use_spconv else "not run"), ""
            elif "error" in theirs:
                their_text, ratio = "fails (error below)", ""
                failures[case.name] = theirs["error"]
            else:
                their_text = fmt(theirs) if n_threads == 1 else "(1-thread run above)"
                ratio_value = baseline[case.name] / ours["median_ms"]
                ours["speedup_vs_spconv_1thread"] = ratio_value
                ratio = f"{ratio_value:.2f}x"
            check = checks.get(case.name, "") if n_threads == threads[0] else ""
            print(f"{case.name:<24} {n_threads:>3}  {fmt(ours):<32} {their_text:<32} "
                  f"{ratio:>11}  {check}")
    print("\nspconv/ours > 1 means spconv_lite is faster; the 2-thread rows compare against "
          "spconv's 1-thread median.")
    for name, error in failures.items():
        print(f"spconv failed on {name!r}: {error}")

    if args.json is not None:
        write_json(args.json, {"meta": meta, "checks": checks, "results": results}, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
