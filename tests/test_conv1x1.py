"""1x1 layers read their weight as spconv 2.x does: the ``[C_out, 1, ..., 1, C_in]`` tensor's
memory viewed as a ``[C_in, C_out]`` matrix. Which layers those are, and the README's recipe
for converting such weights to and from ``torch.nn.functional.conv3d`` weights.

(The dense comparisons of tests/cases.py include 1x1 cases for the fast path and the reference,
gradients included; test_client_parity.py compares 1x1 layers with spconv 2.3.8.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import densify, gather, make_gen, randn, random_sites

import spconv_lite as sp

# (layer, whether spconv 2.x runs it as one matrix product on the reshaped weight)
LAYERS = {
    "subm": (lambda: sp.SubMConv3d(3, 5, 1), True),
    "subm-strided": (lambda: sp.SubMConv3d(3, 5, 1, stride=2), True),  # subm ignores stride
    "subm-2d": (lambda: sp.SubMConv2d(3, 5, (1, 1)), True),
    "conv": (lambda: sp.SparseConv3d(3, 5, 1), True),
    "conv-strided": (lambda: sp.SparseConv3d(3, 5, 1, stride=2), False),
    "conv-strided-one-axis": (lambda: sp.SparseConv3d(3, 5, 1, stride=(1, 2, 1)), False),
    "transposed": (lambda: sp.SparseConvTranspose3d(3, 5, 1), True),
    "inverse": (lambda: sp.SparseInverseConv3d(3, 5, 1, indice_key="down"), True),
    "subm-3x3": (lambda: sp.SubMConv3d(3, 5, 3), False),
    "conv-1x3": (lambda: sp.SparseConv3d(3, 5, (1, 3, 1)), False),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_which_layers_are_1x1(name):
    make, expected = LAYERS[name]
    assert make().conv1x1 is expected


# The README's recipe ("1x1 layers"), for a weight `w` of shape [C_out, 1, 1, 1, C_in].
def readme_to_conv3d(w):
    c_out, c_in = w.shape[0], w.shape[-1]
    return w.reshape(c_in, c_out).t().reshape(c_out, c_in, 1, 1, 1)


def readme_from_conv3d(wt):
    c_out, c_in = wt.shape[:2]
    return wt.reshape(c_out, c_in).t().reshape(c_out, 1, 1, 1, c_in)


@pytest.mark.parametrize("kind", ["subm", "conv"])
def test_readme_conversion_to_and_from_conv3d(kind):
    gen = make_gen("readme-1x1", kind)
    layer = {"subm": sp.SubMConv3d, "conv": sp.SparseConv3d}[kind](3, 5, 1, bias=False).double()
    indices = random_sites(gen, 2, (4, 5, 6), 0.3)
    features = randn(gen, len(indices), 3)
    x = sp.SparseConvTensor(features, indices, [4, 5, 6], 2)
    dense_in = densify(features, indices, (4, 5, 6), 2)

    with torch.no_grad():
        layer.weight.copy_(randn(gen, 5, 1, 1, 1, 3))
    out = layer(x)
    dense = F.conv3d(dense_in, readme_to_conv3d(layer.weight))
    torch.testing.assert_close(out.features, gather(dense, out.indices))

    conv3d_weight = randn(gen, 5, 3, 1, 1, 1)
    with torch.no_grad():
        layer.weight.copy_(readme_from_conv3d(conv3d_weight))
    torch.testing.assert_close(readme_to_conv3d(layer.weight), conv3d_weight)
    out = layer(x)
    torch.testing.assert_close(out.features,
                               gather(F.conv3d(dense_in, conv3d_weight), out.indices))
