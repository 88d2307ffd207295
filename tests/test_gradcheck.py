"""float64 torch.autograd.gradcheck of the differentiable ops and of the layers built on them.

Max pooling is only differentiable away from ties, so its inputs are pairwise far apart
(``distinct_values``), much further than gradcheck's finite-difference step. Every check runs on
each device of helpers.DEVICES.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from helpers import DEVICES, distinct_values, make_gen, randn, random_sites, sparse_tensor
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import spconv_lite as sp
from spconv_lite import ops

SHAPE = (5, 6, 5)
BATCH = 2


def small_map(kind: str, key, device="cpu"):
    """A seeded site set on a small 3D grid and its kernel map ``(nbr, nbr_t)``."""
    idx = random_sites(make_gen("map", kind, key), BATCH, SHAPE, count=40).to(device)
    if kind == "subm":
        nbr, nbr_t = ops.build_subm_map(idx, SHAPE, BATCH, (3, 3, 3), (1, 1, 1))
    elif kind == "conv":
        _, nbr, nbr_t = ops.build_conv_map(idx, SHAPE, BATCH, (3, 3, 3), (3, 2, 3), (2, 2, 2),
                                           (1, 0, 1), (1, 1, 1))
    else:  # transposed
        _, nbr, nbr_t = ops.build_conv_map(idx, SHAPE, BATCH, (10, 12, 10), (2, 2, 2),
                                           (2, 2, 2), (0, 0, 0), (1, 1, 1), True)
    return nbr, nbr_t


MAPS = ["subm", "conv", "transposed"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MAPS)
def test_gradcheck_sparse_conv(kind, device):
    nbr, nbr_t = small_map(kind, "conv", device)
    gen = make_gen("gradcheck_conv", kind)
    features = randn(gen, nbr_t.shape[0], 3).to(device).requires_grad_()
    # A non-contiguous weight view, as the modules pass it.
    weight = randn(gen, 2, nbr.shape[1], 3).to(device).permute(1, 2, 0).requires_grad_()
    assert gradcheck(lambda f, w: ops.sparse_conv(f, w, nbr, nbr_t), (features, weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MAPS)
def test_gradgradcheck_sparse_conv(kind, device):
    # The input gradient is itself a sparse_conv, and the weight gradient's backward is two
    # more (gradient penalties differentiate both).
    nbr, nbr_t = small_map(kind, "conv2", device)
    gen = make_gen("gradgradcheck_conv", kind)
    features = randn(gen, nbr_t.shape[0], 2).to(device).requires_grad_()
    weight = randn(gen, nbr.shape[1], 2, 3).to(device).requires_grad_()
    assert gradgradcheck(lambda f, w: ops.sparse_conv(f, w, nbr, nbr_t), (features, weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MAPS)
def test_gradcheck_sparse_sum_pool(kind, device):
    nbr, nbr_t = small_map(kind, "sum", device)
    features = randn(make_gen("gradcheck_sum", kind), nbr_t.shape[0], 3).to(device)
    features.requires_grad_()
    assert gradcheck(lambda f: ops.sparse_sum_pool(f, nbr, nbr_t), (features,))
    assert gradgradcheck(lambda f: ops.sparse_sum_pool(f, nbr, nbr_t), (features,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", MAPS)
def test_gradcheck_sparse_max_pool(kind, device):
    nbr, nbr_t = small_map(kind, "max", device)
    features = distinct_values(make_gen("gradcheck_max", kind), nbr_t.shape[0], 3).to(device)
    features.requires_grad_()
    assert gradcheck(lambda f: ops.sparse_max_pool(f, nbr, nbr_t), (features,))
    assert gradgradcheck(lambda f: ops.sparse_max_pool(f, nbr, nbr_t), (features,))


# ----------------------------------------------------------------------------- through modules

class UNet(torch.nn.Module):
    """SubM -> strided conv (keyed) -> transposed conv / inverse conv, every layer with bias."""

    def __init__(self):
        super().__init__()
        self.subm = sp.SubMConv3d(2, 3, 3, indice_key="subm")
        self.down = sp.SparseConv3d(3, 2, (3, 2, 3), stride=2, padding=(1, 0, 1),
                                    indice_key="down")
        self.subm2 = sp.SubMConv3d(2, 2, 3, indice_key="subm2")
        self.up = sp.SparseInverseConv3d(2, 2, (3, 2, 3), indice_key="down")

    def forward(self, x):
        x = self.subm(x)
        return self.up(self.subm2(self.down(x)))


MODULES = {
    "unet": lambda: UNet(),
    "transpose": lambda: sp.SparseConvTranspose3d(2, 3, (2, 3, 1), stride=(2, 1, 3),
                                                  padding=(0, 1, 0), output_padding=(1, 0, 2)),
    "maxpool": lambda: sp.SparseMaxPool3d(2, stride=1, padding=1),
    "avgpool": lambda: sp.SparseAvgPool2d(3, stride=2, padding=1),
    "conv1d": lambda: sp.SparseConv1d(2, 2, 3, stride=2, dilation=2),
    "subm_1x1": lambda: sp.SubMConv3d(2, 3, 1),  # weight read as spconv 2.x reads it
    "global_max": lambda: sp.SparseGlobalMaxPool(),
    "global_avg": lambda: sp.SparseGlobalAvgPool(),
}


def module_input(name, gen, device="cpu"):
    shape = {"avgpool": (6, 7), "conv1d": (15,)}.get(name, SHAPE)
    idx = random_sites(gen, BATCH, shape, count=min(40, len(shape) * 12))
    channels = 2
    if name in ("maxpool", "global_max"):
        features = distinct_values(gen, len(idx), channels)
    else:
        features = randn(gen, len(idx), channels)
    return features.to(device), idx.to(device), shape


def module_function(module, idx, shape, names=()):
    """The module as a function of the features and, through ``functional_call``, of values for
    its parameters ``names`` (the module's own where none are given); a dense tensor out."""
    def run(f, *values):
        out = functional_call(module, dict(zip(names, values)),
                              (sparse_tensor(f, idx, shape, BATCH),))
        return out if isinstance(out, torch.Tensor) else out.features

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODULES))
def test_gradcheck_through_modules(name, device):
    gen = make_gen("gradcheck_module", name)
    torch.manual_seed(0)
    module = MODULES[name]().double().to(device)
    features, idx, shape = module_input(name, gen, device)
    params = dict(module.named_parameters())
    fn = module_function(module, idx, shape, list(params))
    inputs = (features.requires_grad_(), *(p.detach().clone().requires_grad_()
                                           for p in params.values()))
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)  # gradient penalties (the global mean's failed)


@pytest.mark.parametrize("name", list(MODULES))
def test_forward_mode_ad_equals_reverse_mode(name):
    """torch.func.jvp and jacfwd through a layer give the tangent that reverse mode gives (torch
    ran the sparse ops without their inputs' tangents: zero derivatives, no error)."""
    gen = make_gen("forward_ad", name)
    torch.manual_seed(0)
    module = MODULES[name]().double()
    features, idx, shape = module_input(name, gen)
    fn = module_function(module, idx, shape)
    tangent = randn(gen, *features.shape)
    expected = torch.autograd.functional.jvp(fn, features, tangent)[1]
    assert expected.abs().sum() > 0
    for make_jvp in (lambda: torch.func.jvp(fn, (features,), (tangent,))[1],
                     lambda: torch.func.jacfwd(fn)(features).flatten(-2) @ tangent.flatten()):
        torch.testing.assert_close(make_jvp(), expected)


# Dynamo before torch 2.13 fails (raises, in torch) to make fake tensors of resumed frames'
# functorch-wrapped tensors where our ops break its graph under a transform.
OLD_DYNAMO = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 13)


def assert_close_unless_old_dynamo_fails(compute, expected):
    try:
        result = compute()
    except AssertionError as error:
        if not (OLD_DYNAMO and "Expected FakeTensor" in str(error)):
            raise
        return
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", ["unet", "maxpool", "global_avg"])
def test_torch_func_around_and_inside_compiled_functions(name, backend):
    """torch.func transforms of a torch.compile'd function and inside one, and forward-mode
    dual tensors through one, give the eager results. The graphs had run the ops without the
    transform or the tangents: zero or wrong derivatives and no error (a jvp inside a compiled
    function, a jvp of one traced by the "eager" backend, dual tensors under every backend)."""
    gen = make_gen("func_and_compile", name)
    torch.manual_seed(0)
    module = MODULES[name]().double().requires_grad_(False)
    features, idx, shape = module_input(name, gen)
    fn = module_function(module, idx, shape)
    tangent = randn(gen, *features.shape)

    def tangent_of(f):
        return torch.func.jvp(fn, (f,), (tangent,))[1]

    def input_gradient(f):
        return torch.func.grad(lambda f: fn(f).square().sum())(f)

    expected = tangent_of(features)
    assert expected.abs().sum() > 0
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend)
    assert_close_unless_old_dynamo_fails(
        lambda: torch.func.jvp(compiled, (features,), (tangent,))[1], expected)
    assert_close_unless_old_dynamo_fails(
        lambda: torch.compile(tangent_of, backend=backend)(features), expected)
    with forward_ad.dual_level():
        dual_out = compiled(forward_ad.make_dual(features, tangent))
        torch.testing.assert_close(forward_ad.unpack_dual(dual_out).tangent, expected)
    stacked = torch.stack([features, tangent])
    batched = torch.func.vmap(fn)(stacked)
    torch.testing.assert_close(torch.func.vmap(compiled)(stacked), batched)
    torch._dynamo.reset()  # frames of fn compiled above would be reused
    stacked_inside = torch.compile(lambda f, t: torch.func.vmap(fn)(torch.stack([f, t])),
                                   backend=backend)
    torch.testing.assert_close(stacked_inside(features, tangent), batched)
    if backend != "eager":  # which fails in torch, making fake tensors of a resumed frame
        assert_close_unless_old_dynamo_fails(
            lambda: torch.compile(input_gradient, backend=backend)(features),
            input_gradient(features))


@pytest.mark.parametrize("name", list(MODULES))
def test_vmap_over_features(name):
    """torch.func.vmap over a batch of feature sets gives each set's output."""
    gen = make_gen("vmap", name)
    torch.manual_seed(0)
    module = MODULES[name]().double()
    features, idx, shape = module_input(name, gen)
    stacked = torch.stack([features, features.flip(0)])
    fn = module_function(module, idx, shape)
    torch.testing.assert_close(torch.func.vmap(fn)(stacked), torch.stack([fn(f) for f in stacked]))


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_over_tables_weights_and_row_orders(device):
    """vmap over neighbour tables (two maps of one site set: dilation 1 and 2), weights and row
    orders gives each entry's result; a bad entry in any table of the batch is refused, as a
    bad table is without vmap (the checks read a batched tensor's whole batch)."""
    gen = make_gen("vmap_tables")
    idx = random_sites(gen, BATCH, SHAPE, count=40).to(device)
    maps = [ops.build_subm_map(idx, SHAPE, BATCH, (3, 3, 3), (d, d, d)) for d in (1, 2)]
    row_count = len(idx)
    features = randn(gen, row_count, 3).to(device)
    weights = randn(gen, 2, 27, 3, 2).to(device)
    tables, tables_t = (torch.stack(tables) for tables in zip(*maps))
    orders = torch.stack([ops.conv_row_order(nbr, 2) for nbr in tables])
    orders_t = torch.stack([ops.conv_row_order(nbr_t, 2) for nbr_t in tables_t])

    def conv_of(w, nbr, nbr_t, order, order_t):
        return ops.sparse_conv(features, w, nbr, nbr_t, order=order, order_t=order_t)

    expected = torch.stack([conv_of(*entry) for entry in zip(weights, tables, tables_t, orders,
                                                              orders_t)])
    torch.testing.assert_close(torch.func.vmap(conv_of)(weights, tables, tables_t, orders,
                                                        orders_t), expected)
    # The batch dimension last, and two levels of vmap (each entry's tables [1, R, K]).
    batched_last = torch.func.vmap(conv_of, in_dims=(0, 0, 0, -1, -1))
    torch.testing.assert_close(batched_last(weights, tables, tables_t, orders.movedim(0, -1),
                                            orders_t.movedim(0, -1)), expected)
    nested = torch.func.vmap(torch.func.vmap(conv_of, in_dims=(None, 0, 0, -1, -1)),
                             in_dims=(0, 0, 0, -1, -1))
    torch.testing.assert_close(
        nested(weights, tables[:, None], tables_t[:, None], orders[:, None].permute(2, 3, 1, 0),
               orders_t[:, None].permute(2, 3, 1, 0)), expected[:, None])
    pooled = torch.func.vmap(lambda nbr, nbr_t: ops.sparse_max_pool(features, nbr, nbr_t))
    torch.testing.assert_close(pooled(tables, tables_t), torch.stack(
        [ops.sparse_max_pool(features, *entry) for entry in zip(tables, tables_t)]))
    bad_tables, bad_orders = tables.clone(), orders.clone()
    bad_tables[1, 0, 0], bad_orders[1, 0, 0] = row_count, 1 - int(orders[1, 0, 0] == 1)
    with pytest.raises(ValueError, match=f"nbr has entries outside \\[-1, {row_count}\\)"):
        torch.func.vmap(conv_of)(weights, bad_tables, tables_t, orders, orders_t)
    with pytest.raises(ValueError, match=f"order is not a row order: .* 0 .. {row_count - 1}"):
        torch.func.vmap(conv_of)(weights, tables, tables_t, bad_orders, orders_t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [name for name in MODULES if name != "global_avg"])
def test_vmap_over_no_feature_sets(name, device):
    """vmap over an empty batch gives an empty batch of outputs of the right shape (torch's
    fallback for ops without a batching rule refuses size 0, as it still does for the global
    mean's ``segment_reduce``)."""
    gen = make_gen("vmap_empty", name)
    module = MODULES[name]().double().to(device)
    features, idx, shape = module_input(name, gen, device)
    fn = module_function(module, idx, shape)
    empty = torch.func.vmap(fn)(features.new_empty((0, *features.shape)))
    assert empty.shape == (0, *fn(features).shape) and empty.dtype == features.dtype
    assert empty.device == features.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODULES))
def test_torch_func_reverse_mode_equals_autograd(name, device):
    """torch.func.grad, jacrev (twice: the Hessian) and per-sample parameter gradients
    (vmap of grad) give what torch.autograd gives: torch's custom-op autograd wrapper refused
    every torch.func transform."""
    gen = make_gen("torch_func", name)
    torch.manual_seed(0)
    module = MODULES[name]().double().to(device)
    features, idx, shape = module_input(name, gen, device)
    params = {key: value.detach() for key, value in module.named_parameters()}
    output = module_function(module, idx, shape, list(params))

    def loss(f, *values):
        return (output(f, *values) ** 2).sum()

    torch.testing.assert_close(torch.func.grad(loss)(features),
                               torch.autograd.functional.jacobian(loss, features))
    torch.testing.assert_close(torch.func.jacrev(output)(features),
                               torch.autograd.functional.jacobian(output, features))
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(loss))(features),
                               torch.autograd.functional.hessian(loss, features))
    if not params:
        return
    samples, values = torch.stack([features, features.flip(0)]), tuple(params.values())
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=tuple(range(1, len(values) + 1))),
                                 in_dims=(0, *(None,) * len(values)))(samples, *values)
    for index, value in enumerate(values):
        expected = [torch.autograd.functional.jacobian(
            lambda v: loss(f, *values[:index], v, *values[index + 1:]), value) for f in samples]
        torch.testing.assert_close(per_sample[index], torch.stack(expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODULES))
def test_forward_mode_through_parameters_and_over_reverse_mode(name, device):
    """Dual tensors (torch.autograd.forward_ad) on the features and every parameter give the
    tangent reverse mode gives, and torch.func.hessian (forward mode over the backward ops, the
    weight gradient's and the max pool's included) gives reverse mode's Hessians."""
    gen = make_gen("forward_over_reverse", name)
    torch.manual_seed(0)
    module = MODULES[name]().double().to(device)
    features, idx, shape = module_input(name, gen, device)
    params = {key: value.detach() for key, value in module.named_parameters()}
    tangents = {key: randn(gen, *value.shape).to(device) for key, value in params.items()}
    features_tangent = randn(gen, *features.shape).to(device)
    output = module_function(module, idx, shape, list(params))

    for with_features in (True, False):  # tangents on everything, on the parameters only
        if not with_features and not params:
            continue
        given = features_tangent if with_features else torch.zeros_like(features)
        expected = torch.autograd.functional.jvp(
            output, (features, *params.values()), (given, *tangents.values()))[1]
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(value, tangents[key]) for key, value in params.items()]
            dual = output(forward_ad.make_dual(features, given) if with_features else features,
                          *duals)
            torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, expected)

    def loss(f, *values):
        return (output(f, *values) ** 2).sum()

    arguments = (features, *params.values())  # every block, the mixed ones too
    hessian = torch.func.hessian(loss, argnums=tuple(range(len(arguments))))(*arguments)
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(loss, arguments))


@pytest.mark.parametrize("name", ["unet", "global_avg"])
def test_forward_mode_over_forward_mode_is_refused(name):
    """torch runs an autograd.Function's forward formula with forward mode off, so jacfwd of
    jacfwd missed the inner level's terms: wrong second derivatives, no error."""
    gen = make_gen("forward_over_forward", name)
    module = MODULES[name]().double()
    features, idx, shape = module_input(name, gen)

    output = module_function(module, idx, shape)

    def loss(f):
        return (torch.tanh(output(f)) ** 2).sum()

    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        torch.func.jacfwd(torch.func.jacfwd(loss))(features)
    torch.testing.assert_close(torch.func.hessian(loss)(features),
                               torch.autograd.functional.hessian(loss, features))


@pytest.mark.parametrize("device", DEVICES)
def test_max_pool_forward_mode_of_outputs_without_inputs(device):
    """An output row without neighbours has value 0 and tangent 0 (argmax -1)."""
    gen = make_gen("max_pool_empty_rows")
    nbr = torch.tensor([[0, 2], [-1, -1], [1, -1]], dtype=torch.int32, device=device)
    nbr_t = torch.tensor([[0, -1], [2, -1], [-1, 0]], dtype=torch.int32, device=device)
    features = distinct_values(gen, 3, 2).to(device) + 1

    def pool(f):
        return ops.sparse_max_pool(f, nbr, nbr_t)

    tangent = randn(gen, 3, 2).to(device)
    expected = torch.autograd.functional.jvp(pool, features, tangent)[1]
    assert (expected[1] == 0).all() and (expected[[0, 2]] != 0).all()
    torch.testing.assert_close(torch.func.jvp(pool, (features,), (tangent,))[1], expected)


@pytest.mark.parametrize("frozen", ["weight", "features"])
def test_conv_saves_only_what_its_gradients_need(frozen):
    """A frozen layer keeps its weight for the input gradient but not its input (frozen-backbone
    fine-tuning kept every layer's input alive), so the input may be edited in place after the
    forward, as with torch's layers; features without grad leave the weight unsaved."""
    nbr, nbr_t = small_map("subm", "saved")
    gen = make_gen("saved", frozen)
    leaf = randn(gen, nbr_t.shape[0], 3).requires_grad_(frozen == "weight")
    weight = randn(gen, nbr.shape[1], 3, 2).requires_grad_(frozen == "features")
    features = leaf * 1.0
    expected = ops.sparse_conv(features.detach(), weight.detach(), nbr, nbr_t)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.sparse_conv(features, weight, nbr, nbr_t)
    kept = [t for t in saved if t.dtype.is_floating_point]
    assert [t.shape for t in kept] == [(weight if frozen == "weight" else features).shape]
    if frozen == "weight":
        features.mul_(2.0)  # after the forward: allowed, the features are not saved
    upstream = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)
    out.backward(upstream)
    torch.testing.assert_close(out.detach(), expected)
    both = (leaf.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_())
    ops.sparse_conv(both[0] * 1.0, both[1], nbr, nbr_t).backward(upstream)
    grad, want = (leaf.grad, both[0].grad) if frozen == "weight" else (weight.grad, both[1].grad)
    assert want.abs().sum() > 0
    torch.testing.assert_close(grad, want)
