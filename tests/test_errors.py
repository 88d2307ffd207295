"""Bad input raises ValueError / TypeError whose message names the argument and the values seen.

Each case is one call that must fail; the regex checks both the argument name and the
offending values, so a message that loses either fails the test.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import spconv_lite as sp
from spconv_lite import ops
from spconv_lite.pytorch import ops as spconv_ops


def idx(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def tensor(indices: torch.Tensor, shape=(4, 4, 4), batch_size=2, channels=3):
    return sp.SparseConvTensor(torch.randn(len(indices), channels), indices, list(shape),
                               batch_size)


TWO_SITES = idx([0, 1, 1, 1], [0, 2, 2, 2])


def reuse(first, second):
    """Runs ``first`` then ``second`` on its output, with the same indice_key."""
    second(first(tensor(TWO_SITES, (6, 6, 6))))


def table(rows: int, cols: int, fill: int = 0) -> torch.Tensor:
    """An int32 neighbour table ``[rows, cols]`` filled with ``fill``."""
    return torch.full((rows, cols), fill, dtype=torch.int32)


def sparse_conv_with(**bad):
    """``ops.sparse_conv`` on a valid call (2 input sites with 3 channels, 27 offsets to 4
    channels, 1 output site) with the given arguments replaced."""
    args = dict(features=torch.randn(2, 3), weight=torch.randn(27, 3, 4), nbr=table(1, 27),
                nbr_t=table(2, 27))
    return ops.sparse_conv(**{**args, **bad})


def assign_weight(layer, weight):
    layer.weight = torch.nn.Parameter(weight)
    ndim = layer.ndim
    x = sp.SparseConvTensor(torch.randn(1, 2), idx([0] + [1] * ndim), [4] * ndim, 1)
    layer(x)


def inverse_after(conv, inverse):
    inverse(conv(tensor(TWO_SITES, (6, 6, 6))))


E = re.escape

# (id, call, exception, regex the message must match)
CASES = [
    # indices dtype and width, at the tensor and at the op level
    ("indices_int64", lambda: tensor(TWO_SITES.long()), TypeError,
     r"indices must be int32, got torch\.int64"),
    ("indices_float", lambda: tensor(TWO_SITES.float()), TypeError,
     r"indices must be int32, got torch\.float32"),
    ("indices_not_tensor", lambda: sp.SparseConvTensor(torch.ones(1, 3), [[0, 1, 1, 1]],
                                                       [4, 4, 4], 1),
     TypeError, r"indices must be a torch\.Tensor, got list"),
    ("indices_width", lambda: tensor(TWO_SITES[:, :3]), ValueError,
     r"indices must have shape \[N, 4\].*spatial_shape \[4, 4, 4\].*got \[2, 3\]"),
    ("indices_width_4d", lambda: tensor(TWO_SITES, (4, 4, 4, 4)), ValueError,
     r"indices must have shape \[N, 5\].*got \[2, 4\]"),
    ("op_indices_int64", lambda: ops.build_subm_map(TWO_SITES.long(), [4, 4, 4], 1, [3, 3, 3],
                                                    [1, 1, 1]),
     TypeError, r"indices must be int32, got Long"),
    ("op_indices_float", lambda: ops.build_conv_map(TWO_SITES.float(), [4, 4, 4], 1, [2, 2, 2],
                                                    [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1]),
     TypeError, r"indices must be int32, got Float"),
    ("op_indices_width", lambda: ops.build_subm_map(TWO_SITES[:, :3], [4, 4, 4], 1, [3, 3, 3],
                                                    [1, 1, 1]),
     ValueError, r"indices must have shape \[N, 4\].*got \[2, 3\]"),
    # coordinates and batch indices outside the grid
    ("coordinate_too_large", lambda: sp.SubMConv3d(3, 4, 3)(tensor(idx([0, 1, 1, 1],
                                                                       [0, 4, 1, 2]))),
     ValueError, E("indices row 1 = [0, 4, 1, 2] is outside the grid") + r".*"
     + E("spatial_shape [4, 4, 4]")),
    ("coordinate_negative", lambda: sp.SparseConv3d(3, 4, 2)(tensor(idx([0, 1, -1, 2]))),
     ValueError, E("indices row 0 = [0, 1, -1, 2] is outside the grid")),
    ("coordinate_too_large_pool", lambda: sp.SparseMaxPool2d(2)(
        tensor(idx([0, 1, 1], [1, 3, 5]), (4, 5))),
     ValueError, E("indices row 1 = [1, 3, 5] is outside the grid") + r".*"
     + E("spatial_shape [4, 5]")),
    ("batch_index_too_large", lambda: sp.SparseConv3d(3, 4, 3)(tensor(idx([0, 1, 1, 1],
                                                                          [2, 1, 1, 2]))),
     ValueError, E("indices row 1 = [2, 1, 1, 2]") + r".*" + E("batch index must be in [0, 2)")),
    ("batch_index_negative", lambda: sp.SparseConvTranspose3d(3, 4, 3)(
        tensor(idx([-1, 1, 1, 1]))),
     ValueError, E("indices row 0 = [-1, 1, 1, 1]") + r".*" + E("[0, 2)")),
    # features
    ("feature_rows", lambda: sp.SparseConvTensor(torch.randn(3, 3), TWO_SITES, [4, 4, 4], 1),
     ValueError, r"features has 3 rows but indices has 2"),
    # A row-count mismatch left by assigning features (or indices) is caught where the tensor
    # is used, not at the assignment (client code assigns the two one after the other).
    ("feature_rows_conv", lambda: sp.SubMConv3d(3, 4, 3)(
        tensor(TWO_SITES).replace_feature(torch.randn(5, 3))),
     ValueError, r"features has 5 rows but indices has 2"),
    ("feature_rows_dense", lambda: tensor(TWO_SITES).replace_feature(torch.randn(1, 3)).dense(),
     ValueError, r"features has 1 rows but indices has 2"),
    ("feature_rows_pool", lambda: sp.SparseGlobalMaxPool()(
        tensor(TWO_SITES).replace_feature(torch.randn(3, 3))),
     ValueError, r"features has 3 rows but indices has 2"),
    ("features_complex", lambda: sp.SparseConvTensor(torch.ones(2, 3, dtype=torch.complex64),
                                                     TWO_SITES, [4, 4, 4], 1),
     TypeError, r"features must be a real tensor, got torch\.complex64"),
    # Integer features make a tensor (labels for dense()), but not a layer's input.
    ("features_integer_conv", lambda: sp.SubMConv3d(3, 4, 3)(
        tensor(TWO_SITES).replace_feature(torch.ones(2, 3, dtype=torch.int64))),
     TypeError, r"SubMConv3d needs floating-point features, got torch\.int64"),
    ("features_bool_pool", lambda: sp.SparseMaxPool3d(2)(
        tensor(TWO_SITES).replace_feature(torch.ones(2, 3, dtype=torch.bool))),
     TypeError, r"SparseMaxPool3d needs floating-point features, got torch\.bool"),
    ("features_integer_global_pool", lambda: sp.SparseGlobalAvgPool()(
        tensor(TWO_SITES).replace_feature(torch.ones(2, 3, dtype=torch.int32))),
     TypeError, r"SparseGlobalAvgPool needs floating-point features, got torch\.int32"),
    # spconv's _conv_forward with a bias of its caller's: checked, as features + bias would
    # broadcast a [1] or [N, C_out] bias
    ("conv_forward_bias_shape", lambda: (lambda layer: layer._conv_forward(
        False, tensor(TWO_SITES), layer.weight, torch.ones(1)))(sp.SubMConv3d(3, 4, 3)),
     ValueError, E("SubMConv3d: bias has shape [1], the layer expects [4] = [C_out]")),
    ("voxelize_points_numpy", lambda: ops.voxelize(
        torch.ones(3, 4).numpy(), (1, 1, 1), (0, 0, 0), (4, 4, 4), 3, 10),
     TypeError, E("points must be a torch.Tensor, got ndarray")),
    ("features_1d", lambda: sp.SparseConvTensor(torch.ones(2), TWO_SITES, [4, 4, 4], 1),
     ValueError, r"features must be 2-D \[N, C\], got shape \[2\]"),
    ("channels_subm", lambda: sp.SubMConv3d(5, 4, 3)(tensor(TWO_SITES)), ValueError,
     r"SubMConv3d expects 5 input channels, but features has shape \[2, 3\]"),
    ("channels_conv", lambda: sp.SparseConv2d(2, 4, 3)(tensor(idx([0, 1, 1]), (4, 4))),
     ValueError, r"SparseConv2d expects 2 input channels, but features has shape \[1, 3\]"),
    ("channels_inverse", lambda: inverse_after(sp.SparseConv3d(3, 4, 3, 2, indice_key="d"),
                                               sp.SparseInverseConv3d(8, 3, 3, indice_key="d")),
     ValueError,
     r"SparseInverseConv3d expects 8 input channels, but features has shape \[\d+, 4\]"),
    ("not_a_sparse_tensor", lambda: sp.SubMConv3d(3, 4, 3)(torch.randn(2, 3)), TypeError,
     r"SubMConv3d expects a SparseConvTensor, got Tensor"),
    ("weight_dtype", lambda: sp.SubMConv3d(3, 4, 3)(sp.SparseConvTensor(
        torch.randn(1, 3, dtype=torch.float64), idx([0, 1, 1, 1]), [4, 4, 4], 1)),
     TypeError, r"weight dtype Float must match features dtype Double"),
    # indice_key reuse
    ("reuse_key_subm_kernel", lambda: reuse(sp.SubMConv3d(3, 4, 3, indice_key="k"),
                                            sp.SubMConv3d(4, 4, 5, indice_key="k")),
     ValueError, r"indice_key 'k' is reused with a different geometry.*'kernel_size': \(3, 3, 3\)"
     r".*'kernel_size': \(5, 5, 5\)"),
    ("reuse_key_subm_dilation", lambda: reuse(sp.SubMConv3d(3, 4, 3, indice_key="k"),
                                              sp.SubMConv3d(4, 4, 3, dilation=2, indice_key="k")),
     ValueError, r"indice_key 'k' is reused.*'dilation': \(1, 1, 1\).*'dilation': \(2, 2, 2\)"),
    ("reuse_key_conv_stride", lambda: reuse(sp.SparseConv3d(3, 4, 3, stride=2, indice_key="k"),
                                            sp.SparseConv3d(4, 4, 3, stride=1, indice_key="k")),
     ValueError, r"indice_key 'k' is reused.*'stride': \(2, 2, 2\).*'stride': \(1, 1, 1\)"),
    ("reuse_key_pool_kernel", lambda: reuse(sp.SparseMaxPool3d(2, indice_key="k"),
                                            sp.SparseMaxPool3d(3, indice_key="k")),
     ValueError,
     r"indice_key 'k' is reused.*'kernel_size': \(2, 2, 2\).*'kernel_size': \(3, 3, 3\)"),
    ("reuse_subm_key_for_conv", lambda: reuse(sp.SubMConv3d(3, 4, 3, indice_key="k"),
                                              sp.SparseConv3d(4, 4, 3, indice_key="k")),
     ValueError, r"indice_key 'k' is reused.*'subm': True.*'subm': False"),
    ("inverse_kernel_mismatch", lambda: inverse_after(
        sp.SparseConv3d(3, 4, 3, 2, indice_key="d"), sp.SparseInverseConv3d(4, 3, 2,
                                                                             indice_key="d")),
     ValueError, E("indice_key 'd' was built with kernel_size [3, 3, 3]") + r".*"
     + E("[2, 2, 2]")),
    ("inverse_of_subm_key", lambda: inverse_after(
        sp.SubMConv3d(3, 4, 3, indice_key="s"), sp.SparseInverseConv3d(4, 3, 3, indice_key="s")),
     ValueError, r"indice_key 's' holds a submanifold map"),
    ("inverse_missing_key", lambda: sp.SparseInverseConv3d(3, 4, 3, indice_key="nope")(
        tensor(TWO_SITES)),
     ValueError, r"indice_key 'nope' not found in indice_dict"),
    ("inverse_key_missing", lambda: sp.SparseInverseConv3d(3, 4, 3), TypeError,
     r"SparseInverseConv3d.__init__\(\) missing 1 required positional argument: 'indice_key'"),
    ("inverse_key_none", lambda: sp.SparseInverseConv3d(3, 4, 3, None), ValueError,
     r"inverse conv needs the indice_key"),
    # duplicate sites
    ("duplicate_sites_subm", lambda: sp.SubMConv3d(3, 4, 3)(
        tensor(idx([0, 1, 1, 1], [0, 2, 2, 2], [1, 1, 1, 1], [0, 1, 1, 1]))),
     ValueError, E("duplicate sites: rows 0 and 3 are both [0, 1, 1, 1]; merge each site's rows "
                   "first (torch.unique(indices, dim=0, return_inverse=True), then "
                   "scatter_reduce of the features)")),
    ("duplicate_sites_conv", lambda: sp.SparseConv1d(3, 4, 2)(
        tensor(idx([1, 3], [0, 3], [1, 3]), (5,))),
     ValueError, E("duplicate sites: rows 0 and 2 are both [1, 3]")),
    ("duplicate_sites_pool", lambda: sp.SparseAvgPool2d(2)(
        tensor(idx([0, 3, 3], [0, 3, 3]), (4, 4))),
     ValueError, E("duplicate sites: rows 0 and 1 are both [0, 3, 3]")),
    # kernel geometry
    ("subm_even_kernel", lambda: sp.SubMConv3d(3, 4, 2), ValueError,
     E("submanifold conv needs odd kernel sizes, got [2, 2, 2]")),
    ("subm_even_kernel_tuple", lambda: sp.SubMConv2d(3, 4, (3, 4)), ValueError,
     E("odd kernel sizes, got [3, 4]")),
    ("op_subm_even_kernel", lambda: ops.build_subm_map(TWO_SITES, [4, 4, 4], 1, [3, 2, 3],
                                                       [1, 1, 1]),
     ValueError, E("odd kernel sizes, got kernel_size [3, 2, 3]")),
    ("spatial_too_small_conv", lambda: sp.SparseConv3d(3, 4, 5)(tensor(idx([0, 1, 1, 1]))),
     ValueError, E("spatial_shape [4, 4, 4] is too small for kernel_size [5, 5, 5]")),
    ("spatial_too_small_dilation", lambda: sp.SparseConv2d(3, 4, 3, dilation=(1, 3))(
        tensor(idx([0, 1, 1]), (4, 6))),
     ValueError, E("spatial_shape [4, 6] is too small for kernel_size [3, 3]") + r".*"
     + E("dilation [1, 3]") + r".*" + E("[2, 0]")),
    ("spatial_too_small_pool", lambda: sp.SparseMaxPool3d(5)(tensor(idx([0, 1, 1, 1]))),
     ValueError, E("spatial_shape [4, 4, 4] is too small for kernel_size [5, 5, 5]")),
    ("spatial_too_small_transpose", lambda: sp.SparseConvTranspose1d(3, 4, 1, padding=2)(
        tensor(idx([0, 1]), (2,))),
     ValueError, E("transposed conv of spatial_shape [2] with padding [2]")),
    # sizes whose products would overflow, and kernels larger than their grid (once a segfault
    # and a 17 GB allocation)
    ("op_kernel_volume_overflow", lambda: ops.build_conv_map(
        idx([0, 1, 1, 1]), [3, 3, 3], 1, [3, 3, 3], [2**21, 2**21, 2**22], [1, 1, 1],
        [0, 0, 0], [1, 1, 1]),
     ValueError, E("kernel_size [2097152, 2097152, 4194304] has more than 2^31 - 1 offsets")),
    ("op_kernel_entry_too_large", lambda: ops.build_subm_map(
        idx([0, 1, 1, 1]), [4, 4, 4], 1, [2**31 + 1, 1, 1], [1, 1, 1]),
     ValueError, E("kernel_size entries must be at most 2^31 - 1, got [2147483649, 1, 1]")),
    ("op_conv_kernel_larger_than_grid", lambda: ops.build_conv_map(
        idx([0, 1, 1, 1]), [3, 3, 3], 1, [1, 1, 1], [5, 3, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1]),
     ValueError, E("kernel_size [5, 3, 3] with dilation [1, 1, 1] is larger than the grid it "
                   "slides over: spatial_shape [3, 3, 3] padded by [0, 0, 0]")),
    ("op_transposed_kernel_larger_than_grid", lambda: ops.build_conv_map(
        idx([0, 1, 1, 1]), [3, 3, 3], 1, [2, 2, 2], [3, 3, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1],
        True),
     ValueError, E("larger than the grid it slides over: out_spatial_shape [2, 2, 2]")),
    ("op_stride_too_large", lambda: ops.build_conv_map(
        idx([0, 1, 1, 1]), [3, 3, 3], 1, [1, 3, 3], [3, 3, 3], [2**40, 1, 1], [0, 0, 0],
        [1, 1, 1]),
     ValueError, E("stride entries must be at most 2^31 - 1, got [1099511627776, 1, 1]")),
    ("op_out_grid_beyond_int32", lambda: ops.build_conv_map(
        idx([0, 1, 1, 1]), [3, 3, 3], 1, [3, 3, 2**31 + 5], [1, 1, 3], [1, 1, 3], [0, 0, 0],
        [1, 1, 1], True),
     ValueError, E("out_spatial_shape [3, 3, 2147483653] has sizes above 2^31")),
    # an output grid other than the conv's own would silently drop or misplace output sites
    ("op_out_grid_too_small", lambda: ops.build_conv_map(
        idx([0, 3, 3, 3]), [4, 4, 4], 1, [1, 1, 1], [3, 3, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1]),
     ValueError, E("out_spatial_shape [1, 1, 1] is not the output grid of a conv of "
                   "spatial_shape [4, 4, 4] with kernel_size [3, 3, 3], stride [1, 1, 1], "
                   "padding [0, 0, 0] and dilation [1, 1, 1]: that is [2, 2, 2]")),
    ("op_transposed_out_grid_past_output_padding", lambda: ops.build_conv_map(
        idx([0, 1, 1, 1]), [4, 4, 4], 1, [7, 9, 7], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1],
        True),
     ValueError, E("out_spatial_shape [7, 9, 7] is not the output grid of a transposed conv")
     + r".*" + E("that is [7, 7, 7] (plus an output padding below the stride or the dilation)")),
    ("output_size_stride_zero", lambda: spconv_ops.get_conv_output_size(
        [10, 10, 10], 3, (1, 0, 1), 0, 1),
     ValueError, E("stride entries must be >= 1, got [1, 0, 1]")),
    # a weight of another layout assigned after construction
    ("weight_torch_layout", lambda: assign_weight(sp.SubMConv3d(2, 3, 3),
                                                  torch.randn(3, 2, 3, 3, 3)),
     ValueError, E("SubMConv3d.weight has shape [3, 2, 3, 3, 3], the layer expects "
                   "[3, 3, 3, 3, 2] = [C_out, *kernel_size, C_in]; that is torch's nn.Conv3d "
                   "layout [C_out, C_in, *kernel_size]: assign weight.permute(0, 2, 3, 4, 1)")),
    ("weight_other_shape", lambda: assign_weight(sp.SparseConv2d(2, 3, 3), torch.randn(3, 18)),
     ValueError, E("SparseConv2d.weight has shape [3, 18], the layer expects [3, 3, 3, 2]")),
    # output_padding must be below stride or dilation, as in torch
    ("output_padding_too_large", lambda: sp.SparseConvTranspose3d(2, 2, 3, stride=2,
                                                                  output_padding=2),
     ValueError, E("output_padding [2, 2, 2] must be smaller than either stride [2, 2, 2] or "
                   "dilation [1, 1, 1]")),
    ("output_padding_deconv_size", lambda: spconv_ops.get_deconv_output_size(
        [4, 4], 3, 1, 0, 2, (0, 2)),
     ValueError, E("output_padding [0, 2] must be smaller than either stride [1, 1] or "
                   "dilation [2, 2]")),
    ("kernel_zero", lambda: sp.SparseConv3d(3, 4, 0), ValueError,
     E("kernel_size entries must be >= 1, got [0, 0, 0]")),
    ("kernel_negative", lambda: sp.SubMConv3d(3, 4, (3, -1, 3)), ValueError,
     E("kernel_size entries must be >= 1, got [3, -1, 3]")),
    ("stride_zero", lambda: sp.SparseConv2d(3, 4, 3, stride=(1, 0)), ValueError,
     E("stride entries must be >= 1, got [1, 0]")),
    ("stride_negative", lambda: sp.SparseConvTranspose3d(3, 4, 3, stride=-2), ValueError,
     E("stride entries must be >= 1, got [-2, -2, -2]")),
    ("padding_negative", lambda: sp.SparseConv3d(3, 4, 3, padding=-1), ValueError,
     E("padding entries must be >= 0, got [-1, -1, -1]")),
    ("dilation_zero", lambda: sp.SubMConv1d(3, 4, 3, dilation=0), ValueError,
     E("dilation entries must be >= 1, got [0]")),
    ("pool_kernel_zero", lambda: sp.SparseMaxPool3d(0), ValueError,
     E("kernel_size entries must be >= 1, got [0, 0, 0]")),
    ("pool_stride_zero", lambda: sp.SparseAvgPool3d(2, stride=(1, 0, 1)), ValueError,
     E("stride entries must be >= 1, got [1, 0, 1]")),
    ("op_kernel_zero", lambda: ops.build_subm_map(TWO_SITES, [4, 4, 4], 1, [3, 0, 3],
                                                  [1, 1, 1]),
     ValueError, E("kernel_size entries must be >= 1, got [3, 0, 3]")),
    ("op_stride_zero", lambda: ops.build_conv_map(TWO_SITES, [4, 4, 4], 1, [2, 2, 2], [3, 3, 3],
                                                  [0, 1, 1], [0, 0, 0], [1, 1, 1]),
     ValueError, E("stride entries must be >= 1, got [0, 1, 1]")),
    ("kernel_wrong_length", lambda: sp.SparseConv3d(3, 4, (3, 3)), ValueError,
     E("kernel_size must have 3 entries, got [3, 3]")),
    ("kernel_float", lambda: sp.SparseConv3d(3, 4, 2.5), TypeError,
     E("kernel_size must be an int or a sequence of 3 ints, got 2.5")),
    ("kernel_float_entry", lambda: sp.SparseConv3d(3, 4, (3, 2.5, 3)), TypeError,
     E("kernel_size must be an int or a sequence of 3 ints, got (3, 2.5, 3)")),
    ("stride_string", lambda: sp.SparseMaxPool2d(2, stride="2"), TypeError,
     E("stride must be an int or a sequence of 2 ints, got '2'")),
    ("layer_dims_differ_from_input", lambda: sp.SubMConv2d(3, 4, 3)(tensor(TWO_SITES)),
     ValueError, E("SubMConv2d is 2-D but the input has 3 spatial dimensions (spatial_shape")),
    ("groups", lambda: sp.SparseConv3d(4, 4, 3, groups=2), ValueError,
     r"groups must be 1 .*got 2"),
    ("channels_zero", lambda: sp.SparseConv3d(0, 4, 3), ValueError,
     r"in_channels must be a positive int, got 0"),
    # tensor construction
    ("spatial_shape_zero", lambda: tensor(TWO_SITES, (4, 0, 4)), ValueError,
     E("spatial_shape must hold 1 to 4 positive sizes, got [4, 0, 4]")),
    ("spatial_shape_5d", lambda: tensor(idx([0, 1, 1, 1, 1, 1]), (4, 4, 4, 4, 4)), ValueError,
     E("spatial_shape must hold 1 to 4 positive sizes, got [4, 4, 4, 4, 4]")),
    ("batch_size_zero", lambda: tensor(TWO_SITES, batch_size=0), ValueError,
     r"batch_size must be a positive int, got 0"),
    # past the int32 indices: the ops refused them with "expected int, found int"
    ("batch_size_past_int32", lambda: tensor(TWO_SITES, batch_size=2**63), ValueError,
     E("batch_size must be at most 2^31 (the int32 indices hold batch indices below 2^31), "
       "got 9223372036854775808")),
    ("spatial_shape_past_int32", lambda: tensor(TWO_SITES, (2**31 + 1, 4, 4)), ValueError,
     E("spatial_shape sizes must be at most 2^31 (the int32 indices hold coordinates below "
       "2^31), got [2147483649, 4, 4]")),
    # fractions and bools are refused, not truncated to ints (whole floats are taken)
    ("spatial_shape_float_list", lambda: tensor(TWO_SITES, (3.7, 3, 3)), TypeError,
     E("spatial_shape must be a sequence of ints, got [3.7, 3, 3]")),
    ("spatial_shape_float_numpy", lambda: sp.SparseConvTensor(
        torch.ones(2, 3), TWO_SITES, np.array([3.7, 3, 3]), 1), TypeError,
     E("spatial_shape must be a sequence of ints, got [3.7, 3.0, 3.0]")),
    ("spatial_shape_float_tensor", lambda: sp.SparseConvTensor(
        torch.ones(2, 3), TWO_SITES, torch.tensor([4.0, 4.5, 4.0]), 1),
     TypeError, E("spatial_shape must be a sequence of ints, got [4.0, 4.5, 4.0]")),
    ("spatial_shape_float_assigned", lambda: setattr(tensor(TWO_SITES), "spatial_shape",
                                                     [4, 4.5, 4]),
     TypeError, E("spatial_shape must be a sequence of ints, got [4, 4.5, 4]")),
    ("batch_size_bool", lambda: tensor(TWO_SITES, batch_size=True), ValueError,
     r"batch_size must be a positive int, got True"),
    ("batch_size_float_tensor", lambda: tensor(TWO_SITES, batch_size=torch.tensor(2.5)),
     ValueError, r"batch_size must be a positive int, got tensor\(2\.5000\)"),
    ("op_batch_size_zero", lambda: ops.build_subm_map(TWO_SITES, [4, 4, 4], 0, [3, 3, 3],
                                                      [1, 1, 1]),
     ValueError, r"batch_size must be >= 1, got 0"),
    ("op_batch_size_fraction", lambda: ops.build_subm_map(TWO_SITES, [4, 4, 4], 1.7, [3, 3, 3],
                                                          [1, 1, 1]),
     TypeError, r"batch_size must be a whole number, got 1\.7"),
    ("op_conv_map_batch_size_bool", lambda: ops.build_conv_map(
        TWO_SITES, [4, 4, 4], True, [2, 2, 2], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1]),
     TypeError, r"batch_size must be a whole number, got True"),
    # (2^62 - 1) * 8 wraps in int64: the grid check must not take a grid that drops sites
    ("op_transposed_grid_past_int64", lambda: ops.build_conv_map(
        idx([0, 1], [0, 1000]), [2**62], 1, [1000], [1], [8], [0], [2**31 - 1],
        transposed=True),
     ValueError, E("out_spatial_shape [1000] is not the output grid of a transposed conv")),
    # low-level op arguments
    ("op_conv_weight_dtype", lambda: sparse_conv_with(weight=torch.randn(27, 3, 4).double()),
     TypeError, r"weight dtype Double must match features dtype Float"),
    ("op_conv_channels", lambda: sparse_conv_with(features=torch.randn(2, 5)),
     ValueError, r"weight expects 3 input channels but features has 5"),
    ("op_conv_table_entries", lambda: sparse_conv_with(nbr=table(1, 27, fill=5)),
     ValueError, E("nbr has entries outside [-1, 2)")),
    ("op_conv_table_dtype", lambda: sparse_conv_with(nbr=table(1, 27).long()),
     TypeError, r"nbr must be int32, got Long"),
    ("op_conv_table_volume", lambda: sparse_conv_with(nbr=table(1, 8), nbr_t=table(2, 8)),
     ValueError, r"nbr must have 27 columns .*got \[1, 8\]"),
    ("op_conv_table_t_rows", lambda: sparse_conv_with(
        weight=torch.randn(8, 3, 4), nbr=table(1, 8), nbr_t=table(3, 8)),
     ValueError, r"nbr_t must have 2 rows, got \[3, 8\]"),
    ("op_pool_features_integer", lambda: ops.sparse_sum_pool(
        torch.ones(2, 3, dtype=torch.int32), table(1, 8), table(2, 8)),
     TypeError, r"features must be a floating-point tensor, got Int"),
    ("op_max_pool_table_entries", lambda: ops.sparse_max_pool(
        torch.randn(2, 3), table(1, 8, fill=-2), table(2, 8)),
     ValueError, E("nbr has entries outside [-1, 2)")),
    # nbr_t is read by the backward pass only: a hand-made one is checked in the forward call
    ("op_conv_table_t_entries", lambda: sparse_conv_with(nbr_t=table(2, 27, fill=1)),
     ValueError, E("nbr_t has entries outside [-1, 1)") + r".*seen 1 \.\. 1"),
    ("op_sum_pool_table_t_entries", lambda: ops.sparse_sum_pool(
        torch.randn(2, 3), table(1, 8), table(2, 8, fill=-5)),
     ValueError, E("nbr_t has entries outside [-1, 1)") + r".*seen -5 \.\. -5"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_raises_a_named_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_conv_without_channels_has_an_empty_weight_gradient():
    # 0 input and 0 output channels: the weight gradient's row blocks are sized by the channel
    # counts (a division by zero killed the process with SIGFPE).
    features = torch.randn(3, 0, requires_grad=True)
    weight = torch.randn(2, 0, 0, requires_grad=True)
    nbr = idx([2, -1], [-1, -1])
    nbr_t = idx([-1, -1], [-1, -1], [0, -1])
    out = ops.sparse_conv(features, weight, nbr, nbr_t)
    grad_features, grad_weight = torch.autograd.grad(out.sum(), [features, weight])
    assert out.shape == (2, 0) and grad_features.shape == (3, 0)
    assert grad_weight.shape == (2, 0, 0)


def test_error_cases_have_unique_ids():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))


def test_spatial_shape_and_kernel_accept_integer_types():
    # Not errors: numpy / torch integers are as good as Python ints.
    x = sp.SparseConvTensor(torch.randn(1, 3), idx([0, 1, 1, 1]), np.array([4, 4, 4]),
                            np.int64(1))
    layer = sp.SparseConv3d(np.int64(3), np.int32(2), np.int64(2), stride=torch.tensor(2),
                            padding=[0, 0, 0])
    assert layer.kernel_size == (2, 2, 2) and layer.stride == (2, 2, 2)
    assert type(layer.in_channels) is int and layer.out_channels == 2
    assert layer(x).spatial_shape == [2, 2, 2]


def test_layers_do_not_recheck_the_maps_they_built(monkeypatch):
    # Maps from build_*_map are valid by construction; checking them again would cost a host
    # synchronisation per layer on a GPU. Tables handed to the ops directly are checked.
    calls = []
    monkeypatch.setattr(ops, "_check_tables", lambda *args: calls.append(args))
    x = tensor(TWO_SITES, (6, 6, 6))
    y = sp.SparseConv3d(4, 2, 3, indice_key="down")(sp.SubMConv3d(3, 4, 3)(x))
    sp.SparseInverseConv3d(2, 3, 3, indice_key="down")(y)
    sp.SparseMaxPool3d(2)(x), sp.SparseAvgPool3d(2)(x)
    assert calls == []
    sparse_conv_with()
    assert len(calls) == 1


@pytest.mark.parametrize("entry", [2, 3, -2, -2**31, 2**31 - 1])
def test_the_cpu_op_itself_refuses_entries_past_the_features(entry):
    # Tables the library did not build skip the Python check with check_tables=False; the
    # op's own scan must still refuse every entry outside [-1, 2) (2 input sites), the first
    # one past the end and the int32 extremes included.
    nbr = table(1, 27, fill=-1)
    nbr[0, 26] = entry
    with pytest.raises(ValueError, match=E("nbr has entries outside [-1, 2)")):
        ops.sparse_conv(torch.randn(2, 3), torch.randn(27, 3, 4), nbr, table(2, 27, fill=-1),
                        check_tables=False)


def test_the_backward_names_nbr_t_when_its_entries_are_outside_the_output_rows():
    # The backward runs the op over (nbr_t, nbr), so the op's scan would call nbr_t "nbr".
    nbr, nbr_t = table(1, 27, fill=-1), table(2, 27, fill=-1)
    nbr_t[1, 4] = 1  # one output row only
    features = torch.randn(2, 3, requires_grad=True)
    out = ops.sparse_conv(features, torch.randn(27, 3, 4), nbr, nbr_t, check_tables=False)
    with pytest.raises(ValueError, match=E("nbr_t has entries outside [-1, 1)") + ".*seen -1 .. 1"):
        out.sum().backward()


def test_the_backward_names_order_t_when_it_is_not_a_permutation():
    # The backward runs the op with (order_t, order) as its (order, order_t).
    nbr, nbr_t = table(1, 27, fill=-1), table(2, 27, fill=-1)
    order_t = torch.tensor([[0, 0]], dtype=torch.int32)  # not a permutation of 0, 1
    features = torch.randn(2, 3, requires_grad=True)
    out = ops.sparse_conv(features, torch.randn(27, 3, 4), nbr, nbr_t,
                          order=torch.zeros(1, 1, dtype=torch.int32), order_t=order_t,
                          check_tables=False)
    with pytest.raises(ValueError, match=r"^order_t row 0 is not a permutation"):
        out.sum().backward()


# ----------------------------------------------------------------------------- eager-only checks

def test_global_pool_rejects_batch_index_outside_batch_size():
    x = sp.SparseConvTensor(torch.tensor([[1.0], [100.0]]), idx([0, 1, 1, 1], [-1, 2, 2, 2]),
                            [4, 4, 4], 2)
    with pytest.raises(ValueError, match=r"batch"):
        sp.SparseGlobalMaxPool()(x)


@pytest.mark.parametrize("use", [
    lambda x: x.dense(),
    lambda x: sp.SparseGlobalMaxPool()(x),
    lambda x: sp.SparseGlobalAvgPool()(x),
    lambda x: sp.functional.sparse_add(x, sp.SparseConvTensor(
        torch.ones(1, 2), idx([1, 3, 3, 3]), [4, 4, 4], 2)),
], ids=["dense", "global_max", "global_avg", "sparse_add"])
def test_dense_and_global_pools_reject_duplicate_sites(use):
    # Every conv and pool rejects duplicates; dense() would keep one row and the global mean
    # would count the site twice.
    x = sp.SparseConvTensor(torch.ones(3, 2), idx([0, 1, 1, 1], [1, 2, 2, 2], [0, 1, 1, 1]),
                            [4, 4, 4], 2)
    with pytest.raises(ValueError, match=E("duplicate sites: rows 0 and 2 are both [0, 1, 1, 1]; "
                                           "merge each site's rows first (torch.unique(")):
        use(x)


@pytest.mark.parametrize("use", [
    lambda x: x.dense(),
    lambda x: sp.SparseGlobalMaxPool()(x),
    lambda x: sp.SparseGlobalAvgPool()(x),
], ids=["dense", "global_max", "global_avg"])
@pytest.mark.parametrize("edit, error, match", [
    (lambda x: setattr(x, "spatial_shape", [4, 4]), ValueError,
     E("indices must have shape [N, 3] (batch index then one column per dimension of "
       "spatial_shape [4, 4]), got [2, 4]")),
    (lambda x: setattr(x, "indices", x.indices[:, 1:]), ValueError,
     E("indices must have shape [N, 4]")),
    (lambda x: setattr(x, "indices", x.indices.float() + 0.5), TypeError,
     E("indices must be int32, got torch.float32")),
], ids=["spatial_shape", "indices_width", "indices_dtype"])  # fmt: skip
def test_dense_and_global_pools_check_reassigned_indices(use, edit, error, match):
    # Assigned one after the other (as spconv allows), indices and spatial_shape can disagree;
    # the convs refuse it, and so do the paths that do not build a kernel map.
    x = sp.SparseConvTensor(torch.ones(2, 3), idx([0, 1, 1, 1], [1, 2, 2, 2]), [4, 4, 4], 2)
    edit(x)
    with pytest.raises(error, match=match):
        use(x)


def test_sparse_add_rejects_sites_outside_the_grid():
    # They passed through into the sum (duplicates made the other operand's sites vanish).
    inside = sp.SparseConvTensor(torch.ones(1, 1), idx([0, 1, 1, 1]), [4, 4, 4], 1)
    outside = sp.SparseConvTensor(torch.ones(1, 1), idx([0, 0, 0, 9]), [4, 4, 4], 1)
    with pytest.raises(ValueError, match=E("indices row 0 = [0, 0, 0, 9] is outside the grid")):
        sp.functional.sparse_add(inside, outside)


def test_inverse_conv_rejects_sites_outside_the_grid_whose_keys_match():
    # (y=0, x=3) on a grid 2 wide packs to the key of (y=1, x=1): it passed as that site.
    x = sp.SparseConvTensor(torch.randn(3, 3), idx([0, 0, 0, 0], [0, 1, 2, 3], [0, 3, 3, 3]),
                            [4, 4, 4], 1)
    y = sp.SparseConv3d(3, 4, 3, 2, 1, bias=False, indice_key="d")(x)
    bad = y.indices.clone()
    j = int(((bad[:, 2] == 1) & (bad[:, 3] == 1)).nonzero()[0, 0])
    bad[j, 2:] = torch.tensor([0, 3])
    moved = sp.SparseConvTensor(y.features, bad, y.spatial_shape, 1, indice_dict=y.indice_dict)
    with pytest.raises(ValueError, match=r"is outside the grid"):
        sp.SparseInverseConv3d(4, 3, 3, "d", bias=False)(moved)


def test_weights_left_on_the_meta_device_are_refused():
    # A model built under torch.device("meta") and never materialised ran on CPU inputs and
    # returned uninitialised memory (the dispatcher picks the fake kernel).
    x = sp.SparseConvTensor(torch.randn(2, 3), idx([0, 1, 1, 1], [0, 1, 1, 2]), [4, 4, 4], 1)
    with torch.device("meta"):
        layer = sp.SubMConv3d(3, 8, 3, bias=False)
    with pytest.raises(ValueError, match=E(
            "the tensor arguments must be on one device, got features on cpu, weight on meta")):
        layer(x)
    nbr, nbr_t = ops.build_subm_map(x.indices, [4, 4, 4], 1, [3, 3, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="nbr on meta"):
        ops.sparse_max_pool(x.features, nbr.to("meta"), nbr_t, check_tables=False)


def test_global_pools_and_site_check_on_grids_past_int64_keys():
    # 2 x (2^31)^3 sites: the int64 site keys would wrap (4 * 2^62 == 0), making these two
    # sites one.
    sites = idx([0, 0, 0, 0], [0, 4, 0, 0], [1, 4, 0, 0])
    x = sp.SparseConvTensor(torch.tensor([[1.0], [5.0], [2.0]]), sites, [2**31] * 3, 2)
    torch.testing.assert_close(sp.SparseGlobalMaxPool()(x), torch.tensor([[5.0], [2.0]]))
    torch.testing.assert_close(sp.SparseGlobalAvgPool()(x), torch.tensor([[3.0], [2.0]]))
    x.indices = idx([0, 0, 0, 0], [0, 4, 0, 0], [1, 4, 0, 0], [0, 4, 0, 0])
    x.features = torch.ones(4, 1)
    with pytest.raises(ValueError, match=E("duplicate sites: rows 1 and 3 are both [0, 4, 0, 0]")):
        sp.SparseGlobalMaxPool()(x)


def test_dense_rejects_negative_coordinates():
    x = sp.SparseConvTensor(torch.ones(1, 1), idx([0, 1, -1, 2]), [4, 4, 4], 1)
    with pytest.raises(ValueError, match=r"indices"):
        x.dense()


@pytest.mark.parametrize("kernel", [1, 3])
def test_torch_layout_hint_gives_torch_conv(kernel):
    # The message's recipe, followed, gives F.conv3d's result (1x1 layers read their weight's
    # memory as a [C_in, C_out] matrix, so they need a reshape, not a permute).
    torch.manual_seed(0)
    dense_weight = torch.randn(5, 2, kernel, kernel, kernel)
    layer = sp.SubMConv3d(2, 5, kernel, bias=False)
    indices = torch.tensor([[0, 1, 2, 3], [0, 2, 2, 3], [0, 4, 4, 4]], dtype=torch.int32)
    x = sp.SparseConvTensor(torch.randn(3, 2), indices, [6, 6, 6], 1)
    layer.weight = torch.nn.Parameter(dense_weight)
    with pytest.raises(ValueError) as info:
        layer(x)
    recipe = re.search(r"assign (weight\..*) instead", str(info.value))[1]
    layer.weight = torch.nn.Parameter(eval(recipe, {"weight": dense_weight}))
    expected = torch.nn.functional.conv3d(x.dense(), dense_weight, padding=kernel // 2)
    rows = indices.long()
    torch.testing.assert_close(layer(x).features,
                               expected[0, :, rows[:, 1], rows[:, 2], rows[:, 3]].t())
