"""Side-by-side GPU benchmark: spconv_lite against spconv 2.3.8 (its CUDA kernels) and
spconv-Triton 1.0.0, in one process, on the same inputs and the same weights.

Networks (one definition, built with each library's layers; one state_dict loaded into all):
  second   OpenPCDet's VoxelBackBone8x (spconv_lite.models.VoxelBackBone8x) on KITTI object frame
           000000 voxelized at 0.05 x 0.05 x 0.1 m over x 0..70.4, y -40..40, z -3..1 (mean of
           the points per voxel), grid (z, y, x) [41, 1600, 1408].
  spconv   spconv's benchmark network (bench_networks.spconv_benchmark_net: SubM 3->64,
           64->64, then six stages of [max pool 2/2, SubM to 96 .. 256, SubM]) on
           spconv_benchmark-pc.npz voxelized at 0.1 m over -80 -80 -2 80 80 6 (xyz of each
           voxel's first point), and on that cloud with 7 copies shifted by +1 .. +7 m in y
           (913,903 voxels).

Cases: float32 (TF32 off) and float16; "fwd" (eval mode, no_grad, kernel maps built in every
call as in inference) and "train" (train mode: forward, loss, backward). Each library's call
runs once first (its output kept for the comparison), then --warmup times, then --repeats
times alternating the libraries call by call, each call between two device synchronisations; a
library that fails in any of these calls is dropped from the case with its error and the others
go on, and a case that fails as a whole is recorded with its error before the next one.
Reported: the median and quartiles of the wall time, the ratio other / spconv_lite of the
medians (> 1: spconv_lite is faster), the peak GPU memory of one call (growth of torch's peak
allocated memory), the useful TFLOP/s (2 x pairs x C_in x C_out summed over the conv layers,
over the median), and the outputs compared by site with spconv's (same sites; max |difference|
/ max |value|), the weight gradients of the training step by parameter.

Ceilings: before the cases, the device's two limits measured on it (datasheet rates are
leads): the bandwidth of a large device-to-device copy (bytes read + written over the median)
and the rate of a large torch.mm (cuBLAS) per dtype, float32 with TF32 off, on random data. The
useful TFLOP/s of every case and layer is reported against the measured matmul rate beside the
datasheet peak.

Kernel maps: every map a library builds during one forward is recorded (its map-building
function wrapped) and replayed alone, all of them and each map type: the time per forward and
its share of the forward. PointToVoxel: the KITTI frame on the device, each library's
voxelizer, and whether the voxels agree with spconv_lite's.

The JSON is rewritten after every case, so a run stopped by a time limit keeps what it
measured (a SIGINT marks it: meta.interrupted names the step that was running); --budget-s
skips the cases that would start after that many seconds. --device cpu runs every step on the
CPU (no peak memory; spconv's GPU-only map builder is an error there): a dry run of this
script, not a measurement. --quick crops each input to a few thousand voxels
and runs each case a few times.

spconv-Triton autotunes each kernel over its whole config list (37 for its gather-GEMM) on
the first call of every new shape, compiling each config: minutes per network on a GPU with an
empty cache. --triton-configs N keeps N configs per kernel (meta.triton_autotune; the results
page says so); scripts/gpu_check.sh measures spconv-Triton so in a stage of its own, last.

Usage (from the repository root):
    python benchmarks/bench_cuda.py [--data DIR] [--libs spconv_lite,spconv,spconv_triton]
        [--repeats 10] [--warmup 3] [--json out.json] [--device cuda] [--quick] [--budget-s S]
        [--triton-configs N]
    python benchmarks/bench_cuda.py --write-results out.json [--results-dir benchmarks/results]
        (writes DATE-GPU-KIND.json and .md from a run's JSON, for the repository; KIND is
        bench, variants or triton, after the stage of scripts/gpu_check.sh that made it)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import inspect
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, bench_networks when imported
from arguments import non_negative_int, positive_int  # noqa: E402
from bench_networks import spconv_benchmark_net  # noqa: E402
from common import one_line, time_alternating  # noqa: E402
from results_file import check_results_path, write_json  # noqa: E402

import spconv_lite  # noqa: E402
from spconv_lite.models import VoxelBackBone8x  # noqa: E402
from spconv_lite.synthetic import voxelize_mean  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("spconv_lite", "spconv", "spconv_triton")
BASELINE = "spconv_lite"  # ratios are other / spconv_lite
REFERENCE = "spconv"  # outputs are compared with this library's
QUICK_SITES = 3000


def default_data_dir() -> Path:
    """$SPCONV_LITE_DATA, else shared/data/lidar beside the repository, inside it, or the GPU
    run's copy in .gpu/lidar."""
    if os.environ.get("SPCONV_LITE_DATA"):
        return Path(os.environ["SPCONV_LITE_DATA"])
    for candidate in (REPO.parent / "shared" / "data" / "lidar",
                      REPO / "shared" / "data" / "lidar", REPO / ".gpu" / "lidar"):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "data" / "lidar"


# ----------------------------------------------------------------------------- libraries

@dataclass
class Library:
    """One implementation: its spconv.pytorch-like namespace (layers, SparseConvTensor), its
    PointToVoxel, and the module whose functions build its kernel maps. ``variants``: for
    spconv_lite run with SPCONV_LITE_CUDA_VARIANTS set to it (None: the environment's)."""

    name: str
    version: str
    ns: ModuleType
    point_to_voxel: type
    map_module: ModuleType
    map_functions: tuple[str, ...]
    variants: str | None = None
    autotune: dict[str, str] | None = None  # spconv-Triton's cut autotune lists, see below


VARIANTS_VARIABLE = "SPCONV_LITE_CUDA_VARIANTS"
ALGO_VARIABLE = "SPCONV_LITE_CUDA_CONV_ALGO"
# The sweep of --variants default: row orders of 1, 2 and 3 splits, the pipelined tiles alone
# and with row orders (for float32 they also take the wide layers' forward and input gradient off
# the per-offset GEMMs), the compacted weight gradient (float32: also the wide layers' weight
# gradient), the default fused kernels everywhere with row orders and the compacted weight
# gradient (float32's wide layers otherwise take the per-offset GEMMs, which the row orders do
# not change), and everything together (with the radix map sort, whose own effect the maps'
# table shows).
DEFAULT_SWEEP = ("rows=1;rows=2;rows=3;tiles=pipelined;rows=2,tiles=pipelined;wgrad=compact;"
                 "algo=fused,rows=3,wgrad=compact;"
                 "rows=3,tiles=pipelined,wgrad=compact,mapsort=radix")


@contextlib.contextmanager
def variants_env(value: str | None):
    """SPCONV_LITE_CUDA_VARIANTS set to ``value`` inside the block (None: the environment left
    as it is); an entry ``algo=A`` of it sets SPCONV_LITE_CUDA_CONV_ALGO=A instead (default:
    auto)."""
    if value is None:
        yield
        return
    items = [item.strip() for item in value.split(",") if item.strip()]
    algo = [item.partition("=")[2] for item in items if item.startswith("algo=")]
    settings = {VARIANTS_VARIABLE: ",".join(i for i in items if not i.startswith("algo=")),
                ALGO_VARIABLE: algo[-1] if algo else "auto"}
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, old in before.items():
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old


def variant_libraries(base: Library, sweep: str) -> dict[str, Library]:
    """spconv_lite once more per entry of ``sweep`` (';'-separated values of
    SPCONV_LITE_CUDA_VARIANTS, see variants_env), named ``spconv_lite[VALUE]``; the base runs
    with the variable empty and the auto algorithm, so that it is the default kernels whatever
    the caller's environment."""
    base.variants = ""
    return {f"{base.name}[{value}]": dataclasses.replace(base, name=f"{base.name}[{value}]",
                                                         variants=value)
            for value in (v.strip() for v in sweep.split(";")) if value}


def cut_triton_autotune(per_kernel: int) -> dict[str, str]:
    """Cuts every autotuned kernel of spconv-Triton (imported) to ``per_kernel`` configs, evenly
    spread over its list; returns "kept of total" per kernel. Its full lists (37 configs for the
    gather-GEMM, 21 for the weight gradient, 8-11 for the others, per autotune key) are compiled
    one after another on first use, 0.4-2.3 s each on sm_90: minutes per network on an empty
    cache, more than a time-boxed GPU run has. What is measured then is spconv-Triton with
    fewer choices, which the results say."""
    from triton.runtime.autotuner import Autotuner

    cut, seen = {}, set()  # a kernel imported into several modules is cut once
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith("spconv_triton") or module is None:
            continue
        for name, kernel in vars(module).items():
            if isinstance(kernel, Autotuner) and id(kernel) not in seen:
                seen.add(id(kernel))
                total = len(kernel.configs)
                keep = min(per_kernel, total)
                kernel.configs = [kernel.configs[i * total // keep] for i in range(keep)]
                cut[name if name not in cut else f"{module_name}.{name}"] = f"{keep} of {total}"
    return cut


def load_library(name: str, triton_configs: int | None = None) -> Library:
    """``triton_configs``: for spconv_triton, the configs kept per autotuned kernel (None: its
    full lists)."""
    # spconv prints its own messages on import.
    with contextlib.redirect_stdout(io.StringIO()):
        if name == "spconv_lite":
            import spconv_lite.pytorch as ns
            from spconv_lite import ops

            # The row orders (variant rows=N) belong to the maps, as spconv's mask sorts do.
            return Library(name, spconv_lite.__version__, ns, spconv_lite.PointToVoxel, ops,
                           ("build_subm_map", "build_conv_map", "conv_row_order"))
        if name == "spconv":
            import spconv
            import spconv.pytorch as ns
            from spconv.pytorch.utils import PointToVoxel
        elif name == "spconv_triton":
            import spconv_triton as spconv
            import spconv_triton.pytorch as ns
            from spconv_triton.pytorch.utils import PointToVoxel
        else:
            raise ValueError(f"unknown library {name!r}, choose from {LIBRARIES}")
    autotune = (cut_triton_autotune(triton_configs)
                if name == "spconv_triton" and triton_configs is not None else None)
    return Library(name, spconv.__version__, ns, PointToVoxel, ns.ops,
                   ("get_indice_pairs", "get_indice_pairs_implicit_gemm"), autotune=autotune)


def load_libraries(names: list[str], triton_configs: int | None = None
                   ) -> tuple[dict[str, Library], dict[str, str]]:
    """The libraries that import, and for the others the reason (a reported skip)."""
    libs, skipped = {}, {}
    for name in names:
        try:
            libs[name] = load_library(name, triton_configs)
        except Exception as exc:  # noqa: BLE001  (any import failure: that library is skipped)
            skipped[name] = one_line(exc)
    return libs, skipped


# ----------------------------------------------------------------------------- inputs

@dataclass
class Input:
    name: str
    features: torch.Tensor  # float32 [N, C]
    indices: torch.Tensor  # int32 [N, 4], batch 0
    shape: list[int]  # (z, y, x)


def kitti_input(data: Path) -> Input:
    points = np.fromfile(data / "kitti_object_training_000000.bin", dtype=np.float32)
    features, coords, _ = voxelize_mean(points.reshape(-1, 4), [0.05, 0.05, 0.1],
                                        [0, -40, -3, 70.4, 40, 1])
    indices = torch.nn.functional.pad(torch.from_numpy(coords), (1, 0), value=0).int()
    # OpenPCDet's sparse shape: grid (z, y, x) + [1, 0, 0].
    return Input("kitti", torch.from_numpy(features), indices.contiguous(), [41, 1600, 1408])


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


def spconv_input(data: Path, copies: int) -> Input:
    cloud = torch.from_numpy(np.load(data / "spconv_benchmark-pc.npz")["pc"]).float()
    shifted = [cloud + torch.tensor([0.0, float(i), 0.0]) for i in range(copies)]
    features, indices, shape = voxelize_first_point(torch.cat(shifted), 0.1, [-80, -80, -2],
                                                    [80, 80, 6])
    return Input("spconv_pc" if copies == 1 else f"spconv_pc_x{copies}", features, indices,
                 shape)


def site_keys(indices: torch.Tensor, shape) -> torch.Tensor:
    """int64 key of each site, increasing with (batch, z, y, x)."""
    idx = indices.long()
    key = idx[:, 0]
    for d, size in enumerate(shape):
        key = key * int(size) + idx[:, d + 1]
    return key


def crop(inp: Input, sites: int) -> Input:
    """The first ``sites`` sites in (batch, z, y, x) order: a slab of the frame that keeps its
    neighbourhoods (the --quick inputs)."""
    keep = torch.argsort(site_keys(inp.indices, inp.shape))[:sites]
    return Input(inp.name, inp.features[keep].contiguous(), inp.indices[keep].contiguous(),
                 inp.shape)


def load_inputs(data: Path, quick: bool, names=("kitti", "spconv_pc", "spconv_pc_x8")
                ) -> dict[str, Input]:
    """The inputs named (voxelizing the 8x cloud alone takes seconds)."""
    for name in ("kitti_object_training_000000.bin", "spconv_benchmark-pc.npz"):
        if not (data / name).is_file():
            raise SystemExit(f"error: {data / name} not found (pass --data DIR, the folder of "
                             "the LiDAR frames)")
    makers = {"kitti": lambda: kitti_input(data), "spconv_pc": lambda: spconv_input(data, 1),
              "spconv_pc_x8": lambda: spconv_input(data, 8)}
    inputs = [make() for name, make in makers.items() if name in names]
    if quick:
        inputs = [crop(inp, QUICK_SITES) for inp in inputs]
    return {inp.name: inp for inp in inputs}


# ----------------------------------------------------------------------------- networks

NETWORKS: dict[str, Callable[[ModuleType], torch.nn.Module]] = {
    "second": lambda ns: VoxelBackBone8x(4, [1408, 1600, 40], spconv=ns),
    "spconv": spconv_benchmark_net,
}
# (network, input) in the order they run (the x8 cloud last: it takes the longest).
PLAN = [("second", "kitti"), ("spconv", "spconv_pc"), ("spconv", "spconv_pc_x8")]


def sparse_output(out):
    """The sparse tensor of a network's output (VoxelBackBone8x returns a dict)."""
    return out["encoded_spconv_tensor"] if isinstance(out, dict) else out


def build_networks(network: str, libs: dict[str, Library], state: dict, device, dtype,
                   train: bool) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """The network built with each library's layers, all with the weights and buffers of
    ``state``, on ``device`` in ``dtype``; and the errors of the libraries where that failed."""
    nets, errors = {}, {}
    for name, lib in libs.items():
        try:
            net = NETWORKS[network](lib.ns)
            net.load_state_dict(state)
            nets[name] = net.to(device=device, dtype=dtype).train(train)
        except Exception as exc:  # noqa: BLE001  (reported as that library's error)
            errors[name] = one_line(exc)
    return nets, errors


def network_call(lib: Library, net: torch.nn.Module, inp: Input, dtype, train: bool):
    """One call of the case: forward (no_grad) or a training step (forward, loss, backward).
    ``call(keep_grads=True)`` also returns the weight gradients."""
    features = inp.features.to(dtype)

    def call(keep_grads: bool = False):
        x = lib.ns.SparseConvTensor(features, inp.indices, inp.shape, 1)
        with variants_env(lib.variants):
            if not train:
                with torch.no_grad():
                    return sparse_output(net(x)), None
            out = sparse_output(net(x))
            out.features.float().square().mean().backward()
        grads = ({n: p.grad.detach().float().clone() for n, p in net.named_parameters()
                  if p.grad is not None} if keep_grads else None)
        net.zero_grad(set_to_none=True)
        return out, grads

    return call


def useful_gflop(net: torch.nn.Module, inp: Input) -> float | None:
    """2 x pairs x C_in x C_out summed over the conv layers of one forward (spconv_lite's
    network: every conv layer has an indice_key, whose map gives the pairs)."""
    flop = []

    def hook(module, args, out):
        kmap = out.indice_dict.get(module.indice_key) if module.indice_key else None
        if kmap is None:
            flop.append(None)
            return
        pairs = int(kmap.nbr.ge(0).sum())  # as many as in nbr_t (an inverse conv's table)
        flop.append(2.0 * pairs * module.in_channels * module.out_channels)

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, spconv_lite.SparseConvolution)]
    try:
        with torch.no_grad():
            net(spconv_lite.SparseConvTensor(inp.features.to(next(net.parameters()).dtype),
                                             inp.indices, inp.shape, 1))
    finally:
        for handle in handles:
            handle.remove()
    return None if not flop or None in flop else sum(flop) / 1e9


# ----------------------------------------------------------------------------- measuring

def make_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def peak_memory_mib(fn: Callable, device: torch.device) -> float | None:
    """Growth of torch's peak allocated device memory during one call (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64; nan when either holds a non-finite value."""
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def compare_by_site(out, ref) -> dict:
    """Whether two sparse tensors have the same sites and, if so, the max relative difference of
    their features at each site (their row orders may differ)."""
    shape, ref_shape = ([int(s) for s in t.spatial_shape] for t in (out, ref))
    a = torch.argsort(site_keys(out.indices, shape))
    b = torch.argsort(site_keys(ref.indices, ref_shape))
    same = (shape == ref_shape and len(a) == len(b)
            and torch.equal(out.indices[a].cpu().int(), ref.indices[b].cpu().int()))
    result = {"sites": len(a), "ref_sites": len(b), "same_sites": bool(same)}
    if same:
        result["max_rel_err"] = relative_error(out.features[a].float(), ref.features[b].float())
    return result


def compare_grads(grads: dict, ref: dict) -> dict:
    """Max relative difference of the weight gradients, over the parameters both have."""
    errors = {name: relative_error(g, ref[name]) for name, g in grads.items()
              if name in ref and g.shape == ref[name].shape}
    if not errors:
        return {"params": 0}
    worst = max(errors, key=lambda n: (errors[n] != errors[n], errors[n]))  # nan first
    return {"params": len(errors), "max_rel_err": errors[worst], "worst_param": worst}


def run_alternating(calls: dict[str, Callable], warmup: int, repeats: int,
                    sync: Callable[[], None]) -> tuple[dict, dict, dict]:
    """(first outputs, timing statistics, errors) per library: each call runs once, then all
    are timed alternately; a failure, in the first call or later (out of memory, say), drops
    that library with its error and the others go on."""
    outputs, errors = {}, {}
    for name, call in calls.items():
        try:
            outputs[name] = call(keep_grads=True)
            sync()
        except Exception as exc:  # noqa: BLE001  (a library's failure is reported, not fatal)
            errors[name] = one_line(exc)
    working = {name: calls[name] for name in outputs}
    timings = time_alternating(working, warmup, repeats, sync, errors) if working else {}
    return outputs, timings, errors


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """other / spconv_lite of the medians (> 1: spconv_lite is faster)."""
    base = medians.get(BASELINE)
    return {f"{name}/{BASELINE}": ms / base for name, ms in medians.items()
            if name != BASELINE and base}


# ----------------------------------------------------------------------------- kernel maps

def format_dims(values) -> str:
    values = [int(v) for v in values]
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def map_type(arguments: dict) -> str:
    """A readable map type from a map builder's arguments (ours or spconv's names)."""
    if "splits" in arguments:  # spconv_lite's conv_row_order
        return f"row order s{arguments['splits']}"
    kernel = arguments.get("kernel_size", arguments.get("ksize"))
    if kernel is None:
        return "unknown"
    subm = arguments.get("subm", False)
    if "dilation" in arguments and "stride" not in arguments:  # build_subm_map
        subm = True
    if subm:
        return f"subm k{format_dims(kernel)}"
    kind = "transposed" if arguments.get("transposed", arguments.get("transpose")) else "regular"
    return f"{kind} k{format_dims(kernel)} s{format_dims(arguments['stride'])}"


@dataclass
class MapCall:
    kind: str
    replay: Callable


@contextlib.contextmanager
def recording_maps(lib: Library):
    """Records every kernel map ``lib`` builds inside the block (list of MapCall, in order)."""
    calls: list[MapCall] = []
    originals = {name: getattr(lib.map_module, name) for name in lib.map_functions
                 if hasattr(lib.map_module, name)}

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError:
                arguments = {}
            calls.append(MapCall(map_type(arguments), functools.partial(fn, *args, **kwargs)))
            return fn(*args, **kwargs)

        return recorded

    try:
        for name, fn in originals.items():
            setattr(lib.map_module, name, wrap(fn))
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(lib.map_module, name, fn)


def replay(calls: list[MapCall], variants: str | None = None) -> Callable:
    def run(keep_grads: bool = False):
        with variants_env(variants):
            for call in calls:
                call.replay()
    return run


def bench_maps(libs: dict[str, Library], network: str, state: dict, inp: Input, device, args,
               sync) -> dict:
    """The maps of one float32 forward per library: recorded, then replayed alone (all of them,
    and each map type), alternating the libraries."""
    nets, errors = build_networks(network, libs, state, device, torch.float32, False)
    recorded = {}
    for name, lib in ((name, libs[name]) for name in nets):
        try:
            with recording_maps(lib) as calls, torch.no_grad(), variants_env(lib.variants):
                nets[name](lib.ns.SparseConvTensor(inp.features, inp.indices, inp.shape, 1))
            sync()
            recorded[name] = calls
        except Exception as exc:  # noqa: BLE001
            errors[name] = one_line(exc)
    result = {"libs": {name: {"maps": len(calls)} for name, calls in recorded.items()},
              "errors": errors}
    _, timings, replay_errors = run_alternating(
        {name: replay(calls, libs[name].variants) for name, calls in recorded.items()},
        args.warmup, args.repeats, sync)
    errors.update(replay_errors)
    for name, st in timings.items():
        result["libs"][name]["total_median_ms"] = st["median_ms"]
    kinds = sorted({c.kind for calls in recorded.values() for c in calls})
    result["by_type"] = {}
    for kind in kinds:
        groups = {name: replay([c for c in calls if c.kind == kind], libs[name].variants)
                  for name, calls in recorded.items() if name not in replay_errors}
        counts = {name: sum(c.kind == kind for c in recorded[name]) for name in groups}
        _, timings, _ = run_alternating(groups, args.warmup, args.repeats, sync)
        result["by_type"][kind] = {name: {"maps": counts[name], "median_ms": st["median_ms"]}
                                   for name, st in timings.items()}
    return result


# ----------------------------------------------------------------------------- voxelization

VOXEL_CONFIG = ([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], 4, 40000, 5)  # OpenPCDet KITTI


def same_voxels(out, ref) -> dict:
    """Whether two voxelizations hold the same voxels (coordinates), the same point counts and
    the same point slots, whatever their order, and whether they are bitwise identical."""
    voxels, coords, counts = (t.cpu() for t in out[:3])
    ref_voxels, ref_coords, ref_counts = (t.cpu() for t in ref[:3])
    identical = all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(out, ref))
    if coords.shape != ref_coords.shape:
        return {"voxels": len(coords), "ref_voxels": len(ref_coords), "same_voxels": False,
                "identical": identical}
    shape = [int(c) + 1 for c in torch.cat([coords, ref_coords]).amax(0)]
    a = torch.argsort(site_keys(torch.nn.functional.pad(coords, (1, 0)), shape))
    b = torch.argsort(site_keys(torch.nn.functional.pad(ref_coords, (1, 0)), shape))
    return {"voxels": len(coords), "ref_voxels": len(ref_coords),
            "same_voxels": bool(torch.equal(coords[a], ref_coords[b])),
            "same_counts": bool(torch.equal(counts[a], ref_counts[b])),
            "same_points": bool(torch.equal(voxels[a], ref_voxels[b])),
            "identical": identical}


def bench_voxelize(libs: dict[str, Library], data: Path, device, args, sync) -> dict:
    points = np.fromfile(data / "kitti_object_training_000000.bin", dtype=np.float32)
    points = torch.from_numpy(points.reshape(-1, 4)).to(device)
    calls, errors = {}, {}
    for name, lib in libs.items():
        try:
            voxelizer = lib.point_to_voxel(*VOXEL_CONFIG, device=device)
            calls[name] = (lambda v=voxelizer, keep_grads=False: v.generate_voxel_with_id(points))
        except Exception as exc:  # noqa: BLE001
            errors[name] = one_line(exc)
    outputs, timings, run_errors = run_alternating(calls, args.warmup, args.repeats, sync)
    errors.update(run_errors)
    medians = {name: st["median_ms"] for name, st in timings.items()}
    result = {"points": len(points), "libs": timings,
              "ratios": ratios(medians), "errors": errors, "compare": {}}
    if BASELINE in outputs:
        for name, out in outputs.items():
            if name != BASELINE:
                result["compare"][name] = same_voxels(out, outputs[BASELINE])
    return result


# ----------------------------------------------------------------------------- per layer

# Datasheet peaks of the H100 / H200 SXM (leads: ../.library/device KINDS.md measured 788 TFLOP/s
# for a large bf16 matmul on this H200): dense float16 / bfloat16 on the tensor cores, float32
# without TF32 (SIMT), which is what the fused kernels use.
PEAK_TFLOPS = {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0}
TILE_ROWS = (64, 128)  # the default WMMA tiles' rows, the pipelined tiles'


@dataclass
class ConvLayer:
    """One conv layer of a forward: what its op gets."""

    index: int
    kind: str
    features: torch.Tensor  # [N_in, C_in]
    weight: torch.Tensor  # [K, C_in, C_out]
    nbr: torch.Tensor
    nbr_t: torch.Tensor

    @property
    def pairs(self) -> int:
        return int(self.nbr.ge(0).sum())


def conv_layers(network: str, inp: Input, device, dtype) -> list[ConvLayer]:
    """Every conv layer of one eval forward of spconv_lite's network (seed-0 weights), with its
    input features, weight and tables, as a forward hook sees them."""
    lib = load_library(BASELINE)
    torch.manual_seed(0)
    net = NETWORKS[network](lib.ns).to(device=device, dtype=dtype).eval()
    layers: list[ConvLayer] = []

    def hook(module, args, out):
        kmap = out.indice_dict.get(module.indice_key) if module.indice_key else None
        if kmap is None:
            return
        nbr, nbr_t = (kmap.nbr_t, kmap.nbr) if module.inverse else (kmap.nbr, kmap.nbr_t)
        kind = ("subm" if module.subm else "inverse" if module.inverse else "conv") + \
            f" k{format_dims(module.kernel_size)}"
        layers.append(ConvLayer(len(layers), kind, args[0].features.detach(),
                                module.kernel_weight().detach().contiguous(), nbr, nbr_t))

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, spconv_lite.SparseConvolution)]
    try:
        with torch.no_grad(), variants_env(""):
            net(lib.ns.SparseConvTensor(inp.features.to(dtype), inp.indices, inp.shape, 1))
    finally:
        for handle in handles:
            handle.remove()
    return layers


def tile_use(nbr: torch.Tensor, order: torch.Tensor | None, splits: int, rows: int) -> float:
    """Useful share of a fused kernel's multiplications: pairs over (tile, offset) steps x tile
    rows, for tiles of ``rows`` rows that skip the offsets none of their rows has, the rows in
    ``order`` (one per split of the offsets) or in row order."""
    valid = nbr.ge(0)
    count, volume = valid.shape
    if count == 0 or volume == 0:
        return 1.0
    splits = max(splits, 1)
    steps = 0
    for s in range(splits):
        part = valid[:, s * volume // splits:(s + 1) * volume // splits]
        if order is not None:
            part = part[order[s].long()]
        part = torch.nn.functional.pad(part, (0, 0, 0, (-count) % rows))
        steps += int(part.view(-1, rows, part.shape[1]).any(1).sum())
    return int(valid.sum()) / max(steps * rows, 1)


def time_gpu_ms(fn: Callable, warmup: int, repeats: int, cuda: bool) -> float:
    """Median of ``repeats`` calls, each timed with CUDA events (the host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return float(np.median(samples))


def measure_ceilings(device, dtypes, args) -> dict:
    """The device's copy bandwidth (GB/s: bytes read + written over the median of a large
    device-to-device copy) and matrix-product rate per dtype (TFLOP/s of a large square
    torch.mm; float32 with TF32 off, as every case runs), on random data: zeros can run faster
    than real data. Sizes that fill an H200 (1 GiB, 8192^2), small ones for a dry run."""
    cuda = device.type == "cuda"
    full = cuda and not args.quick
    gen = torch.Generator(device=device).manual_seed(0)

    def median_ms(operands: tuple, fn: Callable) -> float:
        return time_gpu_ms(lambda: fn(*operands), args.warmup + 1, args.repeats, cuda)

    copy_bytes = (1 << 30) if full else (1 << 24)
    source = torch.randn(copy_bytes // 4, generator=gen, device=device)
    copy_ms = median_ms((torch.empty_like(source), source), torch.Tensor.copy_)
    del source
    size = 8192 if full else 256
    ceilings = {"copy_gb_per_s": 2 * copy_bytes / copy_ms / 1e6, "copy_bytes": copy_bytes,
                "mm_size": size, "mm_tflops": {}}
    for dtype in dtypes:
        operands = tuple(torch.randn(size, size, generator=gen, device=device).to(dtype)
                         for _ in range(2))
        mm_ms = median_ms(operands, torch.mm)
        ceilings["mm_tflops"][str(dtype).replace("torch.", "")] = 2 * size**3 / mm_ms / 1e9
    return ceilings


def ceilings_line(ceilings: dict) -> str:
    """The measured ceilings in one line, e.g. "measured ceilings: copy 3900 GB/s; torch.mm
    8192^2 float32 51.2, float16 760.3 TFLOP/s"."""
    if "error" in ceilings:
        return f"measured ceilings: error: {ceilings['error']}"
    rates = ", ".join(f"{d} {v:.1f}" for d, v in ceilings["mm_tflops"].items())
    return (f"measured ceilings: copy {ceilings['copy_gb_per_s']:.0f} GB/s; torch.mm "
            f"{ceilings['mm_size']}^2 {rates} TFLOP/s")


def peak_note(dtype: str, tflops: float, ceilings: dict | None) -> str:
    """``tflops`` as shares of the datasheet peak and of the measured matmul rate, e.g.
    "(12% of peak, 15% of torch.mm)"."""
    shares = []
    if PEAK_TFLOPS.get(dtype):
        shares.append(f"{tflops / PEAK_TFLOPS[dtype]:.0%} of peak")
    measured = (ceilings or {}).get("mm_tflops", {}).get(dtype)
    if measured:
        shares.append(f"{tflops / measured:.0%} of torch.mm")
    return f" ({', '.join(shares)})" if shares else ""


def layer_splits(layer: ConvLayer) -> int:
    """The row-order splits a layer's conv gets under the current variants (as
    kernel_map.row_orders decides for a map)."""
    volume = layer.nbr.shape[1]
    return min(spconv_lite.kernel_map.rows_variant(), volume) if volume > 1 else 0


def layer_calls(layer: ConvLayer, grad: torch.Tensor) -> tuple[dict, int, torch.Tensor | None]:
    """The layer's forward, input gradient and weight gradient as the ops run them under the
    current variants (row orders built here, as the layers build them with the map), the
    splits and nbr's row order."""
    ops_ = torch.ops.spconv_lite
    x, w, nbr, nbr_t = layer.features, layer.weight, layer.nbr, layer.nbr_t
    splits = layer_splits(layer)
    order = ops_.conv_row_order(nbr, splits) if splits else None
    order_t = ops_.conv_row_order(nbr_t, splits) if splits else None
    calls = {
        "fwd": lambda: ops_.sparse_conv(x, w, nbr, nbr_t, order, order_t),
        "dgrad": lambda: ops_.sparse_conv(grad, w.transpose(1, 2), nbr_t, nbr, order_t, order),
        "wgrad": lambda: ops_.sparse_conv_weight_grad(x, grad, nbr),
    }
    return calls, splits, order


def layer_grad(layer: ConvLayer) -> torch.Tensor:
    """A seeded upstream gradient for the layer's output."""
    x = layer.features
    gen = torch.Generator(device=x.device).manual_seed(layer.index)
    return torch.randn(layer.nbr.shape[0], layer.weight.shape[2], generator=gen,
                       device=x.device, dtype=x.dtype)


def profile_layer(spec: str, inputs: dict[str, Input], sweep: list[str], device) -> None:
    """Runs one layer's forward, input gradient and weight gradient once with the default
    kernels and once per variant, each in an NVTX range named after it: the program that
    scripts/gpu_check.sh's stage "profile" runs under ncu. spec: NETWORK:INPUT:LAYER:DTYPE."""
    network, input_name, index, dtype = spec.split(":")
    layer = conv_layers(network, inputs[input_name], device, getattr(torch, dtype))[int(index)]
    grad = layer_grad(layer)
    print(f"profiling layer {index} of {network} on {input_name} ({layer.kind}, "
          f"{layer.weight.shape[1]}->{layer.weight.shape[2]}, {layer.pairs:,} pairs, {dtype})")
    for value in ["", *sweep]:
        with variants_env(value):
            calls, _, _ = layer_calls(layer, grad)
            for op, fn in calls.items():
                name = f"{value or 'default'} {op}"
                if device.type == "cuda":
                    torch.cuda.nvtx.range_push(name)
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.nvtx.range_pop()
                print(f"  ran {name}", flush=True)


def bench_layer(layer: ConvLayer, sweep: list[str], args) -> dict:
    """Forward, input gradient and weight gradient of one layer with the default kernels and
    each variant of the sweep (ms and useful TFLOP/s), the row orders' build time, and the
    share of useful multiplications in the tiles."""
    ops_ = torch.ops.spconv_lite
    x, w, nbr, nbr_t = layer.features, layer.weight, layer.nbr, layer.nbr_t
    grad = layer_grad(layer)
    pairs = layer.pairs
    flop = 2.0 * pairs * w.shape[1] * w.shape[2]
    row = {"layer": layer.index, "kind": layer.kind, "c_in": int(w.shape[1]),
           "c_out": int(w.shape[2]), "rows_in": int(x.shape[0]), "rows_out": int(nbr.shape[0]),
           "pairs": pairs, "gflop": flop / 1e9, "tile_use": {}, "variants": {}}
    for rows in TILE_ROWS:
        row["tile_use"][f"{rows} rows"] = tile_use(nbr, None, 0, rows)
    for value in ["", *sweep]:
        entry = {}
        with variants_env(value):
            calls, splits, order = layer_calls(layer, grad)
            if splits:
                entry["order_ms"] = time_gpu_ms(
                    lambda: (ops_.conv_row_order(nbr, splits), ops_.conv_row_order(nbr_t, splits)),
                    args.warmup, args.repeats, x.is_cuda)
                for rows in TILE_ROWS:
                    row["tile_use"][f"{rows} rows, {splits} splits"] = tile_use(nbr, order,
                                                                                splits, rows)
            for op, fn in calls.items():
                try:
                    ms = time_gpu_ms(fn, args.warmup, args.repeats, x.is_cuda)
                    entry[f"{op}_ms"] = ms
                    entry[f"{op}_tflops"] = flop / ms / 1e9
                except Exception as exc:  # noqa: BLE001  (a failing variant is reported)
                    entry[f"{op}_error"] = one_line(exc)
        row["variants"][value or "default"] = entry
    return row


def print_layer(row: dict, dtype: str, ceilings: dict | None = None) -> None:
    default = row["variants"]["default"]
    use = ", ".join(f"{k} {v:.2f}" for k, v in row["tile_use"].items())
    text = (f"  L{row['layer']:<2} {row['kind']:<12} {row['c_in']:>3}->{row['c_out']:<3} "
            f"{row['pairs'] / 1e6:6.2f}M pairs | tile use {use}")
    for op in ("fwd", "dgrad", "wgrad"):
        if f"{op}_ms" not in default:
            text += f"\n      {op}: default ERROR {default.get(op + '_error')}"
            continue
        best = min(((name, e[f"{op}_ms"]) for name, e in row["variants"].items()
                    if f"{op}_ms" in e), key=lambda item: item[1])
        share = peak_note(dtype, default[f"{op}_tflops"], ceilings)
        text += (f"\n      {op}: default {default[f'{op}_ms']:.3f} ms "
                 f"{default[f'{op}_tflops']:.1f} TFLOP/s{share}; best {best[0]} {best[1]:.3f} ms "
                 f"({default[f'{op}_ms'] / best[1]:.2f}x)")
        errors = [name for name, e in row["variants"].items() if f"{op}_error" in e]
        if errors:
            text += f"; ERRORS in {errors}"
    print(text, flush=True)


def bench_layers(network: str, inp: Input, dtype, sweep: list[str], device, args,
                 ceilings: dict | None = None) -> dict:
    name = str(dtype).replace("torch.", "")
    print(f"layers {network} {inp.name} {name}:", flush=True)
    result = {"network": network, "input": inp.name, "dtype": name, "layers": []}
    for layer in conv_layers(network, inp, device, dtype):
        row = bench_layer(layer, [v for v in sweep if not v.startswith("mapsort=")], args)
        result["layers"].append(row)
        print_layer(row, name, ceilings)
    return result


# ----------------------------------------------------------------------------- the run

def git_commit() -> str | None:
    if os.environ.get("SPCONV_LITE_COMMIT"):
        return os.environ["SPCONV_LITE_COMMIT"]
    try:
        def git(*command):
            return subprocess.run(["git", "-C", str(REPO), *command], capture_output=True,
                                  text=True, timeout=10)

        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def run_meta(libs, skipped, inputs, device, args) -> dict:
    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "driver": driver_version() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "libraries": {name: lib.version for name, lib in libs.items()},
        "skipped_libraries": skipped,
        "triton_autotune": next((lib.autotune for lib in libs.values() if lib.autotune), None),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn": torch.backends.cudnn.allow_tf32},
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "inputs": {name: {"voxels": int(inp.indices.shape[0]), "spatial_shape_zyx": inp.shape}
                   for name, inp in inputs.items()},
        "ratio": f"other / {BASELINE} of the medians (> 1: {BASELINE} is faster)",
    }


class Report:
    """The run's JSON, rewritten after every step."""

    def __init__(self, path: Path | None, meta: dict) -> None:
        self.path = path
        self.data = {"meta": meta, "voxelize": None, "networks": [], "maps": [],
                     "skipped_cases": []}

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.data, indent=1, default=float)


def print_case(case: dict) -> None:
    head = f"{case['network']:<7} {case['input']:<13} {case['dtype']:<8} {case['pass']:<6}"
    for name, st in case["libs"].items():
        extra = case["compare"].get(name, {})
        check = ""
        if extra:
            check = (f"rel err {extra['max_rel_err']:.1e}" if "max_rel_err" in extra
                     else f"DIFFERENT SITES ({extra['sites']} vs {extra['ref_sites']})")
        peak = f"{st['peak_mib']:8.0f} MiB" if st.get("peak_mib") is not None else ""
        print(f"{head} {name:<14} {st['median_ms']:9.2f} ms [{st['p25_ms']:.2f}-"
              f"{st['p75_ms']:.2f}] {peak} {check}", flush=True)
    for name, error in case["errors"].items():
        print(f"{head} {name:<14} ERROR {error}", flush=True)
    if case["ratios"]:
        print(f"{head} ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in case["ratios"].items()),
              flush=True)
    for name, speedup in case.get("variant_speedup", {}).items():
        same = case.get("vs_default", {}).get(name, {})
        print(f"{head} {name}: {speedup:.2f}x the default kernels, "
              f"{case.get('vs_spconv', {}).get(name, float('nan')):.2f}x spconv, "
              f"outputs {'identical' if same.get('identical') else same}", flush=True)


def bench_network_case(network, inp, dtype, train, libs, state, device, args, sync) -> dict:
    nets, build_errors = build_networks(network, libs, state, device, dtype, train)
    calls = {name: network_call(libs[name], net, inp, dtype, train) for name, net in nets.items()}
    outputs, timings, errors = run_alternating(calls, args.warmup, args.repeats, sync)
    errors.update(build_errors)
    case = {"network": network, "input": inp.name, "voxels": int(inp.indices.shape[0]),
            "dtype": str(dtype).replace("torch.", ""), "pass": "train" if train else "fwd",
            "libs": {}, "errors": errors, "compare": {}, "grad_compare": {}}
    for name, st in timings.items():
        case["libs"][name] = dict(st)
        try:
            case["libs"][name]["peak_mib"] = peak_memory_mib(calls[name], device)
        except Exception as exc:  # noqa: BLE001
            errors[name] = one_line(exc)
    case["ratios"] = ratios({name: st["median_ms"] for name, st in timings.items()})
    reference = REFERENCE if REFERENCE in outputs else BASELINE
    case["compared_with"] = reference if reference in outputs else None
    for name, (out, grads) in outputs.items():
        if name == reference or reference not in outputs:
            continue
        case["compare"][name] = compare_by_site(out, outputs[reference][0])
        if train:
            case["grad_compare"][name] = compare_grads(grads, outputs[reference][1])
    add_variant_results(case, outputs, {name: st["median_ms"] for name, st in timings.items()})
    return case


def add_variant_results(case: dict, outputs: dict, medians: dict[str, float]) -> None:
    """For each spconv_lite variant ("spconv_lite[...]"): its speed-up over the default kernels
    (default / variant), and whether its outputs (and weight gradients) are those of the
    default kernels, bitwise up to the sign of zero. For spconv_lite and each variant: spconv's
    median over theirs (> 1: faster than spconv)."""
    base = medians.get(BASELINE)
    variants = [name for name in medians if name.startswith(f"{BASELINE}[")]
    if not variants:
        return
    case["variant_speedup"] = {name: base / medians[name] for name in variants if base}
    if REFERENCE in medians:
        case["vs_spconv"] = {name: medians[REFERENCE] / medians[name]
                             for name in [BASELINE, *variants] if name in medians}
    case["vs_default"] = {}
    if BASELINE not in outputs:
        return
    default_out, default_grads = outputs[BASELINE]
    for name in variants:
        if name not in outputs:
            continue
        out, grads = outputs[name]
        same_rows = torch.equal(out.indices, default_out.indices)
        result = {"same_rows": bool(same_rows)}
        if same_rows:
            a, b = out.features.detach(), default_out.features.detach()
            result["identical"] = bool(torch.equal(a + 0, b + 0))
            result["max_rel_err"] = relative_error(a.float(), b.float())
        if grads is not None and default_grads is not None:
            result["grads_identical"] = all(torch.equal(g + 0, default_grads[n] + 0)
                                            for n, g in grads.items() if n in default_grads)
            result["grads"] = compare_grads(grads, default_grads)
        case["vs_default"][name] = result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of the LiDAR files")
    parser.add_argument("--libs", default=",".join(LIBRARIES),
                        help="libraries to run (one that does not import is reported as skipped)")
    parser.add_argument("--dtypes", default="float32,float16", help="feature / weight dtypes")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed calls per library")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed calls first")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run of the script, not a measurement")
    parser.add_argument("--quick", action="store_true",
                        help=f"inputs cropped to {QUICK_SITES} voxels (a dry run)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the cases that would start after this many seconds")
    parser.add_argument("--inputs", default=",".join(i for _, i in PLAN),
                        help="inputs to run, of " + ", ".join(i for _, i in PLAN))
    parser.add_argument("--dtype-major", action="store_true",
                        help="run every input in one dtype before the next dtype (default: "
                        "every dtype of one input before the next input)")
    parser.add_argument("--variants", default=None, metavar="SWEEP",
                        help="';'-separated values of SPCONV_LITE_CUDA_VARIANTS, each timed as "
                        "one more library 'spconv_lite[VALUE]' beside the default kernels; "
                        f"'default' for {DEFAULT_SWEEP!r}")
    parser.add_argument("--layers", action="store_true",
                        help="also time each conv layer's forward, input and weight gradient "
                        "with the default kernels and each variant")
    parser.add_argument("--no-networks", action="store_true",
                        help="skip the network cases and their maps (with --layers: layers only)")
    parser.add_argument("--no-maps", action="store_true", help="skip the kernel maps alone")
    parser.add_argument("--no-voxelize", action="store_true", help="skip PointToVoxel")
    parser.add_argument("--triton-configs", type=positive_int, default=None, metavar="N",
                        help="autotune spconv-Triton over N configs per kernel, evenly spread "
                        "over its lists (default: its full lists); the results say so")
    parser.add_argument("--profile-layer", default=None, metavar="NETWORK:INPUT:LAYER:DTYPE",
                        help="only run that conv layer once per variant, for ncu (e.g. "
                        "spconv:spconv_pc_x8:1:float16)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--write-results", type=Path, default=None, metavar="RUN_JSON",
                        help="write DATE-GPU-KIND.json and .md for the repository from a run's "
                        "JSON (KIND: bench, variants or triton)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.write_results is not None:
        for path in write_results(json.loads(args.write_results.read_text()), args.results_dir):
            print(f"wrote {path}")
        return {}
    check_results_path(parser, args.json, args.data or default_data_dir())
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --device cpu for a dry run)")
    start = time.monotonic()
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (spconv's default)
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cpu":
        torch.set_num_threads(1)  # spconv's CPU kernels are only correct on one thread
    sync = make_sync(device)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",") if name]
    libs, skipped = load_libraries([n for n in args.libs.split(",") if n], args.triton_configs)
    if BASELINE not in libs:
        sys.exit(f"error: {BASELINE} does not import: {skipped.get(BASELINE)}")
    sweep = []
    if args.variants:
        sweep = [v for v in (DEFAULT_SWEEP if args.variants == "default"
                             else args.variants).split(";") if v.strip()]
        libs.update(variant_libraries(libs[BASELINE], ";".join(sweep)))
    plan = [(network, name) for wanted in args.inputs.split(",")
            for network, name in PLAN if name == wanted.strip()]
    data = args.data or default_data_dir()
    needed = {name for _, name in plan}
    if args.profile_layer:
        needed.add(args.profile_layer.split(":")[1])
    inputs = load_inputs(data, args.quick, needed)
    report = Report(args.json, run_meta(libs, skipped, inputs, device, args))
    meta = report.data["meta"]
    meta["kind"] = "variants" if sweep else "triton" if args.triton_configs else "bench"
    print(f"{meta['gpu'] or 'CPU (dry run)'} | driver {meta['driver']} | torch {meta['torch']} "
          f"(CUDA {meta['cuda']}) | python {meta['python']} | commit {meta['commit']}")
    print("libraries:", meta["libraries"], "| skipped:", skipped or "none")
    if meta.get("triton_autotune"):
        print("spconv-Triton autotunes over a cut list:", meta["triton_autotune"])
    print("voxels:", {name: v["voxels"] for name, v in meta["inputs"].items()}, flush=True)
    for inp in inputs.values():
        inp.features, inp.indices = inp.features.to(device), inp.indices.to(device)
    if args.profile_layer:
        profile_layer(args.profile_layer, inputs, sweep, device)
        return report.data
    # A SIGINT (the time box of scripts/gpu_check.sh) keeps what was measured: the JSON is
    # marked interrupted, with the step that was running.
    step = ["ceilings"]
    try:
        run_steps(args, report, libs, inputs, plan, dtypes, sweep, data, device, sync, start,
                  step)
    except KeyboardInterrupt:
        meta["interrupted"] = f"stopped (SIGINT) during: {step[0]}"
        meta["seconds"] = round(time.monotonic() - start, 1)
        report.save()
        print(f"interrupted during {step[0]}; wrote what was measured", flush=True)
        sys.exit(130)
    meta["seconds"] = round(time.monotonic() - start, 1)
    report.save()
    if args.json is not None:
        print(f"wrote {args.json}")
    return report.data


def failed_case(network: str, inp: Input, dtype, train: bool, exc: Exception) -> dict:
    """A network case that raised outside any one library's calls (a CUDA error that broke the
    context, say): recorded with its error, and the run goes on."""
    return {"network": network, "input": inp.name, "voxels": int(inp.indices.shape[0]),
            "dtype": str(dtype).replace("torch.", ""), "pass": "train" if train else "fwd",
            "libs": {}, "errors": {"case": one_line(exc)}, "compare": {}, "grad_compare": {},
            "ratios": {}}


def run_steps(args, report: Report, libs, inputs, plan, dtypes, sweep, data, device, sync,
              start: float, step: list[str]) -> None:
    """The measurements of main, in order: ceilings, PointToVoxel, the network cases (with the
    maps of their float32 forwards), the layers. ``step[0]`` names the step running."""
    meta = report.data["meta"]
    try:
        meta["ceilings"] = measure_ceilings(device, dtypes, args)
    except Exception as exc:  # noqa: BLE001  (the cases do not need it)
        meta["ceilings"] = {"error": one_line(exc)}
    print(ceilings_line(meta["ceilings"]), flush=True)
    report.save()

    def over_budget(what: str) -> bool:
        step[0] = what
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            report.data["skipped_cases"].append(what)
            print(f"skipped (time budget): {what}", flush=True)
            return True
        return False

    if not args.no_voxelize and not over_budget("voxelize"):
        plain = {name: lib for name, lib in libs.items() if not lib.variants}  # not variants
        try:
            report.data["voxelize"] = bench_voxelize(plain, data, device, args, sync)
            v = report.data["voxelize"]
            print("PointToVoxel (KITTI frame):", {n: round(s["median_ms"], 3)
                                                  for n, s in v["libs"].items()},
                  v["ratios"], v["compare"], v["errors"] or "", flush=True)
        except Exception as exc:  # noqa: BLE001  (the cases do not need it)
            print(f"PointToVoxel: {one_line(exc)}", flush=True)
        report.save()
    report.data["variants"] = sweep
    states = {}  # per (network, input): the weights all libraries load, the useful GFLOP
    cases = [(network, name, dtype, train) for network, name in plan for dtype in dtypes
             for train in (False, True)]
    if args.dtype_major:
        cases.sort(key=lambda c: dtypes.index(c[2]))  # stable: the plan's order within a dtype
    for network, input_name, dtype, train in [] if args.no_networks else cases:
        inp = inputs[input_name]
        dtype_name = str(dtype).replace("torch.", "")
        what = f"{network} {input_name} {dtype_name} {'train' if train else 'fwd'}"
        if over_budget(what):
            continue
        if (network, input_name) not in states:
            torch.manual_seed(0)
            reference_net = NETWORKS[network](libs[BASELINE].ns)
            state = copy.deepcopy(reference_net.state_dict())
            try:
                gflop = useful_gflop(reference_net.to(device), inp)
            except Exception as exc:  # noqa: BLE001  (the rest of the run does not need it)
                print(f"useful GFLOP of {network} {input_name}: {one_line(exc)}")
                gflop = None
            states[network, input_name] = state, gflop
        state, gflop = states[network, input_name]
        try:
            case = bench_network_case(network, inp, dtype, train, libs, state, device, args,
                                      sync)
        except Exception as exc:  # noqa: BLE001  (recorded; the other cases still run)
            case = failed_case(network, inp, dtype, train, exc)
        case["useful_gflop_fwd"] = gflop
        if gflop and not train:
            case["useful_tflops"] = {name: gflop / st["median_ms"]
                                     for name, st in case["libs"].items()}
        report.data["networks"].append(case)
        add_map_shares(report.data)
        print_case(case)
        report.save()
        if (dtype == torch.float32 and not train and not args.no_maps
                and not over_budget(f"maps {what}")):
            try:
                maps = bench_maps(libs, network, state, inp, device, args, sync)
            except Exception as exc:  # noqa: BLE001  (recorded; the other cases still run)
                maps = {"libs": {}, "by_type": {}, "errors": {"maps": one_line(exc)}}
            maps.update(network=network, input=input_name)
            report.data["maps"].append(maps)
            add_map_shares(report.data)
            print(f"maps {network} {input_name}:", {
                name: (e.get("maps"), round(e.get("total_median_ms", float("nan")), 3))
                for name, e in maps["libs"].items()}, maps["errors"] or "", flush=True)
            report.save()
    if args.layers:
        report.data["layers"] = []
        for network, input_name in plan:
            for dtype in dtypes:
                what = f"layers {network} {input_name} {dtype}"
                if over_budget(what):
                    continue
                try:
                    report.data["layers"].append(
                        bench_layers(network, inputs[input_name], dtype, sweep, device, args,
                                     meta.get("ceilings")))
                except Exception as exc:  # noqa: BLE001  (the other breakdowns still run)
                    print(f"{what}: {one_line(exc)}", flush=True)
                report.save()


def add_map_shares(data: dict) -> None:
    """Each library's map time per forward as a share of its forward, for every dtype."""
    for maps in data["maps"]:
        for case in data["networks"]:
            if (case["network"], case["input"], case["pass"]) != (maps["network"], maps["input"],
                                                                   "fwd"):
                continue
            for name, entry in maps["libs"].items():
                fwd = case["libs"].get(name, {}).get("median_ms")
                if fwd and "total_median_ms" in entry:
                    entry[f"share_of_{case['dtype']}_fwd"] = entry["total_median_ms"] / fwd


# ----------------------------------------------------------------------------- results file

def results_kind(data: dict) -> str:
    """bench, variants or triton: which stage of scripts/gpu_check.sh made the run (runs from
    before meta.kind: variants when they swept variants)."""
    return data["meta"].get("kind") or ("variants" if data.get("variants") else "bench")


def results_stem(data: dict) -> str:
    """DATE-GPU-KIND: one results file per kind of run, so that a day's runs do not overwrite
    each other."""
    meta = data["meta"]
    gpu = re.sub(r"[^a-z0-9]+", "-", (meta.get("gpu") or "cpu").lower()).strip("-")
    return f"{meta['date'][:10]}-{gpu}-{results_kind(data)}"


def autotune_note(meta: dict) -> str | None:
    """What a cut autotune list changes in the measurement, for the results page."""
    cut = meta.get("triton_autotune")
    if not cut:
        return None
    return ("spconv-Triton autotuned over a cut list of configs, evenly spread over each "
            "kernel's own list (" + ", ".join(f"{k} {v}" for k, v in cut.items()) + "): its "
            "full lists take minutes to compile on a GPU with an empty cache, more than the "
            "time-boxed run has, so its times may be slower than with its full autotuning")


def fmt_ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_markdown(data: dict) -> str:
    """The results of one run as a markdown page (the table the README quotes)."""
    meta = data["meta"]
    names = [n for n in LIBRARIES if n in meta["libraries"]]
    lines = [
        f"# GPU benchmark ({results_kind(data)}): {meta.get('gpu') or 'CPU dry run'}, "
        f"{meta['date'][:10]}",
        "",
        f"- GPU: {meta.get('gpu')}, driver {meta.get('driver')}",
        f"- torch {meta['torch']} (CUDA {meta['cuda']}), Python {meta['python']}",
        "- libraries: " + ", ".join(f"{n} {v}" for n, v in meta["libraries"].items())
        + ("; skipped: " + ", ".join(f"{n} ({r})" for n, r in meta["skipped_libraries"].items())
           if meta["skipped_libraries"] else ""),
        f"- spconv_lite commit: {meta.get('commit')}",
        *([f"- **{meta['interrupted']}**: the cases below are those measured before"]
          if meta.get("interrupted") else []),
        *([f"- {autotune_note(meta)}"] if autotune_note(meta) else []),
        f"- medians of {meta['repeats']} calls after {meta['warmup']} warm-up calls, libraries "
        "alternated call by call, each call between two device synchronisations; TF32 off; "
        f"ratio = {meta['ratio']}",
        "- inputs: " + ", ".join(f"{n} {v['voxels']:,} voxels" for n, v in meta["inputs"].items()),
        "- " + (ceilings_line(meta["ceilings"]) if meta.get("ceilings") else "measured ceilings: -")
        + "; datasheet peaks " + ", ".join(f"{d} {v:g}" for d, v in PEAK_TFLOPS.items())
        + " TFLOP/s",
        "",
        "## Networks (ms; peak MiB; max relative difference of the outputs from "
        f"{REFERENCE}'s)",
        "",
        *([f"spconv_triton: {autotune_note(meta)}.", ""] if autotune_note(meta) else []),
        "| network | input | dtype | pass | " + " | ".join(f"{n} ms" for n in names)
        + " | " + " | ".join(f"{n} / {BASELINE}" for n in names if n != BASELINE)
        + " | peak MiB (" + ", ".join(names) + ") | rel. diff. | TFLOP/s (" + BASELINE + ") |",
        "|" + "---|" * (5 + 2 * len(names) + 1),
    ]
    for case in data["networks"]:
        medians = [fmt_ms(case["libs"].get(n, {}).get("median_ms")) if n not in case["errors"]
                   else "error" for n in names]
        ratio = [f"{case['ratios'][f'{n}/{BASELINE}']:.2f}"
                 if f"{n}/{BASELINE}" in case["ratios"] else "-" for n in names if n != BASELINE]
        peaks = ", ".join("-" if case["libs"].get(n, {}).get("peak_mib") is None
                          else f"{case['libs'][n]['peak_mib']:.0f}" for n in names)
        diffs = []
        for n, c in case["compare"].items():
            diffs.append(f"{n} {c['max_rel_err']:.1e}" if "max_rel_err" in c
                         else f"{n} DIFFERENT SITES")
        tflops = case.get("useful_tflops", {}).get(BASELINE)
        lines.append(f"| {case['network']} | {case['input']} ({case['voxels']:,}) | "
                     f"{case['dtype']} | {case['pass']} | " + " | ".join(medians) + " | "
                     + " | ".join(ratio) + f" | {peaks} | {'; '.join(diffs) or '-'} | "
                     + ("-" if tflops is None else f"{tflops:.3g}"
                        + peak_note(case["dtype"], tflops, meta.get("ceilings"))) + " |")
    lines += render_variants(data) + render_verdicts(data) + render_layers(data)
    if data["maps"]:
        lines += ["", "## Kernel maps of one forward (ms, replayed alone)", "",
                  "| network | input | map type | " + " | ".join(names) + " |",
                  "|" + "---|" * (3 + len(names))]
        for maps in data["maps"]:
            total = [fmt_ms(maps["libs"].get(n, {}).get("total_median_ms")) for n in names]
            lines.append(f"| {maps['network']} | {maps['input']} | all maps | "
                         + " | ".join(total) + " |")
            for kind, by_lib in maps["by_type"].items():
                cells = ["-" if n not in by_lib else
                         f"{by_lib[n]['median_ms']:.3f} ({by_lib[n]['maps']})" for n in names]
                lines.append(f"| | | {kind} | " + " | ".join(cells) + " |")
            shares = []
            for n in names:
                entry = maps["libs"].get(n, {})
                shares.append(", ".join(f"{k.split('_')[2]} {v:.0%}" for k, v in entry.items()
                                        if k.startswith("share_of_")) or "-")
            lines.append("| | | share of the forward | " + " | ".join(shares) + " |")
    voxelize = data.get("voxelize")
    if voxelize:
        lines += ["", f"## PointToVoxel, KITTI frame ({voxelize['points']:,} points)", "",
                  "| library | median ms | vs " + BASELINE + " | voxels agree with "
                  + BASELINE + " |", "|---|---|---|---|"]
        for n in names:
            st = voxelize["libs"].get(n)
            if st is None:
                lines.append(f"| {n} | error: {voxelize['errors'].get(n, '-')} | | |")
                continue
            agree = voxelize["compare"].get(n, {})
            lines.append(f"| {n} | {st['median_ms']:.3f} | "
                         + (f"{voxelize['ratios'][f'{n}/{BASELINE}']:.2f}"
                            if f"{n}/{BASELINE}" in voxelize["ratios"] else "-")
                         + " | " + (", ".join(f"{k} {v}" for k, v in agree.items()) or "-")
                         + " |")
    errors = [(c["network"], c["input"], c["dtype"], c["pass"], n, e)
              for c in data["networks"] for n, e in c["errors"].items()]
    if errors or data["skipped_cases"]:
        lines += ["", "## Errors and skipped cases", ""]
        lines += [f"- {' '.join(e[:4])}: {e[4]}: {e[5]}" for e in errors]
        lines += [f"- skipped (time budget): {what}" for what in data["skipped_cases"]]
    return "\n".join(lines) + "\n"


def render_variants(data: dict) -> list[str]:
    """The kernel variants' table: each variant's median, its speed-up over the default
    kernels and over spconv, and whether its outputs are the default kernels'."""
    cases = [c for c in data["networks"] if c.get("variant_speedup")]
    if not cases:
        return []
    lines = ["", "## Kernel variants (SPCONV_LITE_CUDA_VARIANTS)", "",
             "Speed-up = the default kernels' median / the variant's (> 1: the variant is "
             "faster); vs spconv = spconv's median / the variant's; identical = outputs (and "
             "weight gradients) equal to the default kernels' bitwise, up to the sign of zero.",
             "", "| network | input | dtype | pass | variant | ms | speed-up | vs spconv | "
             "identical | peak MiB |", "|" + "---|" * 10]
    for case in cases:
        head = f"| {case['network']} | {case['input']} | {case['dtype']} | {case['pass']} |"
        default = case["libs"].get(BASELINE, {})
        vs_spconv = case.get("vs_spconv", {})
        lines.append(f"{head} default | {fmt_ms(default.get('median_ms'))} | 1.00 | "
                     + (f"{vs_spconv[BASELINE]:.2f}" if BASELINE in vs_spconv else "-")
                     + " | - | " + (f"{default['peak_mib']:.0f}"
                                    if default.get("peak_mib") is not None else "-") + " |")
        for name, speedup in case["variant_speedup"].items():
            st = case["libs"][name]
            same = case.get("vs_default", {}).get(name, {})
            identical = same.get("identical")
            if "grads_identical" in same:
                identical = identical and same["grads_identical"]
            lines.append(
                f"{head} {name[len(BASELINE) + 1:-1]} | {st['median_ms']:.2f} | {speedup:.2f} | "
                + (f"{vs_spconv[name]:.2f}" if name in vs_spconv else "-") + " | "
                + ("yes" if identical else f"no ({same.get('max_rel_err', float('nan')):.1e})")
                + " | " + (f"{st['peak_mib']:.0f}" if st.get("peak_mib") is not None else "-")
                + " |")
    lines += ["", "Kernel maps of one forward per variant (row orders included: they are built "
              "with the maps, as spconv's mask sorts are):", "",
              "| network | input | variant | all maps ms | share of the forward |",
              "|---|---|---|---|---|"]
    for maps in data["maps"]:
        for name, entry in maps["libs"].items():
            if not name.startswith(BASELINE) or "total_median_ms" not in entry:
                continue
            shares = ", ".join(f"{k.split('_')[2]} {v:.0%}" for k, v in entry.items()
                               if k.startswith("share_of_"))
            label = name[len(BASELINE) + 1:-1] or "default"
            lines.append(f"| {maps['network']} | {maps['input']} | {label} | "
                         f"{entry['total_median_ms']:.3f} | {shares or '-'} |")
    return lines


# The largest relative difference from the default kernels that the rule for a new default
# accepts where the sums are not the same (#13's bars against spconv), by dtype.
VARIANT_TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-3}
# Entries of a variant that change float32's wide layers from cuBLAS's sums to the fused kernels'
# (their outputs then differ from the default kernels' by rounding, not by a bug).
REPLACES_GEMMS = ("tiles=pipelined", "algo=fused", "wgrad=compact")


def variant_verdicts(data: dict) -> list[dict]:
    """The rule of README "Kernel variants" applied to a variants run, per dtype and variant:
    its medians at least the default kernels' in every network case of the dtype and better in
    each of the 8x cloud's; its outputs identical to the default kernels' (float32 variants that
    take wide layers off the per-offset GEMMs, and every weight gradient of `wgrad=compact`:
    within VARIANT_TOLERANCE); its peak memory no higher than spconv's. Each entry: dtype,
    variant, passes (bool), failures (the conditions it misses), slowest (the lowest speed-up
    and its case), x8 (the 8x cloud's speed-ups by pass). The CUDA tests (summary.json) are the
    rule's other condition."""
    verdicts = []
    cases = [c for c in data["networks"] if c.get("variant_speedup")]
    for dtype in dict.fromkeys(c["dtype"] for c in cases):
        of_dtype = [c for c in cases if c["dtype"] == dtype]
        names = dict.fromkeys(n for c in of_dtype for n in c["variant_speedup"])
        tolerance = VARIANT_TOLERANCE.get(dtype, 0.0)
        for name in names:
            variant = name[len(BASELINE) + 1:-1]
            failures = []
            timed = [c for c in of_dtype if name in c["variant_speedup"]]
            missing = len(of_dtype) - len(timed)
            if missing:
                failures.append(f"not timed in {missing} case(s)")
            slowest = min(timed, key=lambda c: c["variant_speedup"][name])
            low = slowest["variant_speedup"][name]
            if low < 1.0:
                failures.append(f"slower than the default in {slowest['input']} "
                                f"{slowest['pass']} ({low:.2f}x)")
            x8 = {c["pass"]: c["variant_speedup"][name] for c in timed
                  if c["input"] == "spconv_pc_x8"}
            if not x8 or min(x8.values()) <= 1.0:
                failures.append("not faster on the 8x cloud" if x8 else "8x cloud not timed")
            loose = dtype == "float32" and any(e in variant for e in REPLACES_GEMMS)
            for case in timed:
                same = case.get("vs_default", {}).get(name, {})
                where = f"{case['input']} {case['pass']}"
                if not same.get("same_rows", False):
                    failures.append(f"other output rows ({where})")
                    continue
                if not same.get("identical") and not (
                        loose and same.get("max_rel_err", math.inf) <= tolerance):
                    failures.append(f"outputs differ ({where}: "
                                    f"{same.get('max_rel_err', math.nan):.1e})")
                grads_loose = loose or "wgrad=compact" in variant
                grad_err = same.get("grads", {}).get("max_rel_err", math.inf)
                if "grads_identical" in same and not same["grads_identical"] and not (
                        grads_loose and grad_err <= tolerance):
                    failures.append(f"weight gradients differ ({where}: {grad_err:.1e})")
                ours = case["libs"].get(name, {}).get("peak_mib")
                theirs = case["libs"].get(REFERENCE, {}).get("peak_mib")
                if ours is not None and theirs is not None and ours > theirs:
                    failures.append(f"peak memory above spconv's ({where}: {ours:.0f} > "
                                    f"{theirs:.0f} MiB)")
            verdicts.append({"dtype": dtype, "variant": variant, "passes": not failures,
                             "failures": failures, "x8": x8,
                             "slowest": {"input": slowest["input"], "pass": slowest["pass"],
                                         "speedup": low}})
    return verdicts


def render_verdicts(data: dict) -> list[str]:
    """variant_verdicts as a table."""
    verdicts = variant_verdicts(data)
    if not verdicts:
        return []
    lines = ["", "## What the rule for a new default says (README \"Kernel variants\")", "",
             "Besides these, a new default needs the CUDA tests and compute-sanitizer clean on "
             "the GPU (summary.json).", "",
             "| dtype | variant | default? | lowest speed-up | 8x cloud speed-ups | misses |",
             "|---|---|---|---|---|---|"]
    for v in verdicts:
        slowest = v["slowest"]
        x8 = ", ".join(f"{p} {s:.2f}" for p, s in v["x8"].items()) or "-"
        lines.append(f"| {v['dtype']} | {v['variant']} | {'yes' if v['passes'] else 'no'} | "
                     f"{slowest['speedup']:.2f} ({slowest['input']} {slowest['pass']}) | {x8} | "
                     + ("; ".join(dict.fromkeys(v["failures"])) or "-") + " |")
    return lines


def render_layers(data: dict) -> list[str]:
    """The per-layer breakdown: each conv layer's forward, input gradient (dgrad) and weight
    gradient (wgrad) with the default kernels (ms, useful TFLOP/s) and the best variant."""
    lines = []
    measured = data["meta"].get("ceilings", {}).get("mm_tflops", {})
    for group in data.get("layers", []):
        peak = PEAK_TFLOPS.get(group["dtype"])
        mm = measured.get(group["dtype"])
        lines += ["", f"## Layers of {group['network']} on {group['input']}, {group['dtype']} "
                  f"(useful TFLOP/s; peak {peak}, torch.mm measured "
                  + ("-" if mm is None else f"{mm:.1f}") + " TFLOP/s)", "",
                  "| layer | C_in->C_out | pairs | tile use (64 rows) | fwd ms (TFLOP/s) | best "
                  "fwd | dgrad ms | best dgrad | wgrad ms | best wgrad |", "|" + "---|" * 10]
        for row in group["layers"]:
            cells = []
            for op in ("fwd", "dgrad", "wgrad"):
                default = row["variants"]["default"]
                if f"{op}_ms" not in default:
                    cells += ["error", "-"]
                    continue
                best = min(((n, e[f"{op}_ms"]) for n, e in row["variants"].items()
                            if f"{op}_ms" in e), key=lambda item: item[1])
                cells += [f"{default[f'{op}_ms']:.3f} ({default[f'{op}_tflops']:.1f})",
                          f"{best[0]} {best[1]:.3f} ({default[f'{op}_ms'] / best[1]:.2f}x)"]
            uses = [f"{v:.2f}" for k, v in row["tile_use"].items() if k.startswith("64 rows")]
            lines.append(f"| {row['layer']} {row['kind']} | {row['c_in']}->{row['c_out']} | "
                         f"{row['pairs']:,} | {' / '.join(uses)} | " + " | ".join(cells) + " |")
    return lines


def write_results(data: dict, directory: Path) -> list[Path]:
    """DATE-GPU-KIND.json (the run's JSON) and DATE-GPU-KIND.md (its tables) in
    ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = results_stem(data)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    md_path.write_text(render_markdown(data))
    return [json_path, md_path]


if __name__ == "__main__":
    main()
