"""Sparse max / average pooling and global pooling (spconv 2.x names and arguments)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ..kernel_map import conv_map, expand_geometry, output_maps
from ..tensor import SparseConvTensor, check_sites
from .conv import RecordsVoxelCount, check_input
from .modules import SparseModule


class SparsePool(RecordsVoxelCount):
    """Base of the windowed pools. Output sites are those of a conv with the same window;
    ``stride=None`` means ``stride=kernel_size`` (the default of the N-d classes; spconv's
    base classes default to 1, as here). The map is cached under ``indice_key`` so an inverse
    conv can undo the pooling."""

    is_max: bool = True

    def __init__(self, ndim: int, kernel_size=3, stride=1, padding=0, dilation=1,
                 indice_key: Optional[str] = None, subm: bool = False, algo=None,
                 record_voxel_count: bool = False, name: Optional[str] = None) -> None:
        super().__init__(name=name)
        if subm:
            raise ValueError("submanifold pooling is not supported (subm=True)")
        self.ndim = ndim
        # spconv's pools default the stride to the kernel size.
        self.kernel_size, self.stride, self.padding, self.dilation = expand_geometry(
            ndim, kernel_size=kernel_size, stride=kernel_size if stride is None else stride,
            padding=padding, dilation=dilation)
        self.indice_key = indice_key
        self.subm = subm
        self.algo = algo
        self._init_voxel_count(record_voxel_count)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")

    def forward(self, input: SparseConvTensor) -> SparseConvTensor:
        check_input(input, None, self)
        kmap = conv_map(input, self.kernel_size, self.stride, self.padding, self.dilation,
                        self.indice_key)
        if self.is_max:
            features = ops.sparse_max_pool(input.features, kmap.nbr, kmap.nbr_t, check_tables=False)
        else:
            # Mean over the active inputs of each window (not the kernel volume), as spconv.
            # Half types are summed and divided in float32, then rounded once: a half sum
            # overflows where the mean does not, and bfloat16 cannot hold every count.
            summed = _widened(input.features)
            counts = (kmap.nbr >= 0).sum(dim=1, keepdim=True).to(summed.dtype)
            features = (ops.sparse_sum_pool(summed, kmap.nbr, kmap.nbr_t, check_tables=False)
                        / counts).to(input.features.dtype)
        self._record_voxel_count(kmap.out_indices.shape[0])
        out = input.shadow_copy()
        out.indice_dict = output_maps(input, self.indice_key, kmap)
        out.indices = kmap.out_indices
        out.spatial_shape = list(kmap.out_spatial_shape)
        out.features = features
        return out


class SparseMaxPool(SparsePool):
    """Sparse max pooling of ``ndim`` dimensions (spconv's base class of the N-d ones)."""

    is_max = True


class SparseAvgPool(SparsePool):
    """Sparse average pooling over the active inputs of each window, ``ndim`` dimensions
    (spconv's base class of the N-d ones)."""

    is_max = False


def _pool_class(class_name: str, ndim: int, base: type):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, indice_key=None,
                 algo=None, record_voxel_count=False, name=None):
        base.__init__(self, ndim, kernel_size, stride, padding, dilation, indice_key,
                      algo=algo, record_voxel_count=record_voxel_count, name=name)

    kind = "max" if base.is_max else "average (over active inputs)"
    doc = f"{ndim}-D sparse {kind} pooling (spconv's ``{class_name}``)."
    return type(class_name, (base,), {"__init__": __init__, "__doc__": doc})


SparseMaxPool1d = _pool_class("SparseMaxPool1d", 1, SparseMaxPool)
SparseMaxPool2d = _pool_class("SparseMaxPool2d", 2, SparseMaxPool)
SparseMaxPool3d = _pool_class("SparseMaxPool3d", 3, SparseMaxPool)
SparseMaxPool4d = _pool_class("SparseMaxPool4d", 4, SparseMaxPool)
SparseAvgPool1d = _pool_class("SparseAvgPool1d", 1, SparseAvgPool)
SparseAvgPool2d = _pool_class("SparseAvgPool2d", 2, SparseAvgPool)
SparseAvgPool3d = _pool_class("SparseAvgPool3d", 3, SparseAvgPool)


def _widened(values: Tensor) -> Tensor:
    """float16 / bfloat16 values as float32, others as they are: sums of half types stall
    (bfloat16 at 256) or overflow where their mean does not."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def global_pool(x: SparseConvTensor, is_max: bool) -> Tensor:
    """Max or mean of each batch item's features: dense ``[batch_size, C]``, zero for an item
    without active sites. The max's gradient is shared among tied maxima, as ``torch.amax``'s;
    float16 / bfloat16 means are summed in float32."""
    check_sites(x.indices, x.spatial_shape, x.batch_size)
    batch = x.indices[:, 0].long()
    # [B] counts of a static shape (bincount's depends on the data), so torch.compile can trace
    # it; integer sums, so exact in any order.
    lengths = batch.new_zeros(x.batch_size).scatter_add_(0, batch, torch.ones_like(batch))
    if is_max:
        # scatter_reduce's backward counts a start value equal to the max as one more tie even
        # with include_self=False; NaN equals nothing. (segment_reduce's backward gave each tie
        # the whole of a negative gradient.)
        index = batch.unsqueeze(1).expand_as(x.features)
        start = x.features.new_full((x.batch_size, x.features.shape[1]), float("nan"))
        reduced = start.scatter_reduce(0, index, x.features, "amax", include_self=False)
    else:
        needed = ops.python_autograd_needed("SparseGlobalAvgPool", x.features)
        mean = _SegmentMeanForwardMode if needed else _SegmentMean
        reduced = mean.apply(x.features, batch, lengths)
    return torch.where((lengths > 0).unsqueeze(1), reduced, torch.zeros_like(reduced))


class _SegmentMean(torch.autograd.Function):
    """Each batch item's mean of ``features`` (``batch``: each row's item, ``lengths``: the
    items' row counts). ``segment_reduce`` sums in a fixed order on every device (a scatter-add
    would use atomics on a GPU), but its backward has no derivative; this backward is a gather,
    which gradient penalties can differentiate again. (Forward mode in the subclass below:
    torch.compile refuses a Function with a jvp.)"""

    generate_vmap_rule = True  # torch.func.vmap, as over the other layers

    @staticmethod
    def forward(features: Tensor, batch: Tensor, lengths: Tensor) -> Tensor:
        rows = _widened(features[torch.argsort(batch, stable=True)])
        mean = torch.segment_reduce(rows, "mean", lengths=lengths, unsafe=True)
        return mean.to(features.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, batch, lengths = inputs
        ctx.save_for_backward(batch, lengths)

    @staticmethod
    def backward(ctx, grad: Tensor):
        batch, lengths = ctx.saved_tensors
        share = _widened(grad) / lengths.clamp(min=1).unsqueeze(1)
        return share.to(grad.dtype)[batch], None, None


class _SegmentMeanForwardMode(_SegmentMean):
    """_SegmentMean with its forward-mode derivative, for features with a tangent."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _SegmentMean.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[1:])

    @staticmethod
    def jvp(ctx, features_tangent: Tensor, *_) -> Tensor:
        batch, lengths = ctx.saved_tensors
        return _SegmentMean.forward(features_tangent, batch, lengths)  # linear


class SparseGlobalMaxPool(SparseModule):
    """Per-batch-item maximum over all active sites: returns dense ``[batch_size, C]``."""

    def forward(self, input: SparseConvTensor) -> Tensor:
        check_input(input, None, self)
        return global_pool(input, is_max=True)


class SparseGlobalAvgPool(SparseModule):
    """Per-batch-item mean over all active sites: returns dense ``[batch_size, C]``."""

    def forward(self, input: SparseConvTensor) -> Tensor:
        check_input(input, None, self)
        return global_pool(input, is_max=False)
