"""GPU benchmark of spconv_lite: the two networks of the performance issue, float32 and
float16, forward and forward + backward, on real LiDAR data.

Networks:
  second   SECOND / OpenPCDet VoxelBackBone8x (SubM 4->16, 16->16; strided 16->32, 2 x SubM 32;
           strided 32->64, 2 x SubM 64; strided 64->64 padding (0, 1, 1), 2 x SubM 64;
           (3, 1, 1) conv 64->128 stride (2, 1, 1); BatchNorm1d + ReLU after each conv, no
           bias) on KITTI object frame 000000 voxelized at 0.05 x 0.05 x 0.1 m over
           x 0..70.4, y -40..40, z -3..1 (mean of the points per voxel), grid [41, 1600, 1408].
  spconv   spconv's benchmark network (SubM 3->64, 64->64, then six stages of [max pool 2/2,
           SubM to 96 / 128 / 160 / 192 / 224 / 256, SubM at the same width]; no norm, no bias)
           on spconv_benchmark-pc.npz voxelized at 0.1 m over -80 -80 -2 80 80 6 (one point
           per voxel: its xyz), and on the same cloud with 7 copies shifted by +1..+7 m in y
           (913,903 voxels).

Voxelization of the networks' inputs is plain torch here (floor((p - low) / voxel) in float32,
unique), not the PointToVoxel op; the op itself is timed last, on the GPU against the CPU, on
the KITTI frame. Every call builds its kernel maps (a new SparseConvTensor per call), as in
inference. Each case runs --warmup times, then --repeats times with torch.cuda.synchronize()
around each call; the median, min, max and the peak memory are reported. With --algos, the
conv layers run with each CUDA algorithm (SPCONV_LITE_CUDA_CONV_ALGO) in turn.

Usage: python benchmarks/bench_cuda.py [--data DIR] [--json out.json] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import spconv_lite as sp
from spconv_lite.synthetic import voxelize_mean

REPO = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """shared/data/lidar beside the repository or inside it (the GPU machine's copy)."""
    for base in (REPO.parent / "shared", REPO / "shared"):
        if (base / "data" / "lidar").is_dir():
            return base / "data" / "lidar"
    return REPO.parent / "shared" / "data" / "lidar"


# ----------------------------------------------------------------------------- inputs

def kitti_input(data: Path, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    points = np.fromfile(data / "kitti_object_training_000000.bin", dtype=np.float32)
    points = points.reshape(-1, 4)
    features, coords, _ = voxelize_mean(points, [0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1])
    indices = torch.nn.functional.pad(torch.from_numpy(coords), (1, 0), value=0)
    # OpenPCDet's sparse shape: grid (z, y, x) + [1, 0, 0].
    return (torch.from_numpy(features).to(device), indices.int().contiguous().to(device),
            [41, 1600, 1408])


def voxelize_first_point(points: torch.Tensor, voxel: float, low, high):
    """(features = xyz of each voxel's first point, int32 (0, z, y, x) indices, zyx shape)."""
    low_t = torch.tensor(low, dtype=torch.float32)
    high_t = torch.tensor(high, dtype=torch.float32)
    size = torch.round((high_t - low_t) / voxel).long()
    cell = torch.floor((points - low_t) / torch.tensor(voxel, dtype=torch.float32)).long()
    inside = ((cell >= 0) & (cell < size)).all(1)
    points, cell = points[inside], cell[inside]
    key = (cell[:, 2] * size[1] + cell[:, 1]) * size[0] + cell[:, 0]
    unique, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((len(unique),), len(key), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(key)), "amin")
    zyx = cell[first].flip(1)
    indices = torch.cat([torch.zeros(len(first), 1, dtype=torch.long), zyx], 1).int()
    return points[first].contiguous(), indices.contiguous(), size.flip(0).tolist()


def spconv_input(data: Path, copies: int, device):
    cloud = torch.from_numpy(np.load(data / "spconv_benchmark-pc.npz")["pc"]).float()
    shifted = [cloud + torch.tensor([0.0, float(i), 0.0]) for i in range(copies)]
    features, indices, shape = voxelize_first_point(torch.cat(shifted), 0.1, [-80, -80, -2],
                                                    [80, 80, 6])
    return features.to(device), indices.to(device), shape


# ----------------------------------------------------------------------------- networks

def norm_act(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01), nn.ReLU()]


class VoxelBackBone8x(nn.Module):
    """OpenPCDet's SECOND backbone (layer pattern and indice keys), written for spconv_lite."""

    def __init__(self, in_channels: int = 4):
        super().__init__()

        def subm(c_in, c_out, key):
            return [sp.SubMConv3d(c_in, c_out, 3, padding=1, bias=False, indice_key=key),
                    *norm_act(c_out)]

        def down(c_in, c_out, key, padding=1):
            return [sp.SparseConv3d(c_in, c_out, 3, stride=2, padding=padding, bias=False,
                                    indice_key=key), *norm_act(c_out)]

        self.net = sp.SparseSequential(
            *subm(in_channels, 16, "subm1"), *subm(16, 16, "subm1"),
            *down(16, 32, "spconv2"), *subm(32, 32, "subm2"), *subm(32, 32, "subm2"),
            *down(32, 64, "spconv3"), *subm(64, 64, "subm3"), *subm(64, 64, "subm3"),
            *down(64, 64, "spconv4", (0, 1, 1)), *subm(64, 64, "subm4"), *subm(64, 64, "subm4"),
            sp.SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                            indice_key="spconv_down2"),
            *norm_act(128),
        )

    def forward(self, x):
        return self.net(x)


class SpconvBenchNet(nn.Module):
    """spconv's benchmark network: SubM pairs of growing width between 2/2 max pools."""

    def __init__(self):
        super().__init__()
        layers = [sp.SubMConv3d(3, 64, 3, bias=False, indice_key="c0"),
                  sp.SubMConv3d(64, 64, 3, bias=False, indice_key="c0")]
        width = 64
        for stage, out in enumerate((96, 128, 160, 192, 224, 256), start=1):
            layers += [sp.SparseMaxPool3d(2, 2),
                       sp.SubMConv3d(width, out, 3, bias=False, indice_key=f"c{stage}"),
                       sp.SubMConv3d(out, out, 3, bias=False, indice_key=f"c{stage}")]
            width = out
        self.net = sp.SparseSequential(*layers)

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------- timing

def time_call(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "max_ms": max(samples), "samples_ms": samples,
            "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20}


def time_cpu(fn, warmup: int, repeats: int) -> float:
    """Median ms of a CPU call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def make_case(net: nn.Module, features, indices, shape, backward: bool):
    def run():
        x = features.detach().requires_grad_(backward)
        out = net(sp.SparseConvTensor(x, indices, shape, 1))
        if backward:
            out.features.float().square().mean().backward()
        return out
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of the LiDAR files")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--algos", default="auto,fused,gemm",
                        help="comma-separated SPCONV_LITE_CUDA_CONV_ALGO values to time")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench_cuda.py needs a CUDA device")
    data = args.data or default_data_dir()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    torch.backends.cudnn.allow_tf32 = False

    inputs = {
        "kitti": kitti_input(data, device),
        "spconv_pc": spconv_input(data, 1, device),
        "spconv_pc_x8": spconv_input(data, 8, device),
    }
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "spconv_lite": sp.__version__,
        "data": str(data),
        "voxels": {name: int(v[1].shape[0]) for name, v in inputs.items()},
        "spatial_shape_zyx": {name: v[2] for name, v in inputs.items()},
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(f"{meta['gpu']} | torch {meta['torch']} (CUDA {meta['cuda']}) | python {meta['python']}")
    print("voxels:", meta["voxels"])

    torch.manual_seed(0)
    nets = {"second": VoxelBackBone8x().to(device).train(),
            "spconv": SpconvBenchNet().to(device).train()}
    plan = [  # (network, input, dtypes)
        ("second", "kitti", (torch.float32, torch.float16)),
        ("spconv", "spconv_pc", (torch.float32, torch.float16)),
        ("spconv", "spconv_pc_x8", (torch.float16,)),
    ]
    results = []
    algos = [a for a in args.algos.split(",") if a]
    header = (f"{'network':<8} {'input':<13} {'dtype':<8} {'pass':<8} {'algo':<6} "
              f"{'median ms':>10} {'min':>8} {'max':>8} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for net_name, input_name, dtypes in plan:
        features, indices, shape = inputs[input_name]
        for dtype in dtypes:
            net = nets[net_name].to(dtype)
            f = features.to(dtype)
            for backward in (False, True):
                for algo in algos:
                    os.environ["SPCONV_LITE_CUDA_CONV_ALGO"] = algo
                    run = make_case(net, f, indices, shape, backward)
                    if backward:
                        stats = time_call(run, args.warmup, args.repeats)
                    else:
                        with torch.no_grad():
                            stats = time_call(run, args.warmup, args.repeats)
                    net.zero_grad(set_to_none=True)
                    row = {"network": net_name, "input": input_name,
                           "dtype": str(dtype).replace("torch.", ""),
                           "pass": "fwd+bwd" if backward else "fwd", "algo": algo, **stats}
                    results.append(row)
                    print(f"{net_name:<8} {input_name:<13} {row['dtype']:<8} {row['pass']:<8} "
                          f"{algo:<6} {stats['median_ms']:>10.2f} {stats['min_ms']:>8.2f} "
                          f"{stats['max_ms']:>8.2f} {stats['peak_mem_mib']:>9.0f}", flush=True)
            nets[net_name].float()
    os.environ.pop("SPCONV_LITE_CUDA_CONV_ALGO", None)

    # Kernel maps alone (auto algorithm is irrelevant): the first SubM map and a strided map.
    for input_name, (_, indices, shape) in inputs.items():
        out = [(n + 2 - 2 - 1) // 2 + 1 for n in shape]
        for name, fn in (
            ("kmap subm k3", lambda i=indices, s=shape: sp.ops.build_subm_map(
                i, s, 1, [3] * 3, [1] * 3)),
            ("kmap conv k3s2", lambda i=indices, s=shape, o=out: sp.ops.build_conv_map(
                i, s, 1, o, [3] * 3, [2] * 3, [1] * 3, [1] * 3)),
        ):
            stats = time_call(fn, args.warmup, args.repeats)
            results.append({"network": name, "input": input_name, "dtype": "-", "pass": "-",
                            "algo": "-", **stats})
            print(f"{name:<22} {input_name:<13} {stats['median_ms']:>10.2f} ms")

    # Voxelization of the KITTI frame (PointToVoxel, OpenPCDet's KITTI settings): the points
    # already on the GPU, against the CPU op on the same points (results must be identical).
    points = np.fromfile(data / "kitti_object_training_000000.bin", dtype=np.float32)
    points = torch.from_numpy(points.reshape(-1, 4))
    config = ([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], 4, 40000, 5)
    voxelizers = {d: sp.PointToVoxel(*config, device=d) for d in ("cpu", "cuda")}
    clouds = {"cpu": points, "cuda": points.to(device)}
    for name, method in (("voxelize", "generate_voxel_with_id"),
                         ("voxelize_mean", "generate_voxel_mean")):
        calls = {d: (lambda d=d: getattr(voxelizers[d], method)(clouds[d])) for d in clouds}
        identical = all(torch.equal(a, b.cpu()) for a, b in zip(calls["cpu"](), calls["cuda"]()))
        stats = time_call(calls["cuda"], args.warmup, args.repeats)
        cpu_ms = time_cpu(calls["cpu"], args.warmup, args.repeats)
        results.append({"network": name, "input": "kitti", "dtype": "float32", "pass": "-",
                        "algo": "-", "cpu_median_ms": cpu_ms, "identical_to_cpu": identical,
                        **stats})
        print(f"{name:<22} {'kitti':<13} {stats['median_ms']:>10.2f} ms (CPU {cpu_ms:.2f} ms, "
              f"{torch.get_num_threads()} threads; identical: {identical})")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
