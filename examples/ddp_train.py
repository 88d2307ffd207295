"""Distributed data-parallel training of a sparse network with ``torch.distributed``.

Two worker processes on this machine (``gloo`` backend, loopback 127.0.0.1 only) each take
half of a global batch of synthetic LiDAR sweeps, run the sparse U-Net segmentation model of
``segmentation.py`` wrapped in ``DistributedDataParallel`` and take one SGD step. The same
global batch is then trained for one step in a single process, and the gradients and the
updated weights are compared: data parallelism must not change the result beyond float
rounding.

Two things make the two runs comparable, and real training needs the same care:

- **Loss normalisation.** The loss is the mean over sweeps of each sweep's mean voxel loss.
  DDP averages the gradients of the workers, which equals the single-process gradient because
  every worker holds the same number of sweeps.
- **BatchNorm.** In training mode BatchNorm normalises with the statistics of the batch it
  sees, so each worker would use its own half batch. Here the BatchNorm statistics are frozen
  (eval mode, affine weights still trained), as in fine-tuning. To train with batch
  statistics across workers, apply ``nn.SyncBatchNorm.convert_sync_batchnorm`` (it also
  converts the BatchNorm layers inside ``SparseSequential``); PyTorch's SyncBatchNorm runs only
  on CUDA tensors, and this example trains on the CPU with gloo.

The task is a toy: each voxel is classified as ground, low or high from its own height, which
the network learns from the mean point coordinates it gets as features.

Run from the repository root (under a minute on 2 cores):

    python examples/ddp_train.py [--samples 4] [--world-size 2]
"""

from __future__ import annotations

import argparse
import datetime
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lidar_data import crop, voxelize
from segmentation import SegmentationNet
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import spconv_lite.pytorch as spconv
from spconv_lite.synthetic import lidar_sweep

POINT_RANGE = [-25.6, -25.6, -3.0, 25.6, 25.6, 1.0]
VOXEL_SIZE = [0.2, 0.2, 0.2]
NUM_CLASSES = 3
# Height classes (sensor frame; the synthetic ground lies at z = -1.73).
GROUND_BELOW, HIGH_ABOVE = -1.5, -0.2


def make_samples(count: int, num_azimuth: int = 360) -> list[dict]:
    """``count`` synthetic sweeps (seeds 0..count-1), voxelized, with per-voxel labels."""
    samples = []
    for seed in range(count):
        points, _ = crop(lidar_sweep(seed=seed, num_azimuth=num_azimuth), POINT_RANGE)
        voxels = voxelize(points, VOXEL_SIZE, POINT_RANGE)
        z = voxels.features[:, 2]
        label = (z >= GROUND_BELOW).long() + (z >= HIGH_ABOVE).long()
        samples.append({"features": voxels.features, "coords": voxels.coords, "label": label,
                        "grid_size": voxels.grid_size})
    return samples


def collate(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch: features, (batch, z, y, x) coordinates and labels of all sweeps."""
    coords = [torch.cat([torch.full((len(s["coords"]), 1), i, dtype=torch.int32), s["coords"]], 1)
              for i, s in enumerate(samples)]
    return (torch.cat([s["features"] for s in samples]), torch.cat(coords),
            torch.cat([s["label"] for s in samples]))


def build_model(grid_size, seed: int = 0) -> SegmentationNet:
    """The same initial weights in every process."""
    torch.manual_seed(seed)
    return SegmentationNet(grid_size, num_classes=NUM_CLASSES)


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers normalise with their running statistics (call after ``.train()``)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def per_sample_loss(logits: torch.Tensor, label: torch.Tensor, batch: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    """Mean over the batch's sweeps of each sweep's mean voxel cross entropy."""
    ce = F.cross_entropy(logits, label, reduction="none")
    sums = ce.new_zeros(batch_size).index_add(0, batch, ce)
    counts = torch.bincount(batch, minlength=batch_size).to(ce.dtype)
    return (sums / counts).mean()


def train_step(model: nn.Module, samples: list[dict],
               lr: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One SGD step of ``model`` (plain or DDP-wrapped) on ``samples``; returns the loss and
    the gradients the step used (for DDP: averaged over the workers)."""
    features, coords, label = collate(samples)
    module = model.module if isinstance(model, DistributedDataParallel) else model
    model.train()
    freeze_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x = spconv.SparseConvTensor(features, coords, module.unet.sparse_shape, len(samples))
    loss = per_sample_loss(model(x), label, coords[:, 0].long(), len(samples))
    optimizer.zero_grad()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()}
    optimizer.step()
    return loss.detach(), grads


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, samples: list[dict], lr: float,
            out_dir: str, timeout_s: float) -> None:
    torch.set_num_threads(1)  # one core per worker
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        model = build_model(samples[0]["grid_size"])
        ddp = DistributedDataParallel(model)
        per_rank = len(samples) // world_size
        mine = samples[rank * per_rank:(rank + 1) * per_rank]
        loss, grads = train_step(ddp, mine, lr)
        # Losses of all workers; their mean is the single-process loss.
        losses = [torch.zeros(()) for _ in range(world_size)]
        dist.all_gather(losses, loss)
        torch.save({"grads": grads, "state": model.state_dict(), "losses": losses},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(samples: list[dict], world_size: int = 2, lr: float = 0.1,
                    timeout_s: float = 120.0) -> list[dict]:
    """One DDP step in ``world_size`` spawned processes; returns each rank's gradients,
    updated weights and the losses. Never hangs: the processes are killed after
    ``timeout_s`` seconds and collective ops time out too."""
    if len(samples) % world_size:
        raise ValueError(f"{len(samples)} samples do not split evenly over {world_size} workers")
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker, args=(world_size, free_port(), samples, lr, out_dir, timeout_s),
            nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed training did not finish in {timeout_s} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True)
                for r in range(world_size)]


def run_single(samples: list[dict], lr: float = 0.1) -> dict:
    """The same step on the whole batch in this process."""
    model = build_model(samples[0]["grid_size"])
    loss, grads = train_step(model, samples, lr)
    return {"grads": grads, "state": model.state_dict(), "loss": loss}


def max_rel_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest ``max|a - b| / max|b|`` over the tensors of two dicts, and its key."""
    worst, worst_key = 0.0, ""
    for key, ref in b.items():
        if not ref.is_floating_point():
            continue
        diff = (a[key] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        if diff > worst:
            worst, worst_key = diff, key
    return worst, worst_key


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="global batch (sweeps)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--azimuth", type=int, default=360, help="firings per turn per beam")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds")
    args = parser.parse_args(argv)

    samples = make_samples(args.samples, args.azimuth)
    print(f"global batch: {len(samples)} sweeps, "
          f"{[len(s['features']) for s in samples]} voxels each")
    start = time.perf_counter()
    ranks = run_distributed(samples, args.world_size, args.lr, args.timeout)
    print(f"DDP, {args.world_size} gloo processes: {time.perf_counter() - start:.1f} s, "
          f"losses {[round(float(x), 5) for x in ranks[0]['losses']]}")
    torch.set_num_threads(1)  # the same kernels as in the workers
    start = time.perf_counter()
    single = run_single(samples, args.lr)
    print(f"single process: {time.perf_counter() - start:.1f} s, loss {float(single['loss']):.5f}")

    grad_diff, grad_key = max_rel_diff(ranks[0]["grads"], single["grads"])
    state_diff, state_key = max_rel_diff(ranks[0]["state"], single["state"])
    rank_diff, _ = max_rel_diff(ranks[-1]["grads"], ranks[0]["grads"])
    mean_loss = torch.stack(ranks[0]["losses"]).mean().item()
    print(f"gradients, DDP vs single process: max relative difference {grad_diff:.2e} "
          f"({grad_key}); {len(single['grads'])} parameters")
    print(f"weights after the step: {state_diff:.2e} ({state_key}); ranks agree to "
          f"{rank_diff:.2e}; mean worker loss {mean_loss:.6f} vs {float(single['loss']):.6f}")
    return {"grad_diff": grad_diff, "state_diff": state_diff, "rank_diff": rank_diff,
            "ranks": ranks, "single": single}


if __name__ == "__main__":
    main()
