"""VoxelNeXt's fully sparse encoder: ``VoxelResBackBone8xVoxelNeXt``.

Structure and parameter names follow OpenPCDet's ``pcdet/models/backbones_3d/
spconv_backbone_voxelnext.py``: the residual 3D encoder goes two levels deeper than
``VoxelResBackBone8x`` (``conv5``, ``conv6`` at strides 16 and 32); their sites are scaled back
onto the stride-8 grid by editing ``indices`` in place and concatenated with ``conv4``'s, the z
axis is summed away (``bev_out``), and two 2D sparse convs (``conv_out``, ``shared_conv``) give
the sparse bird's-eye-view features the VoxelNeXt head predicts boxes from.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import nn

from ._common import NormFn, batch_dict, default_norm, namespace, sparse_shape
from .backbones import SparseBasicBlock, post_act_block


class VoxelResBackBone8xVoxelNeXt(nn.Module):
    """VoxelNeXt's sparse encoder (OpenPCDet ``VoxelResBackBone8xVoxelNeXt``).

    Args:
        input_channels: voxel feature channels.
        grid_size: voxel grid (x, y, z); the sparse grid is ``sparse_shape`` (z + 1, y, x).
        spconv_kernel_sizes: kernel sizes of the strided convs of ``conv2`` .. ``conv5``
            (``conv6`` uses the last one), OpenPCDet's ``SPCONV_KERNEL_SIZES``: ``(3, 3, 3,
            3)`` by default, ``(5, 5, 3, 3)`` in its large Waymo config. Padding is half the size.
        channels: channels of ``conv1`` .. ``conv5`` (``conv6`` keeps the last); ``channels[3]``
            must equal ``channels[4]``, since the three levels are concatenated.
        out_channel: channels of the BEV output.
        norm_fn, spconv: as :class:`VoxelBackBone8x`.

    Example:
        >>> net = VoxelResBackBone8xVoxelNeXt(4, [64, 64, 40])
        >>> net.sparse_shape, net.num_point_features
        ([41, 64, 64], 128)
    """

    def __init__(self, input_channels: int, grid_size: Sequence[int],
                 spconv_kernel_sizes: Sequence[int] = (3, 3, 3, 3),
                 channels: Sequence[int] = (16, 32, 64, 128, 128), out_channel: int = 128,
                 norm_fn: Optional[NormFn] = None, spconv: Optional[ModuleType] = None) -> None:
        super().__init__()
        sp = namespace(spconv)
        self._tensor_type = sp.SparseConvTensor
        norm_fn = default_norm(norm_fn)
        if len(spconv_kernel_sizes) != 4 or len(channels) != 5:
            raise ValueError(
                f"spconv_kernel_sizes needs 4 entries and channels 5, got "
                f"{list(spconv_kernel_sizes)} and {list(channels)}"
            )
        if channels[3] != channels[4]:
            raise ValueError(
                f"channels[3] and channels[4] must be equal (conv4..conv6 are concatenated), "
                f"got {list(channels)}"
            )
        self.sparse_shape = sparse_shape(grid_size)

        def stage(c_in: int, c_out: int, kernel: int, level: int):
            # A strided conv (bias-free, norm, ReLU) keyed spconv<level>, then two residual
            # blocks sharing the map res<level> (their convs have biases, as OpenPCDet's).
            return sp.SparseSequential(
                post_act_block(c_in, c_out, kernel, indice_key=f"spconv{level}", stride=2,
                               padding=kernel // 2, conv_type="spconv", norm_fn=norm_fn,
                               spconv=sp),
                *(SparseBasicBlock(c_out, c_out, norm_fn=norm_fn, indice_key=f"res{level}",
                                   spconv=sp) for _ in range(2)),
            )

        k = list(spconv_kernel_sizes)
        self.conv_input = sp.SparseSequential(
            sp.SubMConv3d(input_channels, channels[0], 3, padding=1, bias=False,
                          indice_key="subm1"),
            norm_fn(channels[0]),
            nn.ReLU(),
        )
        self.conv1 = sp.SparseSequential(
            *(SparseBasicBlock(channels[0], channels[0], norm_fn=norm_fn, indice_key="res1",
                               spconv=sp) for _ in range(2))
        )
        self.conv2 = stage(channels[0], channels[1], k[0], 2)
        self.conv3 = stage(channels[1], channels[2], k[1], 3)
        self.conv4 = stage(channels[2], channels[3], k[2], 4)
        self.conv5 = stage(channels[3], channels[4], k[3], 5)
        self.conv6 = stage(channels[4], channels[4], k[3], 6)
        self.conv_out = sp.SparseSequential(
            sp.SparseConv2d(channels[3], out_channel, 3, stride=1, padding=1, bias=False,
                            indice_key="spconv_down2"),
            norm_fn(out_channel),
            nn.ReLU(),
        )
        self.shared_conv = sp.SparseSequential(
            sp.SubMConv2d(out_channel, out_channel, 3, stride=1, padding=1, bias=True),
            nn.BatchNorm1d(out_channel),
            nn.ReLU(True),
        )
        self.num_point_features = out_channel
        self.backbone_channels = {f"x_conv{i + 1}": channels[i] for i in range(4)}

    def input_tensor(self, voxel_features: torch.Tensor, voxel_coords: torch.Tensor,
                     batch_size: int):
        """The sparse input on ``sparse_shape`` (``voxel_coords``: ``[N, 4]`` batch, z, y, x)."""
        return self._tensor_type(voxel_features, voxel_coords.int(), self.sparse_shape,
                                 batch_size)

    def bev_out(self, x):
        """Sums the features of the sites that share (batch, y, x) into one 2D site each."""
        indices_2d = x.indices[:, [0, 2, 3]]
        sites, row_of_site = torch.unique(indices_2d, dim=0, return_inverse=True)
        features = x.features.new_zeros((sites.shape[0], x.features.shape[1]))
        features.index_add_(0, row_of_site, x.features)
        return self._tensor_type(features, sites, x.spatial_shape[1:], x.batch_size)

    def forward(self, x) -> dict:
        """Encodes a sparse tensor.

        Returns:
            A dict with OpenPCDet's ``batch_dict`` keys: ``encoded_spconv_tensor`` (the 2D
            sparse BEV tensor at stride 8, ``out_channel`` channels),
            ``encoded_spconv_tensor_stride``, ``multi_scale_3d_features`` (``x_conv1`` ..
            ``x_conv4``; ``x_conv4`` holds the concatenated sites of levels 4 to 6) and
            ``multi_scale_3d_strides``.
        """
        x = self.conv_input(x)
        x_conv1 = self.conv1(x)
        x_conv2 = self.conv2(x_conv1)
        x_conv3 = self.conv3(x_conv2)
        x_conv4 = self.conv4(x_conv3)
        x_conv5 = self.conv5(x_conv4)
        x_conv6 = self.conv6(x_conv5)
        # Back onto conv4's stride-8 grid, in place, as OpenPCDet does; these tensors' kernel
        # maps are not used again.
        x_conv5.indices[:, 1:] *= 2
        x_conv6.indices[:, 1:] *= 4
        levels = (x_conv4, x_conv5, x_conv6)
        x_conv4 = x_conv4.replace_feature(torch.cat([t.features for t in levels]))
        x_conv4.indices = torch.cat([t.indices for t in levels])
        out = self.shared_conv(self.conv_out(self.bev_out(x_conv4)))
        return batch_dict(out, x_conv1, x_conv2, x_conv3, x_conv4)
