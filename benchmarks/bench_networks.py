"""Whole-network CPU benchmark: spconv_lite against spconv 2.3.8 on real LiDAR frames.

Networks (the same modules built from either library, same weights):
  second   OpenPCDet's VoxelBackBone8x (SECOND): SubM 4->16, 16->16; strided 16->32, 2x SubM 32;
           strided 32->64, 2x SubM 64; strided 64->64 padding (0,1,1), 2x SubM 64; (3,1,1) conv
           64->128 stride (2,1,1); BatchNorm1d + ReLU after each conv, no bias. KITTI frame
           000000, voxel 0.05 x 0.05 x 0.1 m over 0 -40 -3 70.4 40 1, mean voxel features,
           grid (z, y, x) [41, 1600, 1408].
  spconv   spconv's benchmark network: SubM 3->64, 64->64, then a stage of [max pool 2/2,
           SubM to the width, SubM same width] for each width 96/128/160/192/224/256 (the
           widths the performance issue lists; benchmarks/bench_cuda.py builds the same net);
           no norm, no bias.
           spconv_benchmark-pc.npz voxelized at 0.1 m over -80 -80 -2 80 80 6.

Each pass builds fresh kernel maps (a new SparseConvTensor per pass), as in real use. Reported:
median and spread of forward (and our forward+backward: spconv cannot train on a CPU-only torch)
after warm-up, alternating ours and spconv call by call; useful GFLOP/s = 2 x pairs x C_in x
C_out summed over the conv layers / time, as a fraction of the machine's peak (the best
``torch.mm`` GFLOP/s of a few shapes, measured in the same run per thread count); the share of
our forward spent building kernel maps; peak memory of a forward in a fresh process (ru_maxrss
growth); and whether the outputs match spconv's. spconv runs with one thread only (its CPU conv
races with more); ours with each count in ``--threads``.

Usage (from the repository root):
    python benchmarks/bench_networks.py [--nets second,spconv] [--repeats 10] [--threads 1,2]
                                        [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from arguments import non_negative_int, positive_int, thread_counts
from common import (
    DATA_DIR,
    SPCONV_VERSION,
    cpu_name,
    spconv_torch,
    time_alternating,
)
from results_file import check_results_path, write_json
from torch import nn

import spconv_lite
from spconv_lite.synthetic import voxelize_mean

NETS = {
    "second": dict(
        file="kitti_object_training_000000.bin", columns=4, voxel_size=[0.05, 0.05, 0.1],
        point_range=[0.0, -40.0, -3.0, 70.4, 40.0, 1.0], extra_z=1,
    ),
    "spconv": dict(
        file="spconv_benchmark-pc.npz", columns=3, voxel_size=[0.1, 0.1, 0.1],
        point_range=[-80.0, -80.0, -2.0, 80.0, 80.0, 6.0], extra_z=0,
    ),
}


# ---------------------------------------------------------------------------------------------
# Networks, written once against a module namespace (spconv_lite or spconv.pytorch).


def second_backbone(ns) -> nn.Module:
    def block(c_in, c_out, kernel, key, stride=1, padding=0, subm=True):
        if subm:
            conv = ns.SubMConv3d(c_in, c_out, kernel, bias=False, indice_key=key)
        else:
            conv = ns.SparseConv3d(c_in, c_out, kernel, stride=stride, padding=padding,
                                   bias=False, indice_key=key)
        return ns.SparseSequential(conv, nn.BatchNorm1d(c_out, eps=1e-3, momentum=0.01),
                                   nn.ReLU())

    return ns.SparseSequential(
        block(4, 16, 3, "subm1"), block(16, 16, 3, "subm1"),
        block(16, 32, 3, "spconv2", 2, 1, subm=False), block(32, 32, 3, "subm2"),
        block(32, 32, 3, "subm2"),
        block(32, 64, 3, "spconv3", 2, 1, subm=False), block(64, 64, 3, "subm3"),
        block(64, 64, 3, "subm3"),
        block(64, 64, 3, "spconv4", 2, (0, 1, 1), subm=False), block(64, 64, 3, "subm4"),
        block(64, 64, 3, "subm4"),
        block(64, 128, (3, 1, 1), "spconv_down2", (2, 1, 1), 0, subm=False),
    )


def spconv_benchmark_net(ns) -> nn.Module:
    layers = [ns.SubMConv3d(3, 64, 3, bias=False, indice_key="c0"),
              ns.SubMConv3d(64, 64, 3, bias=False, indice_key="c0")]
    width = 64
    for stage, out in enumerate([96, 128, 160, 192, 224, 256]):
        layers += [ns.SparseMaxPool3d(2, 2),
                   ns.SubMConv3d(width, out, 3, bias=False, indice_key=f"c{stage + 1}"),
                   ns.SubMConv3d(out, out, 3, bias=False, indice_key=f"c{stage + 1}")]
        width = out
    return ns.SparseSequential(*layers)


BUILDERS = {"second": second_backbone, "spconv": spconv_benchmark_net}


def load_input(name: str, data_dir: Path):
    """Voxelized frame: (features [N, C], int32 indices [N, 4], spatial shape (z, y, x))."""
    spec = NETS[name]
    path = data_dir / spec["file"]
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (pass --data DIR, the folder of the frames)")
    if path.suffix == ".npz":
        points = np.load(path)["pc"].astype(np.float32)
    else:
        points = np.fromfile(path, dtype=np.float32).reshape(-1, spec["columns"])
    features, coords, shape = voxelize_mean(points, spec["voxel_size"], spec["point_range"])
    shape = [int(shape[0]) + spec["extra_z"], int(shape[1]), int(shape[2])]
    indices = torch.nn.functional.pad(torch.from_numpy(coords), (1, 0), value=0).contiguous()
    return torch.from_numpy(features), indices, shape


def leaf_modules(module: nn.Module):
    """The modules a SparseSequential tree applies, in order."""
    if isinstance(module, spconv_lite.SparseSequential):
        for child in module.children():
            yield from leaf_modules(child)
    else:
        yield module


def profile_forward(net: nn.Module, features, indices, shape) -> tuple[float, float]:
    """(useful GFLOP of one forward, seconds of kernel-map building in that forward).

    Replays the forward layer by layer; each map the network builds (not the ones a SubM layer
    reuses through its indice_key) is built once more outside the layer to time it."""
    from spconv_lite.kernel_map import conv_map, subm_map

    flop, map_seconds = 0.0, 0.0
    x = spconv_lite.SparseConvTensor(features, indices, shape, 1)
    with torch.no_grad():
        for module in leaf_modules(net):
            if not isinstance(module, (spconv_lite.SparseConvolution, spconv_lite.SparsePool)):
                x = x.replace_feature(module(x.features))
                continue
            kmap = x.find_indice_pair(module.indice_key) if module.subm else None
            if kmap is None:
                probe = x.shadow_copy()
                probe.indice_dict = {}
                start = time.perf_counter()
                if module.subm:
                    kmap = subm_map(probe, module.kernel_size, module.dilation, None)
                else:
                    kmap = conv_map(probe, module.kernel_size, module.stride, module.padding,
                                    module.dilation, None)
                map_seconds += time.perf_counter() - start
            if isinstance(module, spconv_lite.SparseConvolution):
                pairs = int((kmap.nbr >= 0).sum())
                flop += 2.0 * pairs * module.in_channels * module.out_channels
            x = module(x)
    return flop / 1e9, map_seconds


def peak_mm_gflops(repeats: int = 5) -> float:
    """Best torch.mm GFLOP/s over a few shapes (the machine's practical peak)."""
    best = 0.0
    for m, k, n in [(4096, 256, 256), (2048, 512, 512), (1024, 1024, 1024)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best = max(best, 2.0 * m * k * n / min(times) / 1e9)
    return best


def memory_probe(impl: str, name: str, data_dir: str) -> int:
    """Peak RSS growth (bytes) of one forward of ``name`` by ``impl``, in a fresh process: the
    kernel's peak-RSS mark (VmHWM) is reset after setup (Linux ``clear_refs``), so only the
    forward's own allocations count."""
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]);"
        "import bench_networks as b; torch.set_num_threads(1);"
        "f, i, s = b.load_input(sys.argv[3], __import__('pathlib').Path(sys.argv[4]));"
        "ns = b.namespace(sys.argv[2]); net = b.BUILDERS[sys.argv[3]](ns).eval();"
        "status = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)]"
        "[0].split()[1]) * 1024;"
        "open('/proc/self/clear_refs', 'w').write('5'); before = status('VmRSS:');"
        "torch.no_grad().__enter__(); out = net(ns.SparseConvTensor(f, i, s, 1));"
        "print(status('VmHWM:') - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), impl, name, data_dir],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def namespace(impl: str):
    return spconv_lite if impl == "spconv_lite" else spconv_torch


def compare(ours, theirs) -> str:
    def order(t):
        idx = t.indices.long()
        shape = list(t.spatial_shape)
        return torch.argsort(((idx[:, 1] * shape[1] + idx[:, 2]) * shape[2]) + idx[:, 3])

    a, b = order(ours), order(theirs)
    if not torch.equal(ours.indices[a], theirs.indices[b]):
        return f"DIFFERENT SITES ({len(a)} vs {len(b)})"
    fa, fb = ours.features[a], theirs.features[b]
    rel = ((fa - fb).abs().max() / fb.abs().max().clamp_min(1e-30)).item()
    return f"same {len(a)} sites, max rel err {rel:.1e}"


def run_net(name: str, args, threads: list[int], peaks: dict) -> dict:
    features, indices, shape = load_input(name, args.data)
    torch.manual_seed(0)
    ours_net = BUILDERS[name](spconv_lite).eval()
    theirs_net = None
    if spconv_torch is not None and not args.no_spconv:
        theirs_net = BUILDERS[name](spconv_torch).eval()
        theirs_net.load_state_dict(ours_net.state_dict())
    gflop, _ = profile_forward(ours_net, features, indices, shape)
    print(f"\n[{name}] {NETS[name]['file']}: {len(features)} voxels, grid {shape}, "
          f"useful work {gflop:.2f} GFLOP per forward")

    def forward(ns, net):
        def fn():
            with torch.no_grad():
                return net(ns.SparseConvTensor(features, indices, shape, 1))
        return fn

    def train_step():
        ours_net.train()
        x = spconv_lite.SparseConvTensor(features, indices, shape, 1)
        ours_net(x).features.sum().backward()
        ours_net.zero_grad(set_to_none=True)
        ours_net.eval()

    result = {"voxels": len(features), "spatial_shape": shape, "useful_gflop": gflop,
              "runs": []}
    if theirs_net is not None:
        torch.set_num_threads(1)
        result["check"] = compare(forward(spconv_lite, ours_net)(),
                                  forward(spconv_torch, theirs_net)())
        if name == "spconv" and "DIFFERENT" not in result["check"]:
            # Expected: spconv's CPU max pool clamps negative maxima to 0 (a known defect).
            result["check"] += " (spconv's max pool clamps negative maxima to 0; ours does not)"
        print(f"  output vs spconv: {result['check']}")
    for n in threads:
        torch.set_num_threads(n)
        fns = {"ours fwd": forward(spconv_lite, ours_net)}
        if theirs_net is not None and n == 1:
            fns["spconv fwd"] = forward(spconv_torch, theirs_net)
        timings = time_alternating(fns, args.warmup, args.repeats)
        timings["ours fwd+bwd"] = time_alternating({"x": train_step}, 1, args.repeats)["x"]
        map_seconds = min(profile_forward(ours_net, features, indices, shape)[1] for _ in range(3))
        for label, st in timings.items():
            gflops = gflop / (st["median_ms"] / 1e3)
            summary = {k: v for k, v in st.items() if k != "samples_ms"}
            row = {"threads": n, "what": label, **summary,
                   "useful_gflops": gflops, "fraction_of_peak": gflops / peaks[n]}
            result["runs"].append(row)
        ours_ms = timings["ours fwd"]["median_ms"]
        result["runs"].append({"threads": n, "what": "kernel maps (inside ours fwd)",
                               "median_ms": map_seconds * 1e3,
                               "fraction_of_forward": map_seconds * 1e3 / ours_ms})
    if args.memory:
        result["peak_rss_forward_bytes"] = {
            impl: memory_probe(impl, name, str(args.data))
            for impl in (["spconv_lite"] + (["spconv"] if theirs_net is not None else []))
        }
    return result


def print_table(name: str, result: dict, peaks: dict) -> None:
    print(f"  {'threads':>7} {'what':<30} {'median ms':>10} {'IQR':>17} {'GFLOP/s':>8} "
          f"{'of peak':>8}")
    spconv_ms = next((r["median_ms"] for r in result["runs"] if r["what"] == "spconv fwd"), None)
    for r in result["runs"]:
        if "fraction_of_forward" in r:
            print(f"  {r['threads']:>7} {r['what']:<30} {r['median_ms']:>10.1f} "
                  f"{'':>17} {'':>8} {r['fraction_of_forward']:>7.0%} of fwd")
            continue
        iqr = f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f}"
        line = (f"  {r['threads']:>7} {r['what']:<30} {r['median_ms']:>10.1f} {iqr:>17} "
                f"{r['useful_gflops']:>8.1f} {r['fraction_of_peak']:>8.0%}")
        if spconv_ms is not None and r["what"] == "ours fwd":
            line += f"   {spconv_ms / r['median_ms']:.2f}x faster than spconv (1 thread)"
        print(line)
    if "peak_rss_forward_bytes" in result:
        mem = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in
                        result["peak_rss_forward_bytes"].items())
        print(f"  peak RSS growth of one forward: {mem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="second,spconv")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="folder of the LiDAR frames")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=thread_counts, default="1,2")
    parser.add_argument("--no-spconv", action="store_true")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    check_results_path(parser, args.json, args.data)
    threads = args.threads
    nets = [n for n in args.nets.split(",") if n]
    unknown = [n for n in nets if n not in BUILDERS]
    if unknown:
        parser.error(f"--nets: unknown {unknown}, choose from {sorted(BUILDERS)}")

    peaks = {}
    for n in threads:
        torch.set_num_threads(n)
        peaks[n] = peak_mm_gflops()
    print(f"spconv_lite {spconv_lite.__version__} | torch {torch.__version__} | spconv "
          f"{SPCONV_VERSION or 'not available'} | {cpu_name()} | python "
          f"{platform.python_version()}")
    print("machine peak (best torch.mm): " +
          ", ".join(f"{n} thread(s) {p:.1f} GFLOP/s" for n, p in peaks.items()))
    results = {}
    for name in nets:
        results[name] = run_net(name, args, threads, peaks)
        print_table(name, results[name], peaks)
    if args.json:
        meta = {"spconv_lite": spconv_lite.__version__, "torch": torch.__version__,
                "spconv": SPCONV_VERSION, "cpu": cpu_name(), "threads": threads,
                "repeats": args.repeats, "warmup": args.warmup, "peak_mm_gflops": peaks}
        write_json(args.json, {"meta": meta, "nets": results}, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
