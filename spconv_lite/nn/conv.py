"""Sparse convolution layers with spconv 2.x names, arguments and weight layout."""

from __future__ import annotations

import enum
import math
import threading
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..kernel_map import (
    check_output_padding,
    conv_map,
    expand_geometry,
    identity_table,
    inverse_map,
    output_maps,
    row_orders,
    subm_map,
)
from ..tensor import SparseConvTensor, check_count, check_same_sites
from .modules import SparseModule


class ConvAlgo(enum.Enum):
    """spconv's algorithm choice. Accepted for compatibility; spconv_lite picks its own kernels."""

    Native = 0
    MaskImplicitGemm = 1
    MaskSplitImplicitGemm = 2


def check_input(x, channels: Optional[int], layer: nn.Module) -> None:
    """Type, dimension and channel checks shared by every sparse layer."""
    name = type(layer).__name__
    if not isinstance(x, SparseConvTensor):
        raise TypeError(f"{name} expects a SparseConvTensor, got {type(x).__name__}")
    x.check_rows()
    if not x.features.is_floating_point():
        raise TypeError(f"{name} needs floating-point features, got {x.features.dtype}")
    ndim = getattr(layer, "ndim", None)
    if ndim is not None and len(x.spatial_shape) != ndim:
        raise ValueError(
            f"{name} is {ndim}-D but the input has {len(x.spatial_shape)} spatial dimensions "
            f"(spatial_shape {x.spatial_shape})"
        )
    if channels is not None and x.features.shape[1] != channels:
        raise ValueError(
            f"{name} expects {channels} input channels, but features has shape "
            f"{list(x.features.shape)}"
        )


def refuse_fused_activation(act_type) -> None:
    """spconv fuses an ``act_type`` activation into its GEMM; ignoring it would silently change
    the results, so refuse it (``None`` or spconv's ``Activation.None_`` pass)."""
    if act_type is not None and getattr(act_type, "name", act_type) not in ("None_", "None"):
        raise ValueError(
            f"act_type={act_type!r} (a fused activation) is not supported: add the "
            "activation as a module after the conv"
        )


VOXEL_COUNT_BUFFER = "max_num_voxels_during_training"
_VOXEL_COUNT_LOCK = threading.Lock()


class RecordsVoxelCount(SparseModule):
    """spconv's ``record_voxel_count``: a strided conv or pool with it keeps the largest output
    site count seen in eager training in the buffer ``max_num_voxels_during_training``, so
    spconv checkpoints that hold the buffer load strictly. A checkpoint without it loads too
    (the count starts at 0), as with spconv."""

    def _init_voxel_count(self, record_voxel_count: bool, device=None) -> None:
        self.record_voxel_count = record_voxel_count
        if record_voxel_count and not self.subm and not getattr(self, "inverse", False):
            self.register_buffer(VOXEL_COUNT_BUFFER, torch.zeros(1, dtype=torch.int32,
                                                                 device=device))

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # A layer that spconv pickled whole (torch.save(model)), loaded under install_as_spconv,
        # comes with spconv's attributes: lists for the geometry, which the kernel maps compare
        # with other layers' tuples.
        for name in ("kernel_size", "stride", "padding", "dilation", "output_padding"):
            if isinstance(self.__dict__.get(name), list):
                self.__dict__[name] = tuple(self.__dict__[name])

    def reset_parameters(self) -> None:
        """Zeroes the recorded voxel count, as BatchNorm's ``reset_parameters`` resets its
        running statistics (after torch's meta-device init, ``to_empty`` then
        ``reset_parameters``, buffers hold whatever the memory held)."""
        buffer = self.get_max_num_voxels()
        if buffer is not None:
            with torch.no_grad():
                buffer.zero_()

    def get_max_num_voxels(self) -> Optional[torch.Tensor]:
        """The largest output site count seen in training (``record_voxel_count=True``), else
        None (spconv API)."""
        return getattr(self, VOXEL_COUNT_BUFFER, None)

    def _record_voxel_count(self, count: int) -> None:
        buffer = self.get_max_num_voxels()
        if buffer is not None and self.training and not torch.compiler.is_compiling():
            with _VOXEL_COUNT_LOCK:  # threads training one model must not lose a larger count
                buffer.clamp_(min=count)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        buffer = self.get_max_num_voxels()
        if buffer is not None and prefix + VOXEL_COUNT_BUFFER not in state_dict:
            # (on the CPU for a layer built on the meta device: a load with assign=True keeps it)
            state_dict[prefix + VOXEL_COUNT_BUFFER] = torch.zeros(
                1, dtype=torch.int32, device="cpu" if buffer.is_meta else buffer.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class SparseConvolution(RecordsVoxelCount):
    """Common base of every sparse conv layer.

    The weight is stored as ``[out_channels, *kernel_size, in_channels]`` (spconv >= 2.2), so
    spconv checkpoints load as they are (older layouts: ``spconv_lite.checkpoint``).
    ``groups`` must be 1; ``algo``, ``fp32_accum``, ``act_alpha``, ``act_beta`` and
    ``large_kernel_fast_algo`` are accepted and ignored; a fused activation (``act_type``) is
    refused. ``record_voxel_count`` registers spconv's ``max_num_voxels_during_training``
    buffer (the largest output site count seen in training).

    A 1x1 layer (``conv1x1``: kernel volume 1, and submanifold or not strided) reads its weight
    as spconv 2.x does: the ``[C_out, 1, ..., 1, C_in]`` tensor's memory viewed as a
    ``[C_in, C_out]`` matrix, ``out = features @ weight.reshape(C_in, C_out)`` (a reshape, not
    a transpose), the way every spconv 2.x checkpoint with such layers was trained. Every other
    layer reads ``weight[o, *k, i]`` as the weight from input channel ``i`` to output ``o``.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        subm: bool = False,
        output_padding=0,
        transposed: bool = False,
        inverse: bool = False,
        indice_key: Optional[str] = None,
        algo: Optional[ConvAlgo] = None,
        fp32_accum: Optional[bool] = None,
        record_voxel_count: bool = False,
        act_type=None,
        act_alpha: float = 0,
        act_beta: float = 0,
        large_kernel_fast_algo: bool = False,
        name: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(name=name)
        if groups != 1:
            raise ValueError(
                f"groups must be 1 (grouped sparse conv is not supported), got {groups}"
            )
        self.ndim = ndim
        # numpy ints too (channel lists read from configs)
        self.in_channels = check_count(in_channels, "in_channels")
        self.out_channels = check_count(out_channels, "out_channels")
        (self.kernel_size, self.stride, self.padding, self.dilation,
         self.output_padding) = expand_geometry(
            ndim, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
            output_padding=output_padding)
        if transposed:
            check_output_padding(self.output_padding, self.stride, self.dilation)
        if subm and any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(
                f"submanifold conv needs odd kernel sizes, got {list(self.kernel_size)}"
            )
        refuse_fused_activation(act_type)
        if inverse and indice_key is None:
            raise ValueError("an inverse conv needs the indice_key of the conv it inverts")
        self.groups = groups
        self.subm = subm
        self.transposed = transposed
        self.inverse = inverse
        self.indice_key = indice_key
        self.algo = algo
        self.fp32_accum = fp32_accum
        self.act_type = act_type
        self.act_alpha = act_alpha
        self.act_beta = act_beta
        self.large_kernel_fast_algo = large_kernel_fast_algo
        # spconv 2.x runs exactly these layers as one matrix product (see the class docstring).
        self.conv1x1 = math.prod(self.kernel_size) == 1 and (
            subm or all(s == 1 for s in self.stride))
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, *self.kernel_size, in_channels, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._init_voxel_count(record_voxel_count, device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # nn.ConvNd's default (kaiming_uniform with a=sqrt(5)), with the fan-in of this layout.
        bound = 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if not self.subm and not self.inverse:
            text += f", stride={self.stride}, padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self.indice_key is not None:
            text += f", indice_key={self.indice_key!r}"
        return text

    def _load_weight_different_layout(self, *args) -> None:
        """spconv's load_state_dict pre-hook. A layer that spconv pickled whole
        (``torch.save(model)``) lists it, as a bound method, among its hooks, so unpickling
        it under ``install_as_spconv`` looks the name up here. Nothing to do: a missing
        ``max_num_voxels_during_training`` is added by ``_load_from_state_dict``, and
        ``SPCONV_SAVED_WEIGHT_LAYOUT`` is ignored (see ``spconv_lite.pytorch.constants``)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "weight"
        saved = state_dict.get(key)
        errors_before = len(error_msgs)
        # The loader chain runs first: client code may replace SparseModule's loader to convert
        # old layouts itself (mmdetection3d does for spconv 1.x checkpoints).
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        failed = any(key in message for message in error_msgs[errors_before:])
        if failed and isinstance(saved, torch.Tensor) and saved.shape != self.weight.shape:
            # torch has reported the size mismatch; add which spconv layout the shape fits.
            from ..checkpoint import add_mismatch_hint

            add_mismatch_hint(error_msgs, key, saved.shape, self)

    def kernel_weight(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight (``self.weight`` unless given) as ``[K, C_in, C_out]`` matrices, one per
        kernel offset (the layout of ``ops.sparse_conv``), read as spconv 2.x reads it."""
        weight = self.weight if weight is None else weight
        if self.conv1x1:
            return weight.reshape(1, self.in_channels, self.out_channels)
        volume = math.prod(self.kernel_size)
        # [C_out, *k, C_in] -> [K, C_in, C_out]
        return weight.reshape(self.out_channels, volume, self.in_channels).permute(1, 2, 0)

    def _check_weight_shape(self, weight: torch.Tensor) -> None:
        # A weight assigned after construction (torch's [C_out, C_in, *k] layout, say) would be
        # reshaped silently below; refuse it, as load_state_dict does.
        shape = list(weight.shape)
        expected = [self.out_channels, *self.kernel_size, self.in_channels]
        if shape == expected:
            return
        raise ValueError(
            f"{type(self).__name__}.weight has shape {shape}, the layer expects {expected} = "
            f"[C_out, *kernel_size, C_in]{self.torch_layout_hint(shape, 'assign')}"
        )

    def torch_layout_hint(self, shape, verb: str, name: str = "weight") -> str:
        """``"; that is torch's nn.ConvNd layout ...: <verb> <fix> instead"`` when ``shape`` is
        that of a torch conv weight for this layer, else ``""``."""
        if list(shape) != [self.out_channels, self.in_channels, *self.kernel_size]:
            return ""
        if self.conv1x1:  # its memory is read as a [C_in, C_out] matrix (class docstring)
            ones = ", ".join(["1"] * self.ndim)
            fix = (f"{name}.reshape({self.out_channels}, {self.in_channels}).t().reshape("
                   f"{self.out_channels}, {ones}, {self.in_channels})")
        else:
            axes = ", ".join(str(d) for d in (0, *range(2, self.ndim + 2), 1))
            fix = f"{name}.permute({axes})"
        return (f"; that is torch's nn.Conv{self.ndim}d layout [C_out, C_in, *kernel_size]: "
                f"{verb} {fix} instead")

    def forward(self, input: SparseConvTensor,
                add_input: Optional[SparseConvTensor] = None) -> SparseConvTensor:
        """Runs the conv; ``add_input`` (a tensor on the output sites, as in spconv) is added
        to the result."""
        # Read once: a parametrized weight (spectral_norm, weight_norm) is computed at each read.
        return self._conv_forward(self.training, input, self.weight, self.bias, add_input)

    def _conv_forward(self, training: bool, input: SparseConvTensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor],
                      add_input: Optional[SparseConvTensor] = None,
                      channel_scale: Optional[torch.Tensor] = None,
                      output_scale: Optional[float] = None, name: Optional[str] = None,
                      sparse_unique_name: str = "", act_type=None, act_alpha: float = 0,
                      act_beta: float = 0) -> SparseConvTensor:
        """spconv 2.x's entry point for subclasses that run the layer with another weight or
        bias (fake-quantized, standardized): this layer's conv with ``weight`` (``[C_out,
        *kernel_size, C_in]``) and ``bias``. ``training``, ``name`` and ``sparse_unique_name``
        are accepted and ignored, as ``algo``; int8 scales and a fused activation are refused."""
        if channel_scale is not None or output_scale is not None:
            raise NotImplementedError("_conv_forward: int8 inference (channel_scale, "
                                      "output_scale) is not supported")
        refuse_fused_activation(act_type)
        check_input(input, self.in_channels, self)
        self._check_weight_shape(weight)
        if bias is not None and list(bias.shape) != [self.out_channels]:
            # features + bias would broadcast a [1] or [N, C_out] bias silently.
            raise ValueError(f"{type(self).__name__}: bias has shape {list(bias.shape)}, "
                             f"the layer expects [{self.out_channels}] = [C_out]")
        in_features = input.features
        # spconv 2.x runs a 1x1 layer as one product on the input's own rows, without a map: the
        # output keeps the input's indices (their row order too: client code adds it to the
        # input's features), and the layer neither reads nor stores a map under its indice_key.
        # An inverse 1x1 layer does so unless a map is stored under its key: it returns to
        # that map's sites, as an inverse conv of any size.
        runs_in_place = self.conv1x1 and (
            input.find_indice_pair(self.indice_key) is None if self.inverse
            else self.subm or not any(self.padding + self.output_padding))
        if runs_in_place:
            kmap = None
            nbr = nbr_t = identity_table(input)  # runs the product on the conv kernels
            out_indices, out_shape = input.indices, input.spatial_shape
        elif self.inverse:
            kmap, rows = inverse_map(input, self.kernel_size, self.indice_key)
            if rows is not None:  # input holds the conv's output sites in another row order
                in_features = in_features[rows]
            # Run the stored map backwards: its inputs become our outputs.
            nbr, nbr_t = kmap.nbr_t, kmap.nbr
            out_indices, out_shape = kmap.in_indices, kmap.in_spatial_shape
        else:
            if self.subm:
                kmap = subm_map(input, self.kernel_size, self.dilation, self.indice_key)
            else:
                kmap = conv_map(
                    input, self.kernel_size, self.stride, self.padding, self.dilation,
                    self.indice_key, self.transposed, self.output_padding,
                )
            nbr, nbr_t = kmap.nbr, kmap.nbr_t
            out_indices, out_shape = kmap.out_indices, kmap.out_spatial_shape
        order, order_t = (None, None) if kmap is None else row_orders(kmap, self.inverse)
        features = ops.sparse_conv(in_features, self.kernel_weight(weight), nbr, nbr_t,
                                   order=order, order_t=order_t, check_tables=False)
        if bias is not None:
            # In the conv's dtype: under torch.autocast the conv runs in float16 / bfloat16 and
            # its output stays so, as an in-place add would keep it (spconv's).
            features = features + bias.to(features.dtype)
        self._record_voxel_count(out_indices.shape[0])
        out = input.shadow_copy()
        # The inverse conv reads the map under its key and makes none.
        out.indice_dict = output_maps(input, self.indice_key, None if self.inverse else kmap)
        out.indices = out_indices
        out.spatial_shape = list(out_shape)
        if add_input is not None:
            add_input.check_rows()
            check_same_sites(out, add_input, "add_input")
            if add_input.features.shape != features.shape:
                raise ValueError(
                    f"add_input has features of shape {list(add_input.features.shape)}, the "
                    f"conv output has {list(features.shape)}"
                )
            features = features + add_input.features
        out.features = features
        return out


def _conv_class(class_name: str, ndim: int, subm=False, transposed=False, inverse=False):
    """Builds a public layer class with spconv's constructor signature for its kind."""

    if inverse:

        def __init__(self, in_channels, out_channels, kernel_size, indice_key, bias=True,
                     algo=None, fp32_accum=None, large_kernel_fast_algo=False, name=None):
            SparseConvolution.__init__(
                self, ndim, in_channels, out_channels, kernel_size, bias=bias, inverse=True,
                indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                large_kernel_fast_algo=large_kernel_fast_algo, name=name,
            )

    elif subm:  # spconv's signature has no record_voxel_count here: it comes after name

        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                     dilation=1, groups=1, bias=True, indice_key=None, algo=None,
                     fp32_accum=None, large_kernel_fast_algo=False, name=None,
                     record_voxel_count=False, output_padding=0):
            SparseConvolution.__init__(
                self, ndim, in_channels, out_channels, kernel_size, stride, padding, dilation,
                groups, bias, subm=subm, output_padding=output_padding, transposed=transposed,
                indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                record_voxel_count=record_voxel_count,
                large_kernel_fast_algo=large_kernel_fast_algo, name=name,
            )

    else:

        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                     dilation=1, groups=1, bias=True, indice_key=None, algo=None,
                     fp32_accum=None, record_voxel_count=False, large_kernel_fast_algo=False,
                     name=None, output_padding=0):
            SparseConvolution.__init__(
                self, ndim, in_channels, out_channels, kernel_size, stride, padding, dilation,
                groups, bias, subm=subm, output_padding=output_padding, transposed=transposed,
                indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                record_voxel_count=record_voxel_count,
                large_kernel_fast_algo=large_kernel_fast_algo, name=name,
            )

    # Argument errors name the class, as spconv's do ("SubMConv3d.__init__() got an unexpected
    # keyword argument 'act_type'"), not "_conv_class.<locals>.__init__()".
    __init__.__qualname__ = f"{class_name}.__init__"
    kind = ("submanifold" if subm else "inverse" if inverse
            else "transposed" if transposed else "regular")
    doc = f"{ndim}-D {kind} sparse convolution (spconv's ``{class_name}``)."
    return type(class_name, (SparseConvolution,), {"__init__": __init__, "__doc__": doc})


SubMConv1d = _conv_class("SubMConv1d", 1, subm=True)
SubMConv2d = _conv_class("SubMConv2d", 2, subm=True)
SubMConv3d = _conv_class("SubMConv3d", 3, subm=True)
SubMConv4d = _conv_class("SubMConv4d", 4, subm=True)
SparseConv1d = _conv_class("SparseConv1d", 1)
SparseConv2d = _conv_class("SparseConv2d", 2)
SparseConv3d = _conv_class("SparseConv3d", 3)
SparseConv4d = _conv_class("SparseConv4d", 4)
SparseConvTranspose1d = _conv_class("SparseConvTranspose1d", 1, transposed=True)
SparseConvTranspose2d = _conv_class("SparseConvTranspose2d", 2, transposed=True)
SparseConvTranspose3d = _conv_class("SparseConvTranspose3d", 3, transposed=True)
SparseConvTranspose4d = _conv_class("SparseConvTranspose4d", 4, transposed=True)
SparseInverseConv1d = _conv_class("SparseInverseConv1d", 1, inverse=True)
SparseInverseConv2d = _conv_class("SparseInverseConv2d", 2, inverse=True)
SparseInverseConv3d = _conv_class("SparseInverseConv3d", 3, inverse=True)
SparseInverseConv4d = _conv_class("SparseInverseConv4d", 4, inverse=True)
