"""Row orders of neighbour tables (ops.conv_row_order) and their way from a kernel map to the op.

The CUDA conv kernels visit output rows in these orders (rows with the same neighbour pattern
share tiles) when SPCONV_LITE_CUDA_VARIANTS has rows=N; the CPU conv ignores them. Here: the
order op itself (a permutation per split, sorted by the split's neighbour masks, stable), the
same argument checks on both ops, and the layers building, caching and passing the orders (forced
on for CPU maps). The CUDA kernels that follow the orders are checked bitwise against the default
ones under the emulator (tests/cuda_emu) and on a GPU (tests/test_cuda_parity.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import case_id, make_gen, randn, random_sites, sparse_tensor
from torch import nn

import spconv_lite as sp
from spconv_lite import kernel_map, ops

OPS = torch.ops.spconv_lite
SHAPE = [9, 10, 8]


def a_map(kind):
    """(nbr, nbr_t) of a subm, strided or transposed conv over seeded sites."""
    idx = random_sites(make_gen("row_order", kind), 2, SHAPE, count=250)
    if kind == "subm":
        return ops.build_subm_map(idx, SHAPE, 2, [3, 3, 3], [1, 1, 1])
    if kind == "strided":
        return ops.build_conv_map(idx, SHAPE, 2, [5, 5, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1],
                                  [1, 1, 1])[1:]
    return ops.build_conv_map(idx, SHAPE, 2, [18, 20, 16], [2, 2, 2], [2, 2, 2], [0, 0, 0],
                              [1, 1, 1], True)[1:]


def masks(table: torch.Tensor, begin: int, end: int) -> list[int]:
    """Each row's neighbour mask over the offsets [begin, end) (at most 64), bit j = begin + j."""
    valid = (table[:, begin:min(end, begin + 64)] >= 0).tolist()
    return [sum(1 << j for j, v in enumerate(row) if v) for row in valid]


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("kind", ["subm", "strided", "transposed"])
@pytest.mark.parametrize("table_name", ["nbr", "nbr_t"])
def test_rows_sorted_by_neighbour_mask(table_name, kind, splits):
    table = a_map(kind)[table_name == "nbr_t"]
    rows, volume = table.shape
    order = ops.conv_row_order(table, splits)
    assert order.dtype == torch.int32 and order.shape == (splits, rows)
    for s in range(splits):
        row_order = order[s].tolist()
        assert sorted(row_order) == list(range(rows))
        key = masks(table, s * volume // splits, (s + 1) * volume // splits)
        # Sorted by mask, ties in row order (a stable sort).
        assert [(key[r], r) for r in row_order] == sorted((key[r], r) for r in range(rows))


def test_masks_of_more_than_64_offsets_use_the_first_64():
    table = torch.randint(-1, 2, (200, 70), generator=make_gen("wide"), dtype=torch.int32)
    order = ops.conv_row_order(table, 1)[0].tolist()
    key = masks(table, 0, 64)
    assert [(key[r], r) for r in order] == sorted((key[r], r) for r in range(200))


@pytest.mark.parametrize("shape", [(0, 27), (4, 1), (1, 3)], ids=case_id)
def test_edge_tables(shape):
    table = torch.zeros(shape, dtype=torch.int32)
    order = ops.conv_row_order(table, 1)
    assert order.tolist() == [list(range(shape[0]))]


# (table, splits, error, message)
BAD_ORDER_REQUESTS = [
    (torch.zeros(5, 27, dtype=torch.int32), 0, ValueError, r"splits must be in \[1, 8\]"),
    (torch.zeros(5, 27, dtype=torch.int32), 9, ValueError, r"splits must be in \[1, 8\]"),
    (torch.zeros(5, 3, dtype=torch.int32), 4, ValueError, r"splits must be in \[1, 3\] for a "
                                                          r"table of 3 offsets, got 4"),
    (torch.zeros(5, 27, dtype=torch.int64), 1, TypeError, "nbr must be int32"),
    (torch.zeros(27, dtype=torch.int32), 1, ValueError, "nbr must be 2-D"),
]


@pytest.mark.parametrize("case", BAD_ORDER_REQUESTS, ids=lambda c: c[3][:20])
def test_bad_order_requests_raise(case):
    table, splits, error, message = case
    with pytest.raises(error, match=message):
        ops.conv_row_order(table, splits)


def conv_inputs(kind, dtype=torch.float64):
    nbr, nbr_t = a_map(kind)
    gen = make_gen("row_order_conv", kind)
    x = randn(gen, nbr_t.shape[0], 5, dtype=dtype).requires_grad_()
    w = randn(gen, nbr.shape[1], 5, 3, dtype=dtype).requires_grad_()
    return x, w, nbr, nbr_t


@pytest.mark.parametrize("kind", ["subm", "strided", "transposed"])
def test_conv_with_row_orders_gives_the_same_result_and_gradients(kind):
    x, w, nbr, nbr_t = conv_inputs(kind)
    plain = ops.sparse_conv(x, w, nbr, nbr_t)
    plain.square().sum().backward()
    want = [plain.detach(), x.grad.clone(), w.grad.clone()]
    x.grad = w.grad = None
    ordered = ops.sparse_conv(x, w, nbr, nbr_t, order=ops.conv_row_order(nbr, 2),
                              order_t=ops.conv_row_order(nbr_t, 2))
    ordered.square().sum().backward()
    for got, expected in zip([ordered.detach(), x.grad, w.grad], want):
        assert torch.equal(got, expected)


def bad_orders(nbr):
    rows = nbr.shape[0]
    good = ops.conv_row_order(nbr, 2)
    repeated = good.clone()
    repeated[1, 3] = repeated[1, 4]
    return [
        ("repeated", repeated, ValueError, "not a"),
        ("outside", good.clone().index_fill_(1, torch.tensor([0]), rows), ValueError, "not a"),
        ("rows", good[:, :-1], ValueError, r"must be \[splits, "),
        ("splits", torch.arange(rows, dtype=torch.int32).repeat(9, 1), ValueError, "splits"),
        ("dtype", good.long(), TypeError, "must be int32"),
    ]


@pytest.mark.parametrize("problem", ["repeated", "outside", "rows", "splits", "dtype"])
@pytest.mark.parametrize("call", ["ops", "torch.ops"])
def test_bad_row_orders_raise(call, problem):
    x, w, nbr, nbr_t = conv_inputs("strided")
    _, order, error, message = next(b for b in bad_orders(nbr) if b[0] == problem)
    with pytest.raises(error, match=message):
        if call == "ops":
            ops.sparse_conv(x, w, nbr, nbr_t, order=order)
        else:
            OPS.sparse_conv(x, w, nbr, nbr_t, order, None)


@pytest.mark.parametrize("value, splits", [("", 0), ("rows=2", 2), ("wgrad=compact,rows=3", 3),
                                           ("tiles=pipelined", 0)])
def test_rows_variant_is_read_from_the_environment(value, splits, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", value)
    assert kernel_map.rows_variant() == splits


def test_malformed_rows_variant_raises(monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_VARIANTS", "rows=two")
    with pytest.raises(ValueError, match="rows=two is not a number of splits"):
        kernel_map.rows_variant()


class Net(nn.Module):
    """SubM (keyed) -> strided conv (keyed) -> SubM -> inverse conv -> SubM reusing the first
    map: every way a conv layer gets a map."""

    def __init__(self):
        super().__init__()
        self.net = sp.SparseSequential(
            sp.SubMConv3d(4, 8, 3, indice_key="subm1"), nn.ReLU(),
            sp.SparseConv3d(8, 16, 3, stride=2, padding=1, indice_key="down"),
            sp.SubMConv3d(16, 16, 3, indice_key="subm2"),
            sp.SparseInverseConv3d(16, 8, 3, indice_key="down"),
            sp.SubMConv3d(8, 3, 3, indice_key="subm1"),
        )

    def forward(self, x):
        return self.net(x)


def run_net(net, features, idx):
    out = net(sparse_tensor(features, idx, SHAPE, 2))
    out.features.square().sum().backward()
    return out


@pytest.fixture
def orders_on_cpu(monkeypatch):
    """Row orders built for CPU maps too, with 2 splits (the CPU conv ignores them)."""
    monkeypatch.setattr(kernel_map, "_row_order_splits",
                        lambda kmap: 2 if kmap.kernel_volume > 1 else 0)


def test_layers_build_cache_and_pass_row_orders(orders_on_cpu, monkeypatch):
    torch.manual_seed(0)
    net = Net().double()
    gen = make_gen("row_order_net")
    idx = random_sites(gen, 2, SHAPE, count=300)
    features = randn(gen, 300, 4).requires_grad_()
    seen = []
    real_conv = ops.sparse_conv

    def spy(features, weight, nbr, nbr_t, *, order=None, order_t=None, check_tables=True):
        seen.append((nbr, nbr_t, order, order_t))
        return real_conv(features, weight, nbr, nbr_t, order=order, order_t=order_t,
                         check_tables=check_tables)

    monkeypatch.setattr(ops, "sparse_conv", spy)
    out = run_net(net, features, idx)
    assert len(seen) == 5
    for nbr, nbr_t, order, order_t in seen:
        assert torch.equal(order, ops.conv_row_order(nbr, 2))
        assert torch.equal(order_t, ops.conv_row_order(nbr_t, 2))
    assert seen[0][2] is seen[4][2]  # the head reuses the first map and its orders
    assert seen[3][2] is seen[1][3] and seen[3][3] is seen[1][2]  # the inverse conv swaps them
    kmap = out.indice_dict["down"]
    assert kmap.order_splits == 2 and kmap.order.shape == (2, kmap.nbr.shape[0])


def test_row_orders_leave_results_and_gradients_unchanged(orders_on_cpu, monkeypatch):
    torch.manual_seed(0)
    net = Net().double()
    gen = make_gen("row_order_same")
    idx = random_sites(gen, 2, SHAPE, count=300)
    features = randn(gen, 300, 4)
    results = []
    for forced in (True, False):
        if not forced:
            monkeypatch.undo()
        x = features.clone().requires_grad_()
        out = run_net(net, x, idx)
        results.append([out.features.detach(), x.grad, *(p.grad.clone()
                                                          for p in net.parameters())])
        net.zero_grad()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_no_input_gradient_order_without_gradients(orders_on_cpu):
    net = Net().double()
    idx = random_sites(make_gen("row_order_nograd"), 2, SHAPE, count=200)
    with torch.no_grad():
        out = net(sparse_tensor(randn(make_gen("f"), 200, 4), idx, SHAPE, 2))
    assert out.indice_dict["subm2"].order is not None
    assert out.indice_dict["subm2"].order_t is None
    # The inverse conv runs over the strided map's nbr_t: that order is built, nbr's is not.
    down = out.indice_dict["down"]
    assert down.order is not None and down.order_t is not None


def test_compiled_net_with_row_orders_matches_eager(orders_on_cpu):
    torch.manual_seed(0)
    net = Net()
    twin = Net()
    twin.load_state_dict(net.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    gen = make_gen("row_order_compile")
    idx = random_sites(gen, 2, SHAPE, count=300)
    features = randn(gen, 300, 4, dtype=torch.float32)
    torch._dynamo.reset()
    try:
        x, xc = features.clone().requires_grad_(), features.clone().requires_grad_()
        eager, comp = run_net(net, x, idx), run_net(compiled, xc, idx)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(comp.features, eager.features)
    torch.testing.assert_close(xc.grad, x.grad)
    assert comp.indice_dict["subm1"].order.shape == (2, 300)
