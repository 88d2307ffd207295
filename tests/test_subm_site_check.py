"""Submanifold maps over sites a map produced or already checked skip the site check
(check_sites=False), which on a GPU is the map's only host synchronisation; sites from anywhere
else, or edited since, are checked.

The CUDA op's side (the same tables without the check) runs under the emulator in
tests/cuda_emu and on a GPU in tests/test_cuda_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_gen, randn, random_sites, sparse_tensor

import spconv_lite as sp
from spconv_lite import ops

SHAPE = [10, 9, 8]


@pytest.fixture
def site_checks(monkeypatch):
    """The check_sites argument of every build_subm_map call, in order."""
    seen = []
    real = ops.build_subm_map

    def spy(*args, check_sites=True, **kwargs):
        seen.append(check_sites)
        return real(*args, check_sites=check_sites, **kwargs)

    monkeypatch.setattr(ops, "build_subm_map", spy)
    return seen


def make_input(key="site_check", count=200):
    gen = make_gen(key)
    idx = random_sites(gen, 2, SHAPE, count=count)
    return sparse_tensor(randn(gen, count, 4, dtype=torch.float32), idx, SHAPE, 2)


def test_checked_on_input_sites_skipped_after_a_keyed_conv(site_checks):
    net = sp.SparseSequential(
        sp.SubMConv3d(4, 8, 3, indice_key="a"),  # the input's sites: checked
        sp.SparseConv3d(8, 8, 3, stride=2, padding=1, indice_key="down"),
        sp.SubMConv3d(8, 8, 3, indice_key="b"),  # the conv's output sites: no check
        sp.SparseInverseConv3d(8, 8, 3, indice_key="down"),
        sp.SubMConv3d(8, 8, 3, indice_key="c"),  # the sites the conv map checked: no check
    )
    net(make_input())
    assert site_checks == [True, False, False]


def test_skipped_after_unkeyed_maps(site_checks):
    # spconv's benchmark network: pools without an indice_key between keyed submanifold
    # layers. No map is kept in indice_dict, but the sites a map made or checked are marked.
    net = sp.SparseSequential(
        sp.SubMConv3d(4, 8, 3),  # the input's sites: checked
        sp.SubMConv3d(8, 8, 3),  # the same sites, checked above: no check
        sp.SparseMaxPool3d(2, 2),
        sp.SubMConv3d(8, 8, 3, indice_key="b"),  # the pool's output sites: no check
        sp.SparseConv3d(8, 8, 3, stride=2, padding=1),
        sp.SubMConv3d(8, 8, 3),  # the conv's output sites: no check
    )
    net(make_input())
    assert site_checks == [True, False, False, False]


def test_checked_after_an_edit_or_on_another_grid(site_checks):
    down = sp.SparseConv3d(4, 8, 3, stride=2, padding=1, indice_key="down")
    y = down(make_input("edited"))
    y.indices[:, 1:] //= 1  # an in-place edit: the map no longer vouches for these sites
    sp.SubMConv3d(8, 8, 3, indice_key="b")(y)
    # The same indices tensor on another grid is not the conv's output either.
    z = down(make_input("regrid"))
    other = sparse_tensor(z.features, z.indices, [s * 2 for s in z.spatial_shape], 2)
    other.indice_dict = z.indice_dict
    sp.SubMConv3d(8, 8, 3, indice_key="b")(other)
    # Nor are the same sites in a new tensor.
    w = down(make_input("copied"))
    sp.SubMConv3d(8, 8, 3)(sparse_tensor(w.features, w.indices.clone(), w.spatial_shape, 2))
    assert site_checks == [True, True, True]


def test_maps_without_the_check_are_the_same(site_checks):
    x = make_input("same_maps")
    y = sp.SparseConv3d(4, 8, 3, stride=2, padding=1, indice_key="down")(x)
    args = (y.indices, y.spatial_shape, y.batch_size, [3, 3, 3], [1, 1, 1])
    for checked, unchecked in zip(ops.build_subm_map(*args),
                                  ops.build_subm_map(*args, check_sites=False)):
        assert torch.equal(checked, unchecked)


def test_inference_mode(site_checks):
    # Inference tensors keep no version counter, so an in-place edit of their sites could not
    # be noticed: every submanifold map over them checks. The results are those of no_grad.
    def network():
        torch.manual_seed(0)
        return sp.SparseSequential(
            sp.SubMConv3d(4, 8, 3, indice_key="a"), sp.SubMConv3d(8, 8, 3, indice_key="a"),
            sp.SparseConv3d(8, 8, 3, stride=2, padding=1, indice_key="down"),
            sp.SubMConv3d(8, 8, 3), sp.SubMConv3d(8, 8, 3),
            sp.SparseInverseConv3d(8, 8, 3, indice_key="down"),
            sp.SparseMaxPool3d(2, 2), sp.SubMConv3d(8, 8, 3),
        )
    x = make_input("inference")
    with torch.no_grad():
        want = network()(x)
    del site_checks[:]
    with torch.inference_mode():
        got = network()(make_input("inference"))
    assert site_checks == [True, True, True, True]
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.features, want.features, rtol=0, atol=0)
