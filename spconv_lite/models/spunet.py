"""Pointcept's sparse U-Net for semantic segmentation: ``SpUNetBase``.

Structure and parameter names follow Pointcept's ``pointcept/models/sparse_unet/
spconv_unet_v1m1_base.py`` (``SpUNet-v1m1``): a kernel-5 stem, ``num_stages`` levels each of
a stride-2 kernel-2 conv (``down``) and residual blocks (``enc``), then back up with inverse
convs (``up``) whose output is concatenated with the encoder's tensor of that level and fed to
residual blocks (``dec``), and a 1x1 ``final`` layer to class scores. The first decoder block of
each level and ``final`` are 1x1 layers, which spconv 2.x computes as
``features @ weight.view(C_in, C_out)``; spconv_lite reads their weights the same way, so a
Pointcept checkpoint gives Pointcept's outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import nn

from ._common import NormFn, default_norm, namespace
from .backbones import NamespaceBlock


class SpUNetBlock(NamespaceBlock):
    """Pointcept's ``BasicBlock``: two submanifold 3x3x3 convs with norm and ReLU, plus a
    shortcut ``proj`` (identity, or a 1x1 submanifold conv and norm when the channel count
    changes).

    Children ``proj``, ``conv1``, ``bn1``, ``conv2``, ``bn2`` as in Pointcept.

    Example:
        >>> block = SpUNetBlock(48, 32, indice_key="subm1")
        >>> block.proj[0].conv1x1
        True
    """

    def __init__(self, in_channels: int, embed_channels: int, norm_fn: Optional[NormFn] = None,
                 indice_key: Optional[str] = None, bias: bool = False,
                 spconv: Optional[ModuleType] = None) -> None:
        super().__init__()
        sp = namespace(spconv)
        norm_fn = default_norm(norm_fn)
        if in_channels == embed_channels:
            self.proj = sp.SparseSequential(nn.Identity())
        else:
            self.proj = sp.SparseSequential(
                sp.SubMConv3d(in_channels, embed_channels, kernel_size=1, bias=False),
                norm_fn(embed_channels),
            )
        self.conv1 = sp.SubMConv3d(in_channels, embed_channels, kernel_size=3, padding=1,
                                   bias=bias, indice_key=indice_key)
        self.bn1 = norm_fn(embed_channels)
        self.relu = nn.ReLU()
        self.conv2 = sp.SubMConv3d(embed_channels, embed_channels, kernel_size=3, padding=1,
                                   bias=bias, indice_key=indice_key)
        self.bn2 = norm_fn(embed_channels)

    def forward(self, x):
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.bn2(out.features) + self.proj(x).features)
        return out.replace_feature(self.relu(out.features))


def pointcept_init(module: nn.Module, submanifold: type) -> None:
    """Pointcept's initialisation of a fresh SpUNet: truncated normal weights (std 0.02) and
    zero biases for linear layers and submanifold convs, unit BatchNorms; the strided and
    inverse convs keep their default."""
    if isinstance(module, (nn.Linear, submanifold)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SpUNetBase(nn.Module):
    """Pointcept's ``SpUNet-v1m1`` (``SpUNetBase``), without its encoder-only mode.

    Args:
        in_channels: point / voxel feature channels.
        num_classes: scores per voxel from the 1x1 ``final`` layer (0: no ``final`` layer,
            the decoder's features are returned).
        base_channels: channels of the stem.
        channels: per level, the encoder's channels (first half) then the decoder's (second
            half), as Pointcept's ``channels``.
        layers: residual blocks per level, in the same order.
        norm_fn: norm layer factory (default BatchNorm1d, eps 1e-3, momentum 0.01).
        spconv: layer namespace (default ``spconv_lite.pytorch``).

    Example:
        >>> net = SpUNetBase(4, 13, base_channels=8, channels=(8, 16, 16, 8),
        ...                  layers=(1, 1, 1, 1))
        >>> [name for name, m in net.named_modules() if getattr(m, "conv1x1", False)]
        ['dec.0.block0.proj.0', 'dec.1.block0.proj.0', 'final']
    """

    def __init__(self, in_channels: int, num_classes: int, base_channels: int = 32,
                 channels: Sequence[int] = (32, 64, 128, 256, 256, 128, 96, 96),
                 layers: Sequence[int] = (2, 3, 4, 6, 2, 2, 2, 2),
                 norm_fn: Optional[NormFn] = None, spconv: Optional[ModuleType] = None) -> None:
        super().__init__()
        if len(layers) % 2 or len(layers) != len(channels):
            raise ValueError(
                f"channels and layers must have the same even length, got {list(channels)} "
                f"and {list(layers)}"
            )
        sp = namespace(spconv)
        self._tensor_type = sp.SparseConvTensor
        norm_fn = default_norm(norm_fn)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.base_channels, self.channels, self.layers = base_channels, channels, layers
        self.num_stages = len(layers) // 2

        def blocks(c_in: int, c_out: int, count: int, key: str):
            # The first block changes the channel count (its shortcut is then 1x1).
            return sp.SparseSequential(OrderedDict(
                (f"block{i}", SpUNetBlock(c_in if i == 0 else c_out, c_out, norm_fn=norm_fn,
                                          indice_key=key, spconv=sp))
                for i in range(count)
            ))

        def with_norm(conv, c_out: int):
            return sp.SparseSequential(conv, norm_fn(c_out), nn.ReLU())

        self.conv_input = with_norm(
            sp.SubMConv3d(in_channels, base_channels, kernel_size=5, padding=1, bias=False,
                          indice_key="stem"), base_channels)
        self.down, self.enc = nn.ModuleList(), nn.ModuleList()
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        enc_channels, dec_channels = base_channels, channels[-1]
        for s in range(self.num_stages):
            below = channels[len(channels) - s - 2]  # what the level below hands up
            self.down.append(with_norm(
                sp.SparseConv3d(enc_channels, channels[s], kernel_size=2, stride=2, bias=False,
                                indice_key=f"spconv{s + 1}"), channels[s]))
            self.enc.append(blocks(channels[s], channels[s], layers[s], f"subm{s + 1}"))
            self.up.append(with_norm(
                sp.SparseInverseConv3d(below, dec_channels, kernel_size=2, bias=False,
                                       indice_key=f"spconv{s + 1}"), dec_channels))
            self.dec.append(blocks(dec_channels + enc_channels, dec_channels,
                                   layers[len(channels) - s - 1], f"subm{s}"))
            enc_channels, dec_channels = channels[s], below
        if num_classes > 0:
            self.final = sp.SubMConv3d(channels[-1], num_classes, kernel_size=1, padding=1,
                                       bias=True)
        else:
            self.final = sp.Identity()
        self.apply(partial(pointcept_init, submanifold=sp.SubMConv3d))

    def input_tensor(self, features: torch.Tensor, coords: torch.Tensor, batch_size: int):
        """The sparse input: ``coords`` is ``[N, 4]`` (batch, then three grid coordinates); the
        grid reaches 96 cells past the largest coordinate, as Pointcept sizes it."""
        shape = (coords[:, 1:].max(dim=0).values + 96).tolist()
        return self._tensor_type(features, coords.int().contiguous(), shape, batch_size)

    def forward(self, x):
        """Per-voxel scores (``[N, num_classes]`` features) on the input's sites, in its row
        order, as a sparse tensor."""
        x = self.conv_input(x)
        skips = [x]
        for down, enc in zip(self.down, self.enc):
            x = enc(down(x))
            skips.append(x)
        x = skips.pop()
        for s in reversed(range(self.num_stages)):
            x = self.up[s](x)
            x = x.replace_feature(torch.cat((x.features, skips.pop().features), dim=1))
            x = self.dec[s](x)
        return self.final(x)
