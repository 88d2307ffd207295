"""Kernel maps cached under an ``indice_key`` serve only the sites they were built for, and
features are combined row by row only between tensors on the same sites.

A cached map is reused when the input holds the very sites it was built from (the same tensor
at the same version, or equal contents) on the same grid; other sites under the key, or an
in-place edit of the indices since the map was built, raise a ValueError naming the key. An
inverse conv matches its input rows to the strided conv's output sites, in any row order.

The hand-made cases below are the ways this went wrong before; the property test drives random
sequences of keyed layers with random edits of the sites in between and requires every layer
either to raise ValueError or to give the pure-PyTorch reference's answer for the sites at hand.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spconv_lite as sp
from spconv_lite import kernel_map, reference

SHAPE = [6, 6, 6]


def sites(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def tensor(indices, indice_dict=None, shape=SHAPE, batch_size=1, channels=2):
    gen = torch.Generator().manual_seed(len(indices))
    features = torch.randn(len(indices), channels, generator=gen, dtype=torch.float64)
    return sp.SparseConvTensor(features, indices, shape, batch_size, indice_dict=indice_dict)


def layer(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).double()


A = sites([0, 1, 1, 1], [0, 2, 2, 2], [0, 2, 2, 3], [0, 4, 5, 3])
B = sites([0, 3, 3, 3], [0, 2, 2, 2], [0, 5, 4, 4], [0, 1, 1, 1])  # A's count, other sites


def test_subm_key_refuses_other_sites_with_the_same_count():
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    maps = subm(tensor(A)).indice_dict
    with pytest.raises(ValueError, match=r"indice_key 's' caches the kernel map of other sites: "
                                         r"2 of this input's 4 sites are not sites of the map"):
        subm(tensor(B, maps))


def test_subm_key_refuses_another_grid():
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    y = subm(tensor(A))
    y.spatial_shape = [1, 1, 1]
    with pytest.raises(ValueError, match=r"indice_key 's' caches a map over spatial_shape "
                                         r"\[6, 6, 6\].*this input has spatial_shape \[1, 1, 1\]"):
        subm(y)


def test_subm_key_reused_for_equal_sites_in_another_tensor():
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    maps = subm(tensor(A)).indice_dict
    cached = maps["s"]
    copy = tensor(A.clone(), maps)
    out = subm(copy)
    assert out.indice_dict["s"] is cached
    expected = reference.subm_conv(copy.features, copy.indices, SHAPE, subm.weight,
                                   bias=subm.bias)
    torch.testing.assert_close(out.features, expected)


def test_subm_key_refuses_rows_reordered_in_place():
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    y = subm(tensor(A.clone()))
    order = torch.tensor([2, 0, 3, 1])
    y.indices[:] = y.indices[order].clone()  # client code reordering rows in place
    y = y.replace_feature(y.features[order])
    with pytest.raises(ValueError, match=r"indice_key 's'.*modified in place"):
        subm(y)


def test_subm_key_refuses_rows_in_another_order():
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    maps = subm(tensor(A)).indice_dict
    with pytest.raises(ValueError, match=r"indice_key 's'.*the map's 4 sites in another row "
                                         r"order"):
        subm(tensor(A[[1, 0, 2, 3]], maps))


def test_conv_key_refuses_indices_edited_in_place():
    down = layer(sp.SparseConv3d, 2, 2, 3, stride=2, indice_key="d")
    x = tensor(A.clone())
    maps = down(x).indice_dict
    x.indices[:, 1:] += 1
    with pytest.raises(ValueError, match=r"indice_key 'd'.*modified in place"):
        down(tensor(x.indices, maps))


def test_conv_key_refuses_its_output_edited_in_place():
    # VoxelNeXt-style `y.indices[:, 1:] *= 2` on a conv's output: reusing that conv's map would
    # return the edited sites as its output.
    down = layer(sp.SparseConv3d, 2, 2, 3, stride=2, padding=1, indice_key="d")
    x = tensor(A)
    y = down(x)
    y.indices[:, 1:] *= 2
    with pytest.raises(ValueError, match=r"indice_key 'd': the output indices.*modified in "
                                         r"place"):
        down(tensor(x.indices, y.indice_dict))
    with pytest.raises(ValueError, match=r"indice_key 'd': the output indices.*modified in "
                                         r"place"):
        layer(sp.SparseInverseConv3d, 2, 2, 3, indice_key="d")(y)


def test_conv_key_reused_on_the_same_sites():
    down = layer(sp.SparseConv3d, 2, 2, 3, stride=2, indice_key="d")
    first = down(tensor(A))
    second = down(tensor(A.clone(), first.indice_dict))
    assert second.indices is first.indices
    torch.testing.assert_close(second.features, first.features)


def pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": pickled, "torch.save": saved_and_loaded}


@pytest.mark.parametrize("make_copy", COPIES.values(), ids=COPIES.keys())
def test_copies_of_a_tensor_reuse_its_maps(make_copy):
    # Copies (a DataLoader worker's queue too) restart the indices' version counters: a map
    # built over version-0 indices must not look edited in the copy.
    down = layer(sp.SparseConv3d, 2, 2, 3, stride=2, padding=1, indice_key="d")
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    up = layer(sp.SparseInverseConv3d, 2, 2, 3, indice_key="d")
    with torch.no_grad():
        y = subm(down(tensor(A)))
        copied = make_copy(y)
        for net in (subm, up):
            assert torch.equal(net(copied).features, net(y).features)


@pytest.mark.parametrize("make_copy", COPIES.values(), ids=COPIES.keys())
def test_copies_of_sites_edited_in_place_still_refuse_the_map(make_copy):
    indices = torch.zeros(4, 4, dtype=torch.int32)
    indices[:, 1:] = A[:, 1:]  # one in-place write: version 1, as a copy's
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    with torch.no_grad():
        y = subm(tensor(indices))
        y.indices[:, 3] = 5 - y.indices[:, 3]
        copied = make_copy(y)
        assert copied.indices._version == 1  # the version the map was built at
        with pytest.raises(ValueError, match=r"indice_key 's'.*modified in place"):
            subm(copied)
        assert not kernel_map._sites_of_a_map(copied)  # nor are its sites taken as checked


def test_a_map_pickled_before_the_edit_flags_keeps_its_versions():
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    kmap = subm(tensor(A)).indice_dict["s"]
    old_state = dict(vars(kmap), in_version=3, out_version=4)  # no in_edited / out_edited
    restored = kernel_map.KernelMap.__new__(kernel_map.KernelMap)
    restored.__setstate__(old_state)
    assert (restored.in_version, restored.out_version) == (3, 4)


@pytest.mark.parametrize("order", ["same", "reversed", "shuffled"])
def test_inverse_conv_matches_rows_by_site(order):
    down = layer(sp.SparseConv3d, 2, 3, 3, stride=2, indice_key="d")
    inverse = layer(sp.SparseInverseConv3d, 3, 2, 3, indice_key="d")
    x = tensor(A)
    y = down(x)
    n = y.indices.shape[0]
    rows = {"same": torch.arange(n), "reversed": torch.arange(n).flip(0),
            "shuffled": torch.randperm(n, generator=torch.Generator().manual_seed(3))}[order]
    moved = sp.SparseConvTensor(y.features[rows], y.indices[rows], y.spatial_shape, 1,
                                indice_dict=y.indice_dict)
    out = inverse(moved)
    assert out.indices is x.indices
    expected = reference.sparse_inverse_conv(
        moved.features, moved.indices, moved.spatial_shape, 1, inverse.weight, x.indices, SHAPE,
        2, 0, 1, bias=inverse.bias)
    torch.testing.assert_close(out.features, expected)


def test_inverse_conv_refuses_other_sites_with_the_same_count():
    down = layer(sp.SparseConv3d, 2, 3, 3, stride=2, padding=1, indice_key="d")
    y = down(tensor(A))
    free = next(site for site in ([0, z, 0, 0] for z in range(3))
                if site not in y.indices.tolist())
    other = y.indices.clone()
    other[0] = torch.tensor(free)
    moved = sp.SparseConvTensor(y.features, other, y.spatial_shape, 1, indice_dict=y.indice_dict)
    with pytest.raises(ValueError, match=r"other sites than the conv cached under 'd' produced: "
                                         r"1 of its \d+ sites are not among them"):
        layer(sp.SparseInverseConv3d, 3, 2, 3, indice_key="d")(moved)


def branch(stride):
    torch.manual_seed(0)
    return sp.SparseSequential(
        sp.SparseConv3d(2, 3, 3, stride, 1, indice_key="down"),
        sp.SubMConv3d(3, 3, 3, indice_key="subm2"),
    ).double()


def test_branches_reusing_a_key_on_one_input_build_their_own_maps():
    # As in spconv: a layer's map goes into its output's indice_dict, not its input's, so two
    # branches with the same keys but other strides (or an ensemble) run on one tensor.
    x = tensor(A)
    coarse, fine = branch(2)(x), branch(1)(x)
    assert x.indice_dict == {} and sorted(fine.indice_dict) == ["down", "subm2"]
    for out, stride in ((coarse, 2), (fine, 1)):
        again = branch(stride)(tensor(A.clone()))
        assert torch.equal(out.indices, again.indices)
        torch.testing.assert_close(out.features, again.features, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["inference", "through_numpy"])
def test_input_edited_in_place_without_a_version_gets_new_maps(mode):
    # Edits that torch's version counter does not see (inference tensors, writes through
    # .numpy()): running the input again builds new maps, so the edit is honoured.
    subm = layer(sp.SubMConv3d, 2, 2, 3, indice_key="s")
    with torch.inference_mode(mode == "inference"):
        x = tensor(A.clone())
        subm(x)
        edited = torch.tensor([0, 1, 1, 2], dtype=torch.int32)
        if mode == "inference":
            x.indices[3] = edited
        else:
            x.indices.numpy()[3] = edited.numpy()
        out = subm(x)
        expected = subm(tensor(x.indices.clone()))
    assert torch.equal(out.features, expected.features)


def test_transposed_key_refuses_another_output_padding():
    x = tensor(sites([0, 1, 1, 1], [0, 2, 2, 2]), shape=[4, 4, 4])
    first = layer(sp.SparseConvTranspose3d, 2, 2, 3, stride=2, padding=1, indice_key="u")
    second = layer(sp.SparseConvTranspose3d, 2, 2, 3, stride=2, padding=1, output_padding=1,
                   indice_key="u")
    y = first(x)
    assert y.spatial_shape == [7, 7, 7]
    with pytest.raises(ValueError, match=r"indice_key 'u' is reused with a different geometry.*"
                                         r"'output_padding': \(0, 0, 0\).*"
                                         r"'output_padding': \(1, 1, 1\)"):
        second(tensor(x.indices, y.indice_dict, shape=[4, 4, 4]))
    assert second(x).spatial_shape == [8, 8, 8]


@pytest.mark.parametrize("make_layer, message", [
    (lambda: sp.SparseConvTranspose3d(2, 2, (1, 1, 3), stride=(1, 1, 3)),
     r"a transposed conv of spatial_shape \[1, 1, 2147483647\].*output spatial_shape "
     r"\[1, 1, 6442450941\] with sizes above 2\*\*31"),
    (lambda: sp.SparseConv3d(2, 2, 1, padding=(0, 0, 2**31)),
     r"a conv of spatial_shape \[1, 1, 2147483647\].*output spatial_shape \[1, 1, 6442450943\] "
     r"with sizes above 2\*\*31"),
], ids=["transposed", "padding"])
def test_output_coordinates_beyond_int32_raise_where_they_arise(make_layer, message):
    x = sp.SparseConvTensor(torch.ones(1, 2), sites([0, 0, 0, 2**30]), [1, 1, 2**31 - 1], 1)
    with pytest.raises(ValueError, match=message):
        make_layer()(x)


# ----------------------------------------------------------------------------- property test

EDITS = ["none", "clone", "permute", "permute_in_place", "shift_in_place", "other_sites",
         "regrid"]
KEYS = {"subm_a": "a", "subm_b": "b", "down": "d", "inverse": "d", "pool": "p",
        "transpose": "t"}


class Program:
    """Runs keyed layers on one sparse tensor and its descendants (all sharing one
    ``indice_dict``), with edits of the sites in between, and checks each layer against the
    reference. Tracks the sites each key was built for, to know when a layer must not refuse."""

    def __init__(self, data: st.DataObject):
        self.data = data
        torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
        self.layers = {
            "subm_a": sp.SubMConv3d(2, 2, 3, indice_key="a"),
            "subm_b": sp.SubMConv3d(2, 2, (1, 3, 3), indice_key="b"),
            "down": sp.SparseConv3d(2, 2, 3, stride=2, padding=1, indice_key="d"),
            "inverse": sp.SparseInverseConv3d(2, 2, 3, indice_key="d"),
            "pool": sp.SparseMaxPool3d(2, indice_key="p"),
            "transpose": sp.SparseConvTranspose3d(2, 2, 2, stride=2, indice_key="t"),
        }
        for module in self.layers.values():
            module.double()
        self.built = {}  # key -> (input indices, spatial_shape, batch_size) it was built for
        self.down_output = None  # (indices, spatial_shape) the strided conv produced
        self.edited = False  # whether any edit happened yet

    def random_sites(self, count: int, shape, batch_size: int) -> torch.Tensor:
        cells = batch_size * shape[0] * shape[1] * shape[2]
        seed = self.data.draw(st.integers(0, 2**16), label="sites seed")
        flat = torch.randperm(cells, generator=torch.Generator().manual_seed(seed))[:count]
        coords = []
        for size in reversed((batch_size, *shape)):
            coords.append(flat % size)
            flat = flat // size
        return torch.stack(coords[::-1], 1).to(torch.int32)

    def edit(self, x: sp.SparseConvTensor, kind: str) -> sp.SparseConvTensor:
        """``x`` with its sites edited as client code might; shares ``indice_dict``."""
        n = x.indices.shape[0]
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        self.edited |= kind not in ("none", "clone")
        if kind == "clone":
            return sp.SparseConvTensor(x.features, x.indices.clone(), x.spatial_shape,
                                       x.batch_size, indice_dict=x.indice_dict)
        if kind == "permute":
            return sp.SparseConvTensor(x.features[rows], x.indices[rows], x.spatial_shape,
                                       x.batch_size, indice_dict=x.indice_dict)
        if kind == "permute_in_place":
            x.indices[:] = x.indices[rows].clone()
            return x.replace_feature(x.features[rows])
        if kind == "shift_in_place":
            grid = torch.tensor(x.spatial_shape, dtype=torch.int32)
            x.indices[:, 1:] = (x.indices[:, 1:] + 1) % grid
            return x
        if kind == "other_sites":
            other = self.random_sites(n, x.spatial_shape, x.batch_size)
            return sp.SparseConvTensor(x.features, other, x.spatial_shape, x.batch_size,
                                       indice_dict=x.indice_dict)
        if kind == "regrid":
            x.spatial_shape = [s + 1 for s in x.spatial_shape]
        return x

    def must_accept(self, step: str, x: sp.SparseConvTensor) -> bool:
        """Whether no edit happened and ``x`` holds what the step's key was built for."""
        if self.edited:
            return False
        if step == "inverse":
            indices, shape = self.down_output
            return (shape == x.spatial_shape
                    and sorted(map(tuple, indices.tolist())) == sorted(map(tuple,
                                                                           x.indices.tolist())))
        built = self.built.get(KEYS[step])
        return built is None or (built[1:] == (x.spatial_shape, x.batch_size)
                                 and torch.equal(built[0], x.indices))

    def expected(self, step: str, x: sp.SparseConvTensor):
        """The reference's (features, indices, spatial_shape) of the step on ``x``."""
        module = self.layers[step]
        f, idx, shape, bs = x.features, x.indices, x.spatial_shape, x.batch_size
        if step.startswith("subm"):
            return reference.subm_conv(f, idx, shape, module.weight, bias=module.bias), idx, shape
        if step == "down":
            return reference.sparse_conv(f, idx, shape, bs, module.weight, 2, 1, 1,
                                         bias=module.bias)
        if step == "transpose":
            return reference.sparse_conv_transpose(f, idx, shape, bs, module.weight, 2,
                                                   bias=module.bias)
        if step == "pool":
            return reference.max_pool(f, idx, shape, bs, 2, 2, 0, 1)
        in_idx, in_shape, _ = self.built["d"]
        return (reference.sparse_inverse_conv(f, idx, shape, bs, module.weight, in_idx,
                                              in_shape, 2, 1, 1, bias=module.bias),
                in_idx, in_shape)

    def run(self, step: str, x: sp.SparseConvTensor) -> sp.SparseConvTensor:
        if step == "inverse" and self.down_output is None:
            return x
        accept = self.must_accept(step, x)
        key = KEYS[step]
        snapshot = (x.indices.clone(), list(x.spatial_shape), x.batch_size)
        try:
            out = self.layers[step](x)
        except ValueError as error:
            assert not accept or "too small" in str(error), f"{step} refused: {error}"
            return x
        features, indices, shape = self.expected(step, x)
        assert out.spatial_shape == list(shape)
        assert torch.equal(out.indices, indices)
        torch.testing.assert_close(out.features, features, rtol=1e-10, atol=1e-10)
        if step != "inverse":
            self.built.setdefault(key, snapshot)
        if step == "down" and self.down_output is None:
            self.down_output = (out.indices.clone(), list(out.spatial_shape))
        return out


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_keyed_layers_raise_or_match_the_reference_after_any_edit(data):
    program = Program(data)
    batch_size = data.draw(st.integers(1, 2), label="batch_size")
    count = data.draw(st.integers(1, 24), label="sites")
    x = tensor(program.random_sites(count, SHAPE, batch_size), batch_size=batch_size)
    for _ in range(data.draw(st.integers(2, 7), label="steps")):
        step = data.draw(st.sampled_from(list(KEYS)), label="step")
        x = program.edit(x, data.draw(st.sampled_from(EDITS), label="edit"))
        x = program.run(step, x)


# ----------------------------------------------------------------------------- same sites

def _on_other_sites(x: sp.SparseConvTensor) -> sp.SparseConvTensor:
    """``x``'s features on other sites (same count and grid)."""
    return sp.SparseConvTensor(x.features, B, x.spatial_shape, x.batch_size)


@pytest.mark.parametrize("combine, message", [
    (lambda x, y: x + y, r"the SparseConvTensor added must live on the same sites"),
    (lambda x, y: sp.AddTable()([x, y]), r"AddTable input 1 must live on the same sites"),
    (lambda x, y: sp.JoinTable()([x, y]), r"JoinTable input 1 must live on the same sites"),
    (lambda x, y: layer(sp.SubMConv3d, 2, 2, 3)(x, add_input=y),
     r"add_input must live on the same sites"),
], ids=["plus", "add_table", "join_table", "add_input"])
def test_elementwise_combinations_refuse_other_sites(combine, message):
    # Rows of the two tensors are added (or joined) one for one: with the same row count but
    # other sites, that used to give a silently wrong result.
    x = tensor(A)
    with pytest.raises(ValueError, match=message):
        combine(x, _on_other_sites(x))
    combine(x, sp.SparseConvTensor(x.features, A.clone(), SHAPE, 1))  # equal sites are fine
