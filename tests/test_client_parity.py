"""Parity with spconv 2.3.8 of the client stacks beyond OpenPCDet's SECOND family, each written
here the way the client uses spconv (machinery and metric: tests/parity.py):

- OpenPCDet's VoxelNeXt (both kernel-size configurations): levels 5 and 6 scaled back onto
  level 4's grid by editing ``indices`` in place, features and indices concatenated and
  assigned one after the other, the z axis summed away with ``unique`` + ``index_add_``, 2D
  sparse convs, and head convs (1x1 ``SubMConv2d`` among them) reusing keys across heads;
- Pointcept's SpUNet, whose 1x1 layers spconv 2.x computes as
  ``features @ weight.view(C_in, C_out)``, and single 1x1 layers of every kind;
- mmdetection3d's replacement of ``SparseModule._load_from_state_dict`` that loads spconv 1.x
  checkpoints;
- OpenPCDet's data pipeline: ``spconv.utils.Point2VoxelCPU3d`` fed with cumm tensors;
- all of them through ``python -m spconv_lite.as_spconv`` in a fresh process, where the client
  code imports ``spconv`` itself.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import lidar_file, num_threads, require, require_spconv
from lidar_data import KITTI_POINT_RANGE, KITTI_VOXEL_SIZE
from parity import (
    TOLERANCE,
    client_model,
    frame,
    load_spconv_checkpoint,
    randomize,
    rel_err,
    report,
    run_both,
    saved_and_loaded,
)

import spconv_lite.pytorch as spconv_lite_pytorch
from spconv_lite.models import VoxelBackBone8x

pytestmark = pytest.mark.parity

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _forward(features, coords, batch_size):
    return lambda model: model(model.input_tensor(features, coords, batch_size))


@lru_cache(maxsize=None)
def spconv_reference(name: str, frame_name: str):
    """spconv's checkpoint and outputs of a client model on a frame (computed once)."""
    spconv_ref = require_spconv()
    features, coords, batch_size, grid = frame(frame_name)
    theirs = client_model(name, spconv_ref, grid)
    randomize(theirs, seed=len(name) + len(frame_name))
    ours = client_model(name, spconv_lite_pytorch, grid)
    load_spconv_checkpoint(ours, theirs)
    out_ours, out_ref = run_both(ours, theirs, spconv_ref, _forward(features, coords, batch_size))
    return saved_and_loaded(theirs.state_dict()), out_ref, out_ours


def _check(capsys, title, out_ours, out_ref):
    assert out_ours.keys() == out_ref.keys()
    errors = {key: rel_err(out_ours[key], out_ref[key]) for key in out_ref}
    report(capsys, title, errors, {k: v.indices.shape[0] for k, v in out_ref.items()})
    assert max(errors.values()) < TOLERANCE, errors


# name, frame: each VoxelNeXt configuration on its dataset's frame.
MODEL_CASES = [("voxelnext", "nuscenes"), ("voxelnext_waymo_large", "waymo"),
               ("spunet", "semantickitti")]


@pytest.mark.parametrize("name,frame_name", MODEL_CASES, ids=[f"{n}-{f}" for n, f in MODEL_CASES])
def test_client_model_parity(name, frame_name, capsys):
    _, out_ref, out_ours = spconv_reference(name, frame_name)
    _check(capsys, f"{name} {frame_name}", out_ours, out_ref)


def test_spunet_has_spconv_1x1_layers():
    """The SpUNet case is only a check of 1x1 weights if spconv runs some layers as 1x1."""
    spconv_ref = require_spconv()
    model = client_model("spunet", spconv_ref, None)
    names = [n for n, m in model.named_modules() if getattr(m, "conv1x1", False)]
    assert names == ["net.dec.0.block0.proj.0", "net.dec.1.block0.proj.0",
                     "net.dec.2.block0.proj.0", "net.dec.3.block0.proj.0", "net.final"]


# ------------------------------------------------------------------------ single 1x1 layers

# Every layer kind with a kernel of volume 1. spconv runs all but the strided one as a matrix
# product on the weight's memory viewed as [C_in, C_out] ("conv1x1"); the strided one goes
# through its kernel-map path and reads the weight as [C_out, C_in].
LAYERS_1X1 = {
    "subm": lambda sp: sp.SubMConv3d(4, 6, 1, bias=False),
    "subm-padding-bias": lambda sp: sp.SubMConv3d(4, 6, 1, padding=1, bias=True),  # Pointcept
    "subm-keyed": lambda sp: sp.SubMConv3d(4, 6, (1, 1, 1), bias=False, indice_key="k1"),
    "conv": lambda sp: sp.SparseConv3d(4, 6, 1, bias=False),
    "transposed": lambda sp: sp.SparseConvTranspose3d(4, 6, 1, bias=False),
    "strided": lambda sp: sp.SparseConv3d(4, 6, 1, stride=2, bias=False),
}


@pytest.mark.parametrize("kind", list(LAYERS_1X1))
def test_1x1_layer_parity(kind, capsys):
    spconv_ref = require_spconv()
    features, coords, batch_size, grid = frame("kitti_000008")
    theirs, ours = LAYERS_1X1[kind](spconv_ref), LAYERS_1X1[kind](spconv_lite_pytorch)
    assert ours.conv1x1 == theirs.conv1x1 == (kind != "strided")
    randomize(theirs, seed=7)
    load_spconv_checkpoint(ours, theirs)
    shape = [grid[2] + 1, grid[1], grid[0]]

    def forward(layer):
        tensor_type = getattr(spconv_ref if layer is theirs else spconv_lite_pytorch,
                              "SparseConvTensor")
        return {"out": layer(tensor_type(features, coords, shape, batch_size))}

    out_ours, out_ref = run_both(ours, theirs, spconv_ref, forward)
    _check(capsys, f"1x1 {kind}", out_ours, out_ref)


# ------------------------------------------- mmdetection3d's loader for spconv 1.x checkpoints

def mmdet3d_style_loader(module, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs):
    """Our rendition of how mmdetection3d loads spconv 1.x checkpoints: it replaces
    ``SparseModule._load_from_state_dict`` (and sets ``SparseModule._version = 2``) with a
    loader that moves the last axis of every tensor of a module whose checkpoint entry is not
    marked version 2 to the front (``[*k, C_in, C_out]`` -> ``[C_out, *k, C_in]``), then copies
    it into the module's own tensor."""
    for hook in module._load_state_dict_pre_hooks.values():
        hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
             error_msgs)
    old_layout = local_metadata.get("version") != 2
    own = {name: t for name, t in [*module._parameters.items(), *module._buffers.items()]
           if t is not None}
    for name, tensor in own.items():
        key = prefix + name
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            continue
        value = state_dict[key]
        if old_layout:
            value = value.permute(value.dim() - 1, *range(value.dim() - 1))
        if value.shape != tensor.shape:
            error_msgs.append(f"size mismatch for {key}: {list(value.shape)} in the checkpoint, "
                              f"{list(tensor.shape)} in the model")
            continue
        with torch.no_grad():
            tensor.copy_(value)
    if strict:
        for key in state_dict:
            head = key[len(prefix):].split(".", 1)[0] if key.startswith(prefix) else None
            if head is not None and head not in module._modules and head not in own:
                unexpected_keys.append(key)


def test_mmdet3d_spconv1_checkpoint_loader(monkeypatch, capsys):
    """An spconv 1.x checkpoint (``[*k, C_in, C_out]`` weights, version-1 metadata) loads
    through mmdetection3d's patched loader into spconv_lite as into spconv 2.3.8, strictly, with
    the same outputs; without the patch, spconv_lite refuses it and names the converter."""
    spconv_ref = require_spconv()
    features, coords, batch_size, grid = frame("kitti_000008")
    theirs = VoxelBackBone8x(4, grid, spconv=spconv_ref)
    randomize(theirs, seed=11)
    state = theirs.state_dict()
    old = OrderedDict((key, value.permute(*range(1, value.dim()), 0).contiguous()
                       if value.dim() == 5 else value) for key, value in state.items())
    old._metadata = state._metadata
    old = saved_and_loaded(old)
    ours = VoxelBackBone8x(4, grid)
    with pytest.raises(RuntimeError, match=r"fits the spconv1 layout.*convert_state_dict"):
        ours.load_state_dict(old)

    for library in (spconv_ref, spconv_lite_pytorch):
        monkeypatch.setattr(library.SparseModule, "_load_from_state_dict", mmdet3d_style_loader)
        monkeypatch.setattr(library.SparseModule, "_version", 2)
    theirs.load_state_dict(old, strict=True)
    ours.load_state_dict(old, strict=True)
    for key, value in state.items():
        assert torch.equal(ours.state_dict()[key], value), key
    out_ours, out_ref = run_both(ours, theirs, spconv_ref, _forward(features, coords, batch_size))
    _check(capsys, "mmdet3d spconv1 checkpoint", {"encoded": out_ours["encoded_spconv_tensor"]},
           {"encoded": out_ref["encoded_spconv_tensor"]})


# ------------------------------------------------------- OpenPCDet's data pipeline voxelizer

# OpenPCDet's KITTI voxelization (SECOND): 0.05 x 0.05 x 0.1 m, 5 points per voxel; 16000
# voxels in training, so the frame (41281 voxels) is cut short.
P2V_ARGS = dict(vsize_xyz=KITTI_VOXEL_SIZE, coors_range_xyz=KITTI_POINT_RANGE,
                num_point_features=4, max_num_points_per_voxel=5, max_num_voxels=16000)
P2V_FRAME = "kitti_object_training_000000.bin"


def _cumm():
    try:
        from cumm import tensorview as tv
    except ImportError:
        require(False, "cumm is not installed (it comes with spconv)")
    return tv


@lru_cache(maxsize=None)
def spconv_point_to_voxel(file: str) -> tuple:
    """spconv's ``Point2VoxelCPU3d`` output on a frame, as numpy arrays."""
    require_spconv()
    tv = _cumm()
    from spconv.utils import Point2VoxelCPU3d

    points = np.fromfile(lidar_file(file), dtype=np.float32).reshape(-1, 4)
    with num_threads(1):
        outputs = Point2VoxelCPU3d(**P2V_ARGS).point_to_voxel(tv.from_numpy(points))
    return tuple(t.numpy() for t in outputs)


@pytest.mark.parametrize("kind", ["cumm", "numpy", "torch"])
def test_point2voxel_cpu3d_matches_spconv(kind):
    from spconv_lite.as_spconv.utils import Point2VoxelCPU3d

    expected = spconv_point_to_voxel(P2V_FRAME)
    points = np.fromfile(lidar_file(P2V_FRAME), dtype=np.float32).reshape(-1, 4)
    given = {"cumm": lambda: _cumm().from_numpy(points), "numpy": lambda: points,
             "torch": lambda: torch.from_numpy(points)}[kind]()
    outputs = Point2VoxelCPU3d(**P2V_ARGS).point_to_voxel(given)
    assert all(type(t) is type(given) for t in outputs)
    assert len(expected[0]) == P2V_ARGS["max_num_voxels"]
    for got, want in zip(outputs, expected):
        got = got if isinstance(got, np.ndarray) else got.numpy()
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# --------------------------------------------- the clients, unmodified, in a fresh process

# Written the way the clients use spconv; runs under `python -m spconv_lite.as_spconv`, so
# every `spconv` import below resolves to spconv_lite. Arguments: output file, checkpoint
# folder, LiDAR frame for the voxelizer.
CLIENT_SCRIPT = r'''
import importlib.util
import sys

import numpy as np
import torch

# mmdetection3d: the spconv 2.x gate, then its layer registry imports.
import spconv
assert hasattr(spconv, "__version__") and spconv.__version__ >= "2.0.0"
assert tuple(int(v) for v in spconv.__version__.split(".")) >= (2, 0, 0)
from spconv.pytorch import (SparseConv2d, SparseConv3d, SparseConv4d, SparseConvTranspose2d,
                            SparseConvTranspose3d, SparseInverseConv2d, SparseInverseConv3d,
                            SparseModule, SubMConv2d, SubMConv3d, SubMConv4d)
from spconv.pytorch import SparseConvTensor, SparseSequential

# OpenPCDet's pcdet/utils/spconv_utils.py.
if float(spconv.__version__[2:]) >= 2.2:
    spconv.constants.SPCONV_USE_DIRECT_TABLE = False
import spconv.pytorch as spconv

# CenterPoint: finds spconv by spec, then imports the 2.x layer names and ops.
assert importlib.util.find_spec("spconv") is not None
from spconv.pytorch import ops
from spconv.pytorch import SparseConv3d, SubMConv3d

import spconv_lite
assert spconv.SubMConv3d is spconv_lite.SubMConv3d, spconv.SubMConv3d
assert not any(getattr(m, "__file__", None) and "site-packages/spconv/" in m.__file__
               for m in list(sys.modules.values())), "the real spconv was imported"

out_file, checkpoints, lidar_frame = sys.argv[1:4]
results = {}

# Pointcept / OpenPCDet models on real frames, from spconv checkpoints, strictly.
from parity import client_model, frame

for name, frame_name in [("spunet", "semantickitti"), ("voxelnext_waymo_large", "waymo")]:
    features, coords, batch_size, grid = frame(frame_name)
    model = client_model(name, spconv, grid)
    keys = {n for n, m in model.named_modules() if isinstance(m, spconv.conv.SparseConvolution)}
    assert keys, "OpenPCDet's find_all_spconv_keys would find no layer"
    state = torch.load(f"{checkpoints}/{name}.pth", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        outputs = model(model.input_tensor(features, coords, batch_size))
    for key, tensor in outputs.items():
        results[f"{name}/{key}/indices"] = tensor.indices.numpy()
        results[f"{name}/{key}/features"] = tensor.features.numpy()

# OpenPCDet's data processor: spconv 1.x voxel generators first, then spconv 2.x's.
from cumm import tensorview as tv
try:
    from spconv.utils import VoxelGeneratorV2 as VoxelGenerator
    raise AssertionError("spconv.utils.VoxelGeneratorV2 exists")
except ImportError:
    try:
        from spconv.utils import VoxelGenerator
        raise AssertionError("spconv.utils.VoxelGenerator exists")
    except ImportError:
        from spconv.utils import Point2VoxelCPU3d as VoxelGenerator
generator = VoxelGenerator(vsize_xyz=[0.05, 0.05, 0.1], coors_range_xyz=[0, -40, -3, 70.4, 40, 1],
                           num_point_features=4, max_num_points_per_voxel=5,
                           max_num_voxels=16000)
points = np.fromfile(lidar_frame, dtype=np.float32).reshape(-1, 4)
voxels, coordinates, num_points = generator.point_to_voxel(tv.from_numpy(points))
results["voxels"], results["coordinates"] = voxels.numpy(), coordinates.numpy()
results["num_points"] = num_points.numpy()
np.savez(out_file, **results)
print("spconv is", sys.modules["spconv"].__file__)
'''


def test_clients_run_unmodified_through_as_spconv(tmp_path, capsys):
    import subprocess

    references = {name: spconv_reference(name, frame_name)
                  for name, frame_name in [("spunet", "semantickitti"),
                                           ("voxelnext_waymo_large", "waymo")]}
    for name, (state, _, _) in references.items():
        torch.save(state, tmp_path / f"{name}.pth")
    voxels_ref = spconv_point_to_voxel(P2V_FRAME)
    (tmp_path / "client.py").write_text(textwrap.dedent(CLIENT_SCRIPT))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), str(REPO / "examples")])}
    done = subprocess.run(
        [sys.executable, "-m", "spconv_lite.as_spconv", "client.py", str(tmp_path / "out.npz"),
         str(tmp_path), str(lidar_file(P2V_FRAME))],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"spconv is {REPO / 'spconv_lite' / 'as_spconv' / '__init__.py'}" in done.stdout
    results = np.load(tmp_path / "out.npz")
    for name, (_, out_ref, _) in references.items():
        ours = {key: SimpleNamespace(indices=torch.from_numpy(results[f"{name}/{key}/indices"]),
                                     features=torch.from_numpy(results[f"{name}/{key}/features"]))
                for key in out_ref}
        _check(capsys, f"{name} through spconv_lite.as_spconv", ours, out_ref)
    for key, want in zip(["voxels", "coordinates", "num_points"], voxels_ref):
        np.testing.assert_array_equal(results[key], want)
