"""Pieces shared by the model files: the layer namespace and the default norm layer."""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Callable, Optional, Sequence

import numpy as np
from torch import nn

NormFn = Callable[[int], nn.Module]


def namespace(spconv: Optional[ModuleType]) -> ModuleType:
    """The module the layers come from: ``spconv_lite.pytorch`` unless another one (with the
    same names, such as ``spconv.pytorch``) is given."""
    if spconv is None:
        from .. import pytorch

        return pytorch
    return spconv


def default_norm(norm_fn: Optional[NormFn]) -> NormFn:
    """OpenPCDet's norm layer: BatchNorm1d with eps 1e-3 and momentum 0.01."""
    return partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01) if norm_fn is None else norm_fn


def sparse_shape(grid_size: Sequence[int]) -> list[int]:
    """The conv grid of a voxel grid: ``grid_size`` is (x, y, z) as in OpenPCDet; the sparse
    tensors are (z, y, x) with one extra z layer, so that the z size (41 for KITTI) reaches
    the 2 layers of the BEV map after 8x downsampling."""
    grid = np.asarray(grid_size, dtype=np.int64).reshape(-1)
    if grid.shape != (3,) or (grid < 1).any():
        raise ValueError(f"grid_size must be 3 positive sizes (x, y, z), got {grid.tolist()}")
    return (grid[::-1] + np.array([1, 0, 0])).tolist()


def batch_dict(encoded, x_conv1, x_conv2, x_conv3, x_conv4) -> dict:
    """OpenPCDet's ``batch_dict`` entries of an 8x sparse encoder."""
    return {
        "encoded_spconv_tensor": encoded,
        "encoded_spconv_tensor_stride": 8,
        "multi_scale_3d_features": {
            "x_conv1": x_conv1, "x_conv2": x_conv2, "x_conv3": x_conv3, "x_conv4": x_conv4,
        },
        "multi_scale_3d_strides": {"x_conv1": 1, "x_conv2": 2, "x_conv3": 4, "x_conv4": 8},
    }
