"""Kernel-level CPU benchmark on the layer shapes of the two benchmark networks.

For every conv layer of ``bench_networks.py``'s networks (replayed on their real frames), times:
  map      building its kernel map (pairs per second; a SubM layer that reuses a map is skipped)
  fused    spconv_lite's fused gather-GEMM-scatter forward (useful GFLOP/s)
and, as the unfused baseline that spconv's CPU path follows, per kernel offset:
  gather   index_select of the input rows (GB/s moved)
  gemm     torch.mm of the gathered rows with the offset's weight (GFLOP/s)
  scatter  index_add_ of the products into the output rows (GB/s moved)
Medians of ``--repeats`` runs after one warm-up, for each thread count in ``--threads``.

Usage (from the repository root):
    python benchmarks/bench_kernels.py [--nets second,spconv] [--repeats 5] [--threads 1,2]
                                       [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from arguments import positive_int, thread_counts
from bench_networks import BUILDERS, leaf_modules, load_input
from common import DATA_DIR, cpu_name
from results_file import check_results_path, write_json

import spconv_lite
from spconv_lite import ops
from spconv_lite.kernel_map import conv_map, subm_map


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_inputs(name: str, data_dir: Path):
    """(layer, input SparseConvTensor, whether its map is reused) for each conv layer."""
    features, indices, shape = load_input(name, data_dir)
    torch.manual_seed(0)
    net = BUILDERS[name](spconv_lite).eval()
    x = spconv_lite.SparseConvTensor(features, indices, shape, 1)
    layers = []
    with torch.no_grad():
        for module in leaf_modules(net):
            if isinstance(module, spconv_lite.SparseConvolution):
                reused = module.subm and x.find_indice_pair(module.indice_key) is not None
                layers.append((module, x, reused))
            x = module(x) if isinstance(module, spconv_lite.SparseModule) else \
                x.replace_feature(module(x.features))
    return layers


def build_map(layer, x):
    fresh = x.shadow_copy()
    fresh.indice_dict = {}
    if layer.subm:
        return subm_map(fresh, layer.kernel_size, layer.dilation, None)
    return conv_map(fresh, layer.kernel_size, layer.stride, layer.padding, layer.dilation, None)


def measure_layer(layer, x, reused: bool, repeats: int) -> dict:
    kmap = build_map(layer, x)
    c_in, c_out = layer.in_channels, layer.out_channels
    volume = kmap.kernel_volume
    weight = layer.weight.detach().reshape(c_out, volume, c_in).permute(1, 2, 0).contiguous()
    feats = x.features.detach()
    pairs = int((kmap.nbr >= 0).sum())
    flop = 2.0 * pairs * c_in * c_out
    row = {"c_in": c_in, "c_out": c_out, "kernel": list(layer.kernel_size),
           "subm": layer.subm, "sites_in": feats.shape[0], "sites_out": kmap.nbr.shape[0],
           "pairs": pairs}
    if not reused:
        t = median_seconds(lambda: build_map(layer, x), repeats)
        row["map_ms"], row["map_mpairs_per_s"] = t * 1e3, pairs / t / 1e6
    t = median_seconds(lambda: ops.sparse_conv(feats, weight, kmap.nbr, kmap.nbr_t), repeats)
    row["fused_ms"], row["fused_gflops"] = t * 1e3, flop / t / 1e9

    # Unfused gather / GEMM / scatter per offset, as pair lists.
    out_rows, offsets = (kmap.nbr >= 0).nonzero(as_tuple=True)
    in_rows = kmap.nbr[out_rows, offsets].long()
    order = torch.argsort(offsets, stable=True)
    in_rows, out_rows, offsets = in_rows[order], out_rows[order], offsets[order]
    bounds = torch.bincount(offsets, minlength=volume).cumsum(0).tolist()
    spans = list(zip([0] + bounds[:-1], bounds))
    gathered = [feats.index_select(0, in_rows[a:b]) for a, b in spans]
    products = [torch.mm(g, weight[k]) for k, g in enumerate(gathered)]
    out = torch.zeros(kmap.nbr.shape[0], c_out)

    def gather():
        for a, b in spans:
            feats.index_select(0, in_rows[a:b])

    def gemm():
        for k, g in enumerate(gathered):
            torch.mm(g, weight[k])

    def scatter():
        for (a, b), p in zip(spans, products):
            out.index_add_(0, out_rows[a:b], p)

    for label, fn, moved in (("gather", gather, pairs * c_in * 4 * 2),
                             ("scatter", scatter, pairs * c_out * 4 * 3)):
        t = median_seconds(fn, repeats)
        row[f"{label}_ms"], row[f"{label}_gb_per_s"] = t * 1e3, moved / t / 1e9
    t = median_seconds(gemm, repeats)
    row["gemm_ms"], row["gemm_gflops"] = t * 1e3, flop / t / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="second,spconv")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=thread_counts, default="1,2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    check_results_path(parser, args.json, args.data)
    threads = args.threads
    print(f"spconv_lite {spconv_lite.__version__} | torch {torch.__version__} | {cpu_name()}")
    results = []
    for name in [n for n in args.nets.split(",") if n]:
        layers = layer_inputs(name, args.data)
        for n in threads:
            torch.set_num_threads(n)
            print(f"\n[{name}] {n} thread(s)")
            print(f"  {'layer':<22} {'pairs':>9} {'map ms':>7} {'Mpair/s':>8} {'fused ms':>9} "
                  f"{'GFLOP/s':>8} | {'gather GB/s':>11} {'gemm GFLOP/s':>12} "
                  f"{'scatter GB/s':>12} {'unfused ms':>10}")
            for index, (layer, x, reused) in enumerate(layers):
                row = measure_layer(layer, x, reused, args.repeats)
                row.update(net=name, threads=n, layer=index)
                results.append(row)
                kind = "subm" if layer.subm else "conv"
                label = f"{index:>2} {kind} {row['c_in']}->{row['c_out']} k{row['kernel'][0]}"
                map_text = (f"{row['map_ms']:>7.1f} {row['map_mpairs_per_s']:>8.1f}"
                            if "map_ms" in row else f"{'reused':>7} {'':>8}")
                unfused = row["gather_ms"] + row["gemm_ms"] + row["scatter_ms"]
                print(f"  {label:<22} {row['pairs']:>9} {map_text} {row['fused_ms']:>9.1f} "
                      f"{row['fused_gflops']:>8.1f} | {row['gather_gb_per_s']:>11.1f} "
                      f"{row['gemm_gflops']:>12.1f} {row['scatter_gb_per_s']:>12.1f} "
                      f"{unfused:>10.1f}")
    if args.json:
        write_json(args.json, {"cpu": cpu_name(), "torch": torch.__version__,
                               "results": results}, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
