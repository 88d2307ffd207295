"""Sparse U-Net with inverse convs (OpenPCDet's ``UNetV2``, from PartA2).

The encoder is ``VoxelBackBone8x``'s (``conv_input``, ``conv1`` .. ``conv4``, optional
``conv_out``). The decoder climbs back level by level: at each level a residual block on the
encoder's lateral tensor (``conv_up_t*``), concatenation with the tensor coming from below,
a submanifold block (``conv_up_m*``) plus a channel-summed shortcut, then an inverse conv
(``inv_conv*``) that reuses the encoder's strided-conv kernel map to return exactly to the
sites of the level above. The result lives on the input voxels, in input order: per-voxel
features for segmentation.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import nn

from ._common import NormFn, default_norm, namespace, sparse_shape
from .backbones import SparseBasicBlock, plain_encoder_stages, post_act_block


class UNetV2(nn.Module):
    """Sparse U-Net, 16 output channels per input voxel.

    Args:
        input_channels: voxel feature channels.
        grid_size: voxel grid (x, y, z); the sparse grid is ``sparse_shape`` (z + 1, y, x).
        return_encoded_tensor: also build ``conv_out`` and return the stride-8 encoded
            tensor for a detection head (OpenPCDet's ``RETURN_ENCODED_TENSOR``, default on).
            Leave it off for segmentation only, so every parameter gets a gradient.
        last_pad, norm_fn, spconv: as :class:`VoxelBackBone8x`.
        voxel_size, point_cloud_range: the voxel grid in metres, (x, y, z) and (x_min, y_min,
            z_min, x_max, y_max, z_max), as OpenPCDet passes them; with both, the output also
            holds ``point_coords`` (each input voxel's centre, for PartA2's point heads).

    Example:
        >>> net = UNetV2(4, [64, 64, 40], return_encoded_tensor=False)
        >>> net.num_point_features
        16
    """

    def __init__(self, input_channels: int, grid_size: Sequence[int],
                 return_encoded_tensor: bool = True, last_pad=0,
                 norm_fn: Optional[NormFn] = None, spconv: Optional[ModuleType] = None,
                 voxel_size: Optional[Sequence[float]] = None,
                 point_cloud_range: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if (voxel_size is None) != (point_cloud_range is None):
            raise ValueError("voxel_size and point_cloud_range go together: give both or neither")
        if voxel_size is not None and (len(voxel_size) != 3 or len(point_cloud_range) != 6):
            raise ValueError(
                f"voxel_size needs 3 entries and point_cloud_range 6, got {list(voxel_size)} "
                f"and {list(point_cloud_range)}"
            )
        self.voxel_size = voxel_size
        self.point_cloud_range = point_cloud_range
        sp = namespace(spconv)
        self._tensor_type = sp.SparseConvTensor
        self.sparse_shape = sparse_shape(grid_size)
        norm_fn = default_norm(norm_fn)

        def block(*args, **kwargs):
            return post_act_block(*args, norm_fn=norm_fn, spconv=sp, **kwargs)

        def res(channels, key):
            return SparseBasicBlock(channels, channels, bias=False, norm_fn=norm_fn,
                                    indice_key=key, spconv=sp)

        (self.conv_input, self.conv1, self.conv2, self.conv3,
         self.conv4) = plain_encoder_stages(sp, input_channels, norm_fn)
        if return_encoded_tensor:
            self.conv_out = sp.SparseSequential(
                sp.SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1), padding=last_pad,
                                bias=False, indice_key="spconv_down2"),
                norm_fn(128),
                nn.ReLU(),
            )
        else:
            self.conv_out = None

        # Decoder: level 4 -> 3 -> 2 -> 1 (names as OpenPCDet's).
        self.conv_up_t4 = res(64, "subm4")
        self.conv_up_m4 = block(128, 64, 3, padding=1, indice_key="subm4")
        self.inv_conv4 = block(64, 64, 3, indice_key="spconv4", conv_type="inverseconv")
        self.conv_up_t3 = res(64, "subm3")
        self.conv_up_m3 = block(128, 64, 3, padding=1, indice_key="subm3")
        self.inv_conv3 = block(64, 32, 3, indice_key="spconv3", conv_type="inverseconv")
        self.conv_up_t2 = res(32, "subm2")
        self.conv_up_m2 = block(64, 32, 3, indice_key="subm2")
        self.inv_conv2 = block(32, 16, 3, indice_key="spconv2", conv_type="inverseconv")
        self.conv_up_t1 = res(16, "subm1")
        self.conv_up_m1 = block(32, 16, 3, indice_key="subm1")
        self.conv5 = sp.SparseSequential(block(16, 16, 3, padding=1, indice_key="subm1"))
        self.num_point_features = 16

    def input_tensor(self, voxel_features: torch.Tensor, voxel_coords: torch.Tensor,
                     batch_size: int):
        """The sparse input on ``sparse_shape`` (``voxel_coords``: ``[N, 4]`` batch, z, y, x)."""
        return self._tensor_type(voxel_features, voxel_coords.int(), self.sparse_shape,
                                 batch_size)

    @staticmethod
    def channel_reduction(x, out_channels: int):
        """Sums groups of ``C / out_channels`` consecutive channels (the decoder's shortcut)."""
        features = x.features
        n, in_channels = features.shape
        if in_channels % out_channels != 0 or in_channels < out_channels:
            raise ValueError(f"cannot reduce {in_channels} channels to {out_channels}")
        groups = in_channels // out_channels  # explicit: -1 cannot be inferred for 0 rows
        return x.replace_feature(features.view(n, out_channels, groups).sum(dim=2))

    def _up(self, x_lateral, x_bottom, conv_t, conv_m, conv_inv):
        x_trans = conv_t(x_lateral)
        x = x_trans.replace_feature(torch.cat((x_bottom.features, x_trans.features), dim=1))
        x_m = conv_m(x)
        x = self.channel_reduction(x, x_m.features.shape[1])
        x = x.replace_feature(x_m.features + x.features)
        return conv_inv(x)

    def forward(self, x) -> dict:
        """Runs the U-Net on a sparse tensor on ``sparse_shape``.

        Returns:
            A dict: ``point_tensor`` (the output on the input's sites, same row order, 16
            channels), ``point_features`` (its features), and with
            ``return_encoded_tensor`` also ``encoded_spconv_tensor`` and its stride (8); with
            ``voxel_size`` also ``point_coords`` ``[N, 4]`` float32: (batch, x, y, z) of each
            voxel's centre, as OpenPCDet's.
        """
        x = self.conv_input(x)
        x_conv1 = self.conv1(x)
        x_conv2 = self.conv2(x_conv1)
        x_conv3 = self.conv3(x_conv2)
        x_conv4 = self.conv4(x_conv3)
        result = {}
        if self.conv_out is not None:
            result["encoded_spconv_tensor"] = self.conv_out(x_conv4)
            result["encoded_spconv_tensor_stride"] = 8
        x_up4 = self._up(x_conv4, x_conv4, self.conv_up_t4, self.conv_up_m4, self.inv_conv4)
        x_up3 = self._up(x_conv3, x_up4, self.conv_up_t3, self.conv_up_m3, self.inv_conv3)
        x_up2 = self._up(x_conv2, x_up3, self.conv_up_t2, self.conv_up_m2, self.inv_conv2)
        x_up1 = self._up(x_conv1, x_up2, self.conv_up_t1, self.conv_up_m1, self.conv5)
        result["point_tensor"] = x_up1
        result["point_features"] = x_up1.features
        if self.voxel_size is not None:
            result["point_coords"] = self.voxel_centres(x_up1.indices)
        return result

    def voxel_centres(self, indices: torch.Tensor) -> torch.Tensor:
        """``[N, 4]`` float32 (batch, x, y, z) of the voxels ``indices`` (batch, z, y, x) name,
        computed in float32 as OpenPCDet's ``get_voxel_centers``."""
        options = {"dtype": torch.float32, "device": indices.device}
        size = torch.tensor(self.voxel_size, **options)
        low = torch.tensor(self.point_cloud_range[:3], **options)
        centres = (indices[:, [3, 2, 1]].float() + 0.5) * size + low
        return torch.cat((indices[:, :1].float(), centres), dim=1)
