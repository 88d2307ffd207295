"""Deploying without Python: a model built from spconv_lite layers as an AOTInductor package.

:func:`export_model` traces a model that takes a ``SparseConvTensor`` with ``torch.export``
(the spconv_lite operators are PyTorch dispatcher operators with fake kernels, so they trace
like any ATen op), compiles it with AOTInductor and writes one ``.pt2`` file. The package takes
two tensors, ``features [N, C]`` and ``indices [N, D + 1]`` int32 (batch index, then z, y, x),
with the site count ``N`` dynamic; the spatial shape and the batch size are fixed at export
(the operators take them as plain ints). It runs

* from Python: :func:`load_package` (``torch._inductor.aoti_load_package``);
* from C++: ``torch::inductor::AOTIModelPackageLoader``, with ``libspconv_lite_ops`` (the
  operators without Python, built by the repository's ``CMakeLists.txt``) linked in; see
  ``examples/cpp/run_backbone.cpp`` and the README section "Deploying without Python".

Example:
    >>> import spconv_lite as sp
    >>> from spconv_lite.models import HeightCompression, VoxelBackBone8x
    >>> net = BEVBackbone(VoxelBackBone8x(4, [1408, 1600, 40]), HeightCompression(256)).eval()
    >>> voxelizer = sp.PointToVoxel([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], 4, 150000, 5)
    >>> example = sp.batch_point_clouds([points], voxelizer)  # doctest: +SKIP
    >>> export_model(net, example, "second_bev.pt2", voxelizer=voxelizer)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._extension import _C  # noqa: F401  (the operators must be registered to trace and to run)
from .tensor import SparseConvTensor
from .voxelize import PointToVoxel

__all__ = ["BEVBackbone", "ExportError", "SparseInputModel", "export_model", "load_package"]

# Keys of the package metadata (strings) that export_model writes, all prefixed "spconv_lite.".
_META = "spconv_lite."


class ExportError(RuntimeError):
    """The model cannot be exported as a package that is correct for every input."""


class BEVBackbone(nn.Module):
    """A 3D backbone that returns OpenPCDet's batch dict (``VoxelBackBone8x``,
    ``VoxelResBackBone8x``) followed by ``HeightCompression``: a sparse tensor in, the dense
    bird's-eye-view map ``[B, C * D, H, W]`` out.

    Args:
        backbone: module whose output dict holds ``encoded_spconv_tensor``.
        to_bev: the dense map of that tensor (``HeightCompression``).
    """

    def __init__(self, backbone: nn.Module, to_bev: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.to_bev = to_bev

    def forward(self, x: SparseConvTensor) -> Tensor:
        return self.to_bev(self.backbone(x)["encoded_spconv_tensor"])


class SparseInputModel(nn.Module):
    """``model`` with tensors in and out, as ``torch.export`` wants: ``forward(features,
    indices)`` builds the ``SparseConvTensor`` on the fixed ``spatial_shape`` and
    ``batch_size`` and returns the model's outputs as a flat tuple of tensors (a
    ``SparseConvTensor`` output becomes its ``features`` then its ``indices``).
    """

    def __init__(self, model: nn.Module, spatial_shape: list[int], batch_size: int) -> None:
        super().__init__()
        self.model = model
        self.spatial_shape = list(spatial_shape)
        self.batch_size = int(batch_size)

    def forward(self, features: Tensor, indices: Tensor) -> tuple[Tensor, ...]:
        x = SparseConvTensor(features, indices, self.spatial_shape, self.batch_size)
        return flatten_outputs(self.model(x))


def flatten_outputs(output) -> tuple[Tensor, ...]:
    """A model output (a tensor, a ``SparseConvTensor``, or a tuple / list of them) as a flat
    tuple of tensors; raises :class:`ExportError` for anything else."""
    if isinstance(output, Tensor):
        return (output,)
    if isinstance(output, SparseConvTensor):
        return (output.features, output.indices)
    if isinstance(output, (tuple, list)):
        return tuple(t for item in output for t in flatten_outputs(item))
    hint = (
        " (a backbone that returns a batch dict: export BEVBackbone(backbone, "
        "HeightCompression(...)), or a module that picks the tensors to keep)"
        if isinstance(output, dict)
        else ""
    )
    raise ExportError(
        "the model must return a Tensor, a SparseConvTensor or a tuple of them, got "
        f"{type(output).__name__}{hint}"
    )


def export_model(
    model: nn.Module,
    example: SparseConvTensor,
    package_path: Union[str, os.PathLike],
    *,
    voxelizer: Optional[PointToVoxel] = None,
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Exports ``model`` (eval mode, the example's device) as an AOTInductor package.

    The package's inputs are ``features [N, C]`` and ``indices [N, D + 1]`` int32 for any site
    count ``N``; its outputs are the model's (see :class:`SparseInputModel`). The spatial shape
    and the batch size are the example's, fixed in the package: export once per batch size.

    Args:
        model: a module that takes a ``SparseConvTensor`` (e.g. :class:`BEVBackbone`).
        example: an input of the kind the package will get (its sites and features are only
            used to trace; any count of at least 2 works, and the package then takes any count
            from 1).
        package_path: the ``.pt2`` file to write (replaced only once complete).
        voxelizer: the ``PointToVoxel`` that makes the model's inputs; its grid and limits are
            stored in the package (``spconv_lite.voxel_size`` ...) for the C++ example.
        metadata: more string entries to store in the package (C++:
            ``AOTIModelPackageLoader::get_metadata()``).

    Returns:
        The path of the package.

    Raises:
        ExportError: the model cannot become a package that is right for every input: it
            returns something other than tensors / sparse tensors, reads tensors that are
            neither inputs nor parameters or buffers (which would be frozen into the package,
            e.g. kernel maps kept in a Python attribute across calls), fixes the site count, or
            fails to trace (the message names torch.export's reason).
    """
    if not isinstance(example, SparseConvTensor):
        raise TypeError(f"example must be a SparseConvTensor, got {type(example).__name__}")
    if example.indices.shape[0] < 2:
        # torch.export takes a dimension of size 0 or 1 for a constant of the model.
        raise ValueError(
            f"example must have at least 2 sites to trace the site count as dynamic, got "
            f"{example.indices.shape[0]} (the package still takes any count from 1)"
        )
    if model.training:
        raise ExportError(
            "the model is in training mode: call model.eval() first (the package is for "
            "inference; BatchNorm must use its running statistics)"
        )
    entries = {**_grid_metadata(example, voxelizer), **(metadata or {})}
    bad = [k for k, v in entries.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"metadata keys and values must be strings, got {bad}")
    wrapper = SparseInputModel(model, example.spatial_shape, example.batch_size).eval()
    features, indices = example.features.detach(), example.indices
    with torch.no_grad():
        # Eagerly first: an example the model cannot take (another dtype, channel count or
        # device) raises here as the layer names it, rather than as a tracing failure or as a
        # package that takes nothing.
        wrapper(features.clone(), indices.clone())  # a model may edit its input in place
    sites = torch.export.Dim("num_sites", min=1)
    try:
        program = torch.export.export(
            wrapper, (features, indices), dynamic_shapes=({0: sites}, {0: sites})
        )
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001  (torch.export raises many kinds; name the reason)
        reason = " ".join(str(exc).split())[:2000]
        cause = "torch.export could not trace the model with a dynamic site count"
        if "data-dependent expression" in reason:
            cause = (
                "the model branches in Python on a value computed from the input's data, which "
                "a package cannot do (spconv_lite.functional.sparse_add / AddTableMisaligned "
                "do: the row order of their result depends on the sites; add tensors on the "
                "same sites with x + y or AddTable instead)"
            )
        elif "specialized it to be a constant" in reason:
            cause = (
                f"the model fixes the number of sites to the example's {features.shape[0]}, so "
                "the package would accept no other cloud (common causes: a kernel map kept "
                "across calls, e.g. a reused indice_dict, or Python code that branches on the "
                "row count)"
            )
        raise ExportError(f"{cause}. torch.export says: {type(exc).__name__}: {reason}") from exc
    _check_no_frozen_tensors(program)

    path = Path(package_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.pt2")
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": entries}
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_no_frozen_tensors(program: torch.export.ExportedProgram) -> None:
    """Tensors the model reads that are neither inputs nor parameters / buffers become
    constants of the package: the answer of the example, frozen. Refuse them."""
    frozen = list(program.graph_signature.lifted_tensor_constants)
    if frozen:
        raise ExportError(
            f"the model reads tensors that are not inputs, parameters or buffers: {frozen}. "
            "They would be frozen into the package with their values at export (for example "
            "kernel maps or sites kept in a Python attribute or a shared indice_dict across "
            "calls); compute them inside forward from the input, or register real constants "
            "as buffers"
        )


def _grid_metadata(example: SparseConvTensor, voxelizer: Optional[PointToVoxel]) -> dict:
    """What the C++ side needs to make inputs: the input layout and the voxel grid."""
    entries = {
        "spatial_shape": example.spatial_shape,
        "batch_size": [example.batch_size],
        "input_channels": [example.features.shape[1]],
    }
    if voxelizer is not None:
        grid = voxelizer.geometry
        fits = all(g <= s for g, s in zip(grid.spatial_shape, example.spatial_shape))
        if len(grid.spatial_shape) != len(example.spatial_shape) or not fits:
            raise ValueError(
                f"the voxelizer's grid (z, y, x) {grid.spatial_shape} does not fit the "
                f"example's spatial_shape {example.spatial_shape}"
            )
        if voxelizer.num_point_features != example.features.shape[1]:
            # The C++ example feeds each voxel the mean of its points' features.
            raise ValueError(
                f"the voxelizer's num_point_features {voxelizer.num_point_features} differs "
                f"from the example's input channels {example.features.shape[1]}"
            )
        entries.update(
            voxel_size=grid.voxel_size,
            range_min=grid.range_min,
            grid_size=grid.grid_size,
            max_points_per_voxel=[voxelizer.max_num_points_per_voxel],
            max_voxels=[voxelizer.max_num_voxels],
            num_point_features=[voxelizer.num_point_features],
        )
    # repr of a Python float is exact, so C++ parses back the very float32 values.
    return {_META + key: " ".join(repr(v) for v in values) for key, values in entries.items()}


def load_package(package_path: Union[str, os.PathLike]):
    """Loads a package written by :func:`export_model` into this process: a callable
    ``(features, indices) -> list of tensors``; ``.get_metadata()`` gives its metadata."""
    path = Path(package_path)
    if not path.is_file():
        raise FileNotFoundError(f"package_path {str(path)!r} is not a file")
    return torch._inductor.aoti_load_package(str(path))
