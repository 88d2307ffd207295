"""Detection backbone: point cloud file -> voxels -> VoxelBackBone8x -> bird's-eye-view map.

The front end of SECOND / PV-RCNN as OpenPCDet runs it on KITTI: points inside
[0, 70.4] x [-40, 40] x [-3, 1] m, 0.05 x 0.05 x 0.1 m voxels (mean of the points per voxel),
``spconv_lite.models.VoxelBackBone8x`` (8x downsampling, 128 channels) and
``HeightCompression`` (2 z layers x 128 channels -> a 256-channel BEV map of 200 x 176 cells).
It prints the time of every stage and writes a picture of the BEV features (the L2 norm of
each cell's 256 features) as a PNG.

Without ``--checkpoint`` the weights are random (the picture then shows where the network
sees points, not what it learnt). ``--checkpoint`` loads the 3D-backbone part
(``backbone_3d.*``) of an OpenPCDet SECOND / PV-RCNN checkpoint; ``--source`` converts the
conv weights of checkpoints saved with spconv 1.x or 2.0/2.1.

Run from the repository root:

    python examples/detection_backbone.py [--file PATH [--point-dims C]] [--out bev.png]
        [--threads 2]

``--file`` reads any format the ``spconv-lite`` command reads (``spconv_lite.io``), with the
same one-line errors; the backbone takes its first 4 columns (x, y, z, intensity; zeros where
a file has fewer).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lidar_data import (
    KITTI_POINT_RANGE,
    KITTI_VOXEL_SIZE,
    crop,
    data_dir,
    voxelize,
)

from spconv_lite.checkpoint import convert_state_dict
from spconv_lite.cli import CommandError, heat_colours, png_bytes, read_input
from spconv_lite.models import HeightCompression, VoxelBackBone8x

INPUT_CHANNELS = 4  # x, y, z, intensity, as OpenPCDet's KITTI models


def write_png(path: Path, image: np.ndarray) -> None:
    """Writes an ``[H, W, 3]`` uint8 image as an RGB PNG."""
    path.write_bytes(png_bytes(image))


def backbone_columns(points: np.ndarray) -> np.ndarray:
    """The first 4 columns of ``points``, zeros where it has fewer."""
    out = np.zeros((len(points), INPUT_CHANNELS), dtype=np.float32)
    columns = min(points.shape[1], INPUT_CHANNELS)
    out[:, :columns] = points[:, :columns]
    return out


def bev_picture(bev: torch.Tensor, scale: int = 3) -> np.ndarray:
    """An RGB picture of one BEV map ``[C, H, W]``: the L2 norm of each cell's features on a
    dark-blue -> yellow ramp (log-scaled), x (forward) pointing up, empty cells black."""
    norm = bev.norm(dim=0).numpy()
    nonzero = norm[norm > 0]
    typical = float(np.median(nonzero)) if nonzero.size else 1.0
    value = np.log1p(norm / typical)
    value = value / max(float(value.max()), 1e-12)
    rgb = heat_colours(value)
    rgb[norm == 0] = 0
    # The map is [y, x]; show x (forward) pointing up and y (left) pointing left, as seen
    # from above: image row = far-to-near x, image column = left-to-right (-y).
    rgb = rgb.transpose(1, 0, 2)[::-1, ::-1]
    rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.ascontiguousarray(rgb.astype(np.uint8))


def load_openpcdet_backbone(model: torch.nn.Module, path: Path, source: str) -> None:
    """Loads ``backbone_3d.*`` of an OpenPCDet checkpoint (``{"model_state": ...}``) or a plain
    state dict of the backbone."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state", checkpoint)
    prefix = "backbone_3d."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(convert_state_dict(state, model, source=source))


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog=Path(__file__).name,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=None,
                        help="point cloud: .bin, .pcd.bin, .npy, .npz, .pcd or .ply (default: "
                        "the KITTI frame 000000)")
    parser.add_argument("--point-dims", type=int, default=None, metavar="C",
                        help="float32 columns of a raw .bin --file (default 4)")
    parser.add_argument("--out", type=Path, default=Path("bev_features.png"))
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--source", default="spconv2.2",
                        help="spconv version that saved --checkpoint: spconv1, spconv2.0, "
                        "spconv2.1 or spconv2.2")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed backbone runs first (one-time allocations, caches)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = args.file or data_dir() / "kitti_object_training_000000.bin"

    times: dict[str, float] = {}

    def timed(name, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        times[name] = time.perf_counter() - start
        return result

    try:
        points, _ = timed("read", read_input, path, args.point_dims)
    except CommandError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    points = backbone_columns(points)
    points, _ = timed("crop", crop, points, KITTI_POINT_RANGE)
    voxels = timed("voxelize", voxelize, points, KITTI_VOXEL_SIZE, KITTI_POINT_RANGE)

    backbone = VoxelBackBone8x(4, voxels.grid_size)
    if args.checkpoint:
        load_openpcdet_backbone(backbone, args.checkpoint, args.source)
    backbone.eval()
    to_bev = HeightCompression(num_bev_features=256)

    with torch.no_grad():
        for _ in range(args.warmup):
            backbone(backbone.input_tensor(voxels.features, voxels.batch_coords(), 1))

    # Time every top-level stage of the backbone with forward hooks (no copy of its forward).
    stage_start: dict[str, float] = {}
    for name, child in backbone.named_children():
        child.register_forward_pre_hook(
            lambda m, i, name=name: stage_start.__setitem__(name, time.perf_counter()))
        child.register_forward_hook(
            lambda m, i, o, name=name: times.__setitem__(
                f"backbone.{name}", time.perf_counter() - stage_start[name]))

    with torch.no_grad():
        x = timed("to SparseConvTensor", backbone.input_tensor, voxels.features,
                  voxels.batch_coords(), 1)
        out = timed("backbone (total)", backbone, x)
        bev = timed("height compression", to_bev, out["encoded_spconv_tensor"])
    picture = timed("picture", bev_picture, bev[0])
    timed("write png", write_png, args.out, picture)

    print(f"{path.name}: {len(voxels.point_voxel_id)} points in range -> "
          f"{len(voxels.features)} voxels, grid (x, y, z) {voxels.grid_size}, "
          f"sparse shape (z, y, x) {backbone.sparse_shape}")
    for name, tensor in out["multi_scale_3d_features"].items():
        print(f"  {name}: {tensor.features.shape[0]:6d} sites x {tensor.features.shape[1]:3d} "
              f"channels on {tensor.spatial_shape}")
    enc = out["encoded_spconv_tensor"]
    print(f"  encoded: {enc.features.shape[0]:6d} sites x {enc.features.shape[1]:3d} channels on "
          f"{enc.spatial_shape} -> BEV map {list(bev.shape)}, "
          f"{int((bev[0].abs().sum(0) > 0).sum())} non-empty cells")
    print(f"time per stage ({torch.get_num_threads()} threads, after {args.warmup} warm-up "
          "run(s) of the backbone):")
    for name, seconds in times.items():
        print(f"  {name:22s} {seconds * 1000:8.1f} ms")
    print(f"BEV picture ({picture.shape[1]} x {picture.shape[0]}) written to {args.out}")
    return {"bev": bev, "times": times, "voxels": voxels, "output": out}


if __name__ == "__main__":
    main()
