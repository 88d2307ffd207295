"""Height compression: the encoded sparse tensor as a dense bird's-eye-view feature map."""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import nn


class HeightCompression(nn.Module):
    """Stacks the z layers of the encoded tensor into channels (OpenPCDet's
    ``HeightCompression``): ``[B, C, D, H, W]`` -> ``[B, C * D, H, W]``, channel
    ``c * D + d`` holding channel ``c`` of z layer ``d``.

    Args:
        num_bev_features: expected ``C * D`` (256 for SECOND on KITTI: 128 channels x 2
            layers); checked when given.

    Example:
        >>> import torch, spconv_lite.pytorch as spconv
        >>> site = torch.tensor([[0, 1, 5, 7]], dtype=torch.int32)
        >>> x = spconv.SparseConvTensor(torch.ones(1, 128), site, [2, 200, 176], batch_size=1)
        >>> HeightCompression(256)(x).shape
        torch.Size([1, 256, 200, 176])
    """

    def __init__(self, num_bev_features: Optional[int] = None) -> None:
        super().__init__()
        if num_bev_features is not None:
            try:  # ints, numpy ints; not bools, floats or OpenPCDet's model_cfg dict
                count = operator.index(num_bev_features)
            except TypeError:
                count = None
            if count is None or isinstance(num_bev_features, bool) or count < 1:
                raise TypeError(
                    "num_bev_features must be a positive int (OpenPCDet's model_cfg "
                    f"NUM_BEV_FEATURES), got {num_bev_features!r}"
                )
            num_bev_features = count
        self.num_bev_features = num_bev_features

    def forward(self, encoded_spconv_tensor) -> torch.Tensor:
        if len(encoded_spconv_tensor.spatial_shape) != 3:
            raise ValueError(
                "HeightCompression needs a 3-D tensor (spatial_shape [D, H, W]), got "
                f"spatial_shape {list(encoded_spconv_tensor.spatial_shape)}"
            )
        dense = encoded_spconv_tensor.dense()
        n, c, d, h, w = dense.shape
        if self.num_bev_features is not None and c * d != self.num_bev_features:
            raise ValueError(
                f"HeightCompression expects {self.num_bev_features} BEV channels but the encoded "
                f"tensor has {c} channels x {d} z layers = {c * d} (spatial_shape "
                f"{list(encoded_spconv_tensor.spatial_shape)})"
            )
        return dense.view(n, c * d, h, w)
