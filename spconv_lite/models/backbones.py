"""SECOND-style sparse encoders: ``VoxelBackBone8x`` and ``VoxelResBackBone8x``.

Structure and parameter names follow OpenPCDet's ``pcdet/models/backbones_3d/
spconv_backbone.py``: ``conv_input``, ``conv1`` .. ``conv4`` (a strided conv, then
submanifold blocks), ``conv_out`` (a (3, 1, 1) conv with stride 2 along z). Input: a
``SparseConvTensor`` on the grid ``sparse_shape`` (z, y, x); output: the encoded tensor at
stride 8 plus the intermediate scales.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.modules import SparseModule
from ._common import NormFn, batch_dict, default_norm, namespace, sparse_shape


def post_act_block(in_channels: int, out_channels: int, kernel_size,
                   indice_key: Optional[str] = None, stride=1, padding=0,
                   conv_type: str = "subm", norm_fn: Optional[NormFn] = None,
                   spconv: Optional[ModuleType] = None):
    """Sparse conv (no bias) + norm + ReLU in a ``SparseSequential`` (children ``0``, ``1``,
    ``2``).

    Args:
        conv_type: ``"subm"`` (submanifold; ``stride`` and ``padding`` unused),
            ``"spconv"`` (regular strided conv) or ``"inverseconv"`` (inverts the conv saved
            under ``indice_key``).
    """
    sp = namespace(spconv)
    if conv_type == "subm":
        conv = sp.SubMConv3d(in_channels, out_channels, kernel_size, bias=False,
                             indice_key=indice_key)
    elif conv_type == "spconv":
        conv = sp.SparseConv3d(in_channels, out_channels, kernel_size, stride=stride,
                               padding=padding, bias=False, indice_key=indice_key)
    elif conv_type == "inverseconv":
        conv = sp.SparseInverseConv3d(in_channels, out_channels, kernel_size,
                                      indice_key=indice_key, bias=False)
    else:
        raise ValueError(f"conv_type must be 'subm', 'spconv' or 'inverseconv', got {conv_type!r}")
    return sp.SparseSequential(conv, default_norm(norm_fn)(out_channels), nn.ReLU())


def plain_encoder_stages(sp: ModuleType, input_channels: int, norm_fn: NormFn) -> tuple:
    """``conv_input, conv1 ... conv4`` of OpenPCDet's VoxelBackBone8x, which its UNetV2 repeats
    layer for layer (same names, so checkpoints of either map over)."""

    def block(*args, **kwargs):
        return post_act_block(*args, norm_fn=norm_fn, spconv=sp, **kwargs)

    conv_input = sp.SparseSequential(
        sp.SubMConv3d(input_channels, 16, 3, padding=1, bias=False, indice_key="subm1"),
        norm_fn(16),
        nn.ReLU(),
    )
    conv1 = sp.SparseSequential(block(16, 16, 3, padding=1, indice_key="subm1"))
    conv2 = sp.SparseSequential(
        block(16, 32, 3, stride=2, padding=1, indice_key="spconv2", conv_type="spconv"),
        block(32, 32, 3, padding=1, indice_key="subm2"),
        block(32, 32, 3, padding=1, indice_key="subm2"),
    )
    conv3 = sp.SparseSequential(
        block(32, 64, 3, stride=2, padding=1, indice_key="spconv3", conv_type="spconv"),
        block(64, 64, 3, padding=1, indice_key="subm3"),
        block(64, 64, 3, padding=1, indice_key="subm3"),
    )
    conv4 = sp.SparseSequential(
        block(64, 64, 3, stride=2, padding=(0, 1, 1), indice_key="spconv4", conv_type="spconv"),
        block(64, 64, 3, padding=1, indice_key="subm4"),
        block(64, 64, 3, padding=1, indice_key="subm4"),
    )
    return conv_input, conv1, conv2, conv3, conv4


class NamespaceBlock(SparseModule):
    """Base of the residual blocks built with ``spconv=``: with another layer namespace, the
    block is also an instance of that namespace's ``SparseModule``, so that its
    ``SparseSequential`` hands the block the whole sparse tensor."""

    def __new__(cls, *args, spconv: Optional[ModuleType] = None, **kwargs):
        sp = namespace(spconv)
        if not issubclass(cls, sp.SparseModule):
            cls = _block_class_for(cls, sp.SparseModule)
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        # A block of another namespace has a class made at run time, which pickle cannot
        # find by name (torch.save(model), spawned processes): rebuild it from its parts.
        origin = type(self).__dict__.get("_namespace_origin")
        if origin is None:
            return super().__reduce_ex__(protocol)
        return _new_namespace_block, origin, self.__getstate__()


class SparseBasicBlock(NamespaceBlock):
    """Residual block: subm conv, norm, ReLU, subm conv, norm, plus the input, ReLU.

    Children ``conv1``, ``bn1``, ``conv2``, ``bn2`` (and ``downsample`` if given), as in
    OpenPCDet. Both convs share ``indice_key``, so they share one kernel map.

    Args:
        inplanes, planes: input and output channels (equal unless ``downsample`` maps the
            input to ``planes`` channels on the same sites).
        bias: conv bias; ``None`` means ``norm_fn is not None``, OpenPCDet's backbone default,
            so True: ``norm_fn=None`` gives the default BatchNorm (its U-Net passes
            ``bias=False``).
        spconv: layer namespace (default ``spconv_lite.pytorch``). With another namespace the
            block is also an instance of that namespace's ``SparseModule``, so that its
            ``SparseSequential`` hands the block the whole sparse tensor.

    Example:
        >>> block = SparseBasicBlock(16, 16, indice_key="res1")
        >>> sorted(name for name, _ in block.named_children())
        ['bn1', 'bn2', 'conv1', 'conv2', 'relu']
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride=1, bias: Optional[bool] = None,
                 norm_fn: Optional[NormFn] = None, downsample: Optional[nn.Module] = None,
                 indice_key: Optional[str] = None, spconv: Optional[ModuleType] = None) -> None:
        super().__init__()
        sp = namespace(spconv)
        norm_fn = default_norm(norm_fn)
        if bias is None:  # OpenPCDet's rule; a norm is always there (BatchNorm by default)
            bias = norm_fn is not None
        self.conv1 = sp.SubMConv3d(inplanes, planes, kernel_size=3, stride=stride, padding=1,
                                   bias=bias, indice_key=indice_key)
        self.bn1 = norm_fn(planes)
        self.relu = nn.ReLU()
        self.conv2 = sp.SubMConv3d(planes, planes, kernel_size=3, stride=stride, padding=1,
                                   bias=bias, indice_key=indice_key)
        self.bn2 = norm_fn(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.bn2(out.features))
        identity = x if self.downsample is None else self.downsample(x)
        return out.replace_feature(self.relu(out.features + identity.features))


@lru_cache(maxsize=None)
def _block_class_for(cls: type, base: type) -> type:
    """``cls`` made also a subclass of another library's ``SparseModule`` (cached: one class
    per library)."""
    return type(cls.__name__, (cls, base), {"__module__": cls.__module__,
                                            "_namespace_origin": (cls, base)})


def _new_namespace_block(cls: type, base: type) -> "NamespaceBlock":
    """An empty instance of ``cls`` made also a ``base`` (unpickling a block, its state is
    set next)."""
    block_class = _block_class_for(cls, base)
    return nn.Module.__new__(block_class)


class _Backbone8x(nn.Module):
    """Shared input / output handling of the two 8x encoders."""

    def __init__(self, input_channels: int, grid_size: Sequence[int],
                 spconv: Optional[ModuleType]) -> None:
        super().__init__()
        self._tensor_type = namespace(spconv).SparseConvTensor
        self.sparse_shape = sparse_shape(grid_size)
        self.input_channels = input_channels
        self.num_point_features = 128

    def input_tensor(self, voxel_features: torch.Tensor, voxel_coords: torch.Tensor,
                     batch_size: int):
        """The sparse input on ``sparse_shape``: ``voxel_coords`` is ``[N, 4]`` (batch, z, y,
        x), as OpenPCDet's ``batch_dict['voxel_coords']``."""
        return self._tensor_type(voxel_features, voxel_coords.int(), self.sparse_shape,
                                 batch_size)

    def forward(self, x) -> dict:
        """Encodes a sparse tensor.

        Returns:
            A dict with OpenPCDet's ``batch_dict`` keys: ``encoded_spconv_tensor`` (stride 8,
            128 channels), ``encoded_spconv_tensor_stride``, ``multi_scale_3d_features``
            (``x_conv1`` .. ``x_conv4``) and ``multi_scale_3d_strides``.
        """
        x = self.conv_input(x)
        x_conv1 = self.conv1(x)
        x_conv2 = self.conv2(x_conv1)
        x_conv3 = self.conv3(x_conv2)
        x_conv4 = self.conv4(x_conv3)
        out = self.conv_out(x_conv4)
        return batch_dict(out, x_conv1, x_conv2, x_conv3, x_conv4)


class VoxelBackBone8x(_Backbone8x):
    """SECOND's sparse encoder (OpenPCDet ``VoxelBackBone8x``): 16-32-64-64 channels with
    submanifold blocks, three stride-2 convs, then ``conv_out`` to 128 channels.

    Args:
        input_channels: voxel feature channels (4 for x, y, z, intensity).
        grid_size: voxel grid (x, y, z), e.g. ``[1408, 1600, 40]`` for KITTI at
            0.05 x 0.05 x 0.1 m.
        last_pad: padding of ``conv_out`` (OpenPCDet's ``last_pad``).
        norm_fn: norm layer factory (default BatchNorm1d, eps 1e-3, momentum 0.01).
        spconv: layer namespace (default ``spconv_lite.pytorch``).

    Example:
        >>> net = VoxelBackBone8x(4, [64, 64, 40])
        >>> net.sparse_shape
        [41, 64, 64]
    """

    def __init__(self, input_channels: int, grid_size: Sequence[int], last_pad=0,
                 norm_fn: Optional[NormFn] = None, spconv: Optional[ModuleType] = None) -> None:
        super().__init__(input_channels, grid_size, spconv)
        sp = namespace(spconv)
        norm_fn = default_norm(norm_fn)

        (self.conv_input, self.conv1, self.conv2, self.conv3,
         self.conv4) = plain_encoder_stages(sp, input_channels, norm_fn)
        self.conv_out = sp.SparseSequential(
            sp.SparseConv3d(64, 128, (3, 1, 1), stride=(2, 1, 1), padding=last_pad, bias=False,
                            indice_key="spconv_down2"),
            norm_fn(128),
            nn.ReLU(),
        )
        self.backbone_channels = {"x_conv1": 16, "x_conv2": 32, "x_conv3": 64, "x_conv4": 64}


class VoxelResBackBone8x(_Backbone8x):
    """The residual variant (OpenPCDet ``VoxelResBackBone8x``): ``SparseBasicBlock`` pairs
    instead of plain submanifold blocks, 16-32-64-128 channels.

    Args:
        use_bias: bias of the residual blocks' convs (OpenPCDet's ``USE_BIAS``); ``None``
            gives OpenPCDet's default, biases on.
        Others as :class:`VoxelBackBone8x`.
    """

    def __init__(self, input_channels: int, grid_size: Sequence[int], last_pad=0,
                 use_bias: Optional[bool] = None, norm_fn: Optional[NormFn] = None,
                 spconv: Optional[ModuleType] = None) -> None:
        super().__init__(input_channels, grid_size, spconv)
        sp = namespace(spconv)
        norm_fn = default_norm(norm_fn)

        def block(*args, **kwargs):
            return post_act_block(*args, norm_fn=norm_fn, spconv=sp, **kwargs)

        def res(channels, key):
            return SparseBasicBlock(channels, channels, bias=use_bias, norm_fn=norm_fn,
                                    indice_key=key, spconv=sp)

        self.conv_input = sp.SparseSequential(
            sp.SubMConv3d(input_channels, 16, 3, padding=1, bias=False, indice_key="subm1"),
            norm_fn(16),
            nn.ReLU(),
        )
        self.conv1 = sp.SparseSequential(res(16, "res1"), res(16, "res1"))
        self.conv2 = sp.SparseSequential(
            block(16, 32, 3, stride=2, padding=1, indice_key="spconv2", conv_type="spconv"),
            res(32, "res2"),
            res(32, "res2"),
        )
        self.conv3 = sp.SparseSequential(
            block(32, 64, 3, stride=2, padding=1, indice_key="spconv3", conv_type="spconv"),
            res(64, "res3"),
            res(64, "res3"),
        )
        self.conv4 = sp.SparseSequential(
            block(64, 128, 3, stride=2, padding=(0, 1, 1), indice_key="spconv4",
                  conv_type="spconv"),
            res(128, "res4"),
            res(128, "res4"),
        )
        self.conv_out = sp.SparseSequential(
            sp.SparseConv3d(128, 128, (3, 1, 1), stride=(2, 1, 1), padding=last_pad,
                            bias=False, indice_key="spconv_down2"),
            norm_fn(128),
            nn.ReLU(),
        )
        self.backbone_channels = {"x_conv1": 16, "x_conv2": 32, "x_conv3": 64, "x_conv4": 128}
