"""``spconv.pytorch.ops``: spconv_lite's low-level ops plus spconv's output-size helpers.

The op functions (``build_subm_map``, ``build_conv_map``, ``sparse_conv``, ``sparse_max_pool``,
``sparse_sum_pool``) are spconv_lite's own; spconv's ``get_indice_pairs`` / ``indice_conv``
family uses a different pair format and is not provided.
"""

from __future__ import annotations

from typing import Sequence

from ..kernel_map import conv_output_shape, conv_transpose_output_shape, expand_geometry
from ..nn.conv import ConvAlgo
from ..ops import (
    build_conv_map,
    build_subm_map,
    sparse_conv,
    sparse_max_pool,
    sparse_sum_pool,
)


def get_conv_output_size(input_size: Sequence[int], kernel_size, stride, padding,
                         dilation) -> list[int]:
    """Output grid of a regular sparse conv (same formula as a dense conv)."""
    k, s, p, d = expand_geometry(len(input_size), kernel_size=kernel_size, stride=stride,
                                 padding=padding, dilation=dilation)
    return conv_output_shape(list(input_size), k, s, p, d)


def get_deconv_output_size(input_size: Sequence[int], kernel_size, stride, padding, dilation,
                           output_padding) -> list[int]:
    """Output grid of a transposed sparse conv (same formula as a dense transposed conv)."""
    k, s, p, d, op = expand_geometry(len(input_size), kernel_size=kernel_size, stride=stride,
                                     padding=padding, dilation=dilation,
                                     output_padding=output_padding)
    return conv_transpose_output_shape(list(input_size), k, s, p, d, op)

__all__ = [
    "ConvAlgo",
    "build_conv_map",
    "build_subm_map",
    "sparse_conv",
    "sparse_max_pool",
    "sparse_sum_pool",
    "get_conv_output_size",
    "get_deconv_output_size",
]
