"""torch.compile(fullgraph=True, backend="aot_eager") of a small sparse network gives the
eager results: forward in eval and train mode, and the backward pass.

The main cases run on each device of helpers.DEVICES, and on CUDA also with the default backend
(inductor, which generates Triton kernels for the dense parts around the sparse ops).

fullgraph=True makes any graph break (in SparseConvTensor, the kernel-map cache, the modules or
the op wrappers) an error, so these tests also guard traceability of the whole Python layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICES, make_gen, randn, random_sites, sparse_tensor
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import spconv_lite as sp

SHAPE = (12, 11, 10)
BATCH = 2


class Net(nn.Module):
    """SubM block (BatchNorm1d + ReLU) -> strided conv (keyed) -> SubM -> max pool branch, and
    inverse conv back to the input sites -> BatchNorm1d + ReLU -> SubM head.

    BatchNorm1d only runs on tensors whose row count is the input's: see
    test_batchnorm_after_strided_conv_compiles for why.
    """

    def __init__(self, norm_after_down: bool = False):
        super().__init__()
        self.block = sp.SparseSequential(
            sp.SubMConv3d(4, 8, 3, bias=False, indice_key="subm1"),
            nn.BatchNorm1d(8),
            nn.ReLU(),
        )
        down = [sp.SparseConv3d(8, 16, 3, stride=2, padding=1, bias=False, indice_key="down1")]
        if norm_after_down:
            down += [nn.BatchNorm1d(16), nn.ReLU()]
        self.down = sp.SparseSequential(*down, sp.SubMConv3d(16, 16, 3, indice_key="subm2"))
        self.pool = sp.SparseMaxPool3d(2, stride=2)
        self.up = sp.SparseSequential(
            sp.SparseInverseConv3d(16, 8, 3, indice_key="down1", bias=False),
            nn.BatchNorm1d(8),
            nn.ReLU(),
        )
        self.head = sp.SubMConv3d(8, 3, 3, indice_key="subm1")  # reuses the first map

    def forward(self, x: sp.SparseConvTensor):
        x = self.block(x)
        y = self.down(x)
        pooled = self.pool(y)
        z = self.up(y)
        out = self.head(z.replace_feature(z.features + x.features))
        return out, pooled


def make_input(key, count=400, device="cpu"):
    gen = make_gen("compile", key)
    idx = random_sites(gen, BATCH, SHAPE, count=count).to(device)
    features = randn(gen, count, 4, dtype=torch.float32).to(device).requires_grad_()
    return features, idx


def run(net, features, idx):
    out, pooled = net(sparse_tensor(features, idx, SHAPE, BATCH))
    return out, pooled


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same_sparse(a: sp.SparseConvTensor, b: sp.SparseConvTensor, tol: float = 1e-6):
    assert torch.equal(a.indices, b.indices)
    assert a.spatial_shape == b.spatial_shape and a.batch_size == b.batch_size
    torch.testing.assert_close(a.features, b.features, rtol=tol, atol=tol)


# inductor generates its own kernels for the dense parts (BatchNorm, ReLU, additions), which
# round differently from eager.
BACKEND_TOL = {"aot_eager": 1e-6, "inductor": 1e-4}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compiled_forward_and_backward_match_eager(mode, device, backend):
    if backend == "inductor" and device == "cpu":
        pytest.skip("inductor builds C++ for the CPU (minutes on CI); it runs on CUDA")
    tol = BACKEND_TOL[backend]
    torch.manual_seed(0)
    net = Net().to(device)
    net.train(mode == "train")
    compiled_net = copy.deepcopy(net)  # BatchNorm running stats must start equal
    compiled = torch.compile(compiled_net, fullgraph=True, backend=backend)

    features, idx = make_input(mode, device=device)
    eager_out, eager_pool = run(net, features, idx)
    features_c = features.detach().clone().requires_grad_()
    comp_out, comp_pool = run(compiled, features_c, idx)

    assert_same_sparse(eager_out, comp_out, tol)
    assert_same_sparse(eager_pool, comp_pool, tol)
    assert torch.equal(comp_out.indices, idx)  # the head is a SubM over the input sites

    gen = make_gen("compile_upstream", mode)
    up_out = randn(gen, *eager_out.features.shape, dtype=torch.float32).to(device)
    up_pool = randn(gen, *eager_pool.features.shape, dtype=torch.float32).to(device)
    ((eager_out.features * up_out).sum() + (eager_pool.features * up_pool).sum()).backward()
    ((comp_out.features * up_out).sum() + (comp_pool.features * up_pool).sum()).backward()
    grad_tol = max(tol, 1e-5)
    torch.testing.assert_close(features_c.grad, features.grad, rtol=grad_tol, atol=grad_tol)
    for (name, p), p_c in zip(net.named_parameters(), compiled_net.parameters()):
        torch.testing.assert_close(p_c.grad, p.grad, rtol=grad_tol, atol=grad_tol, msg=name)
    for b, b_c in zip(net.buffers(), compiled_net.buffers()):
        torch.testing.assert_close(b_c, b)


# A plain torch.compile(model), without fullgraph=True, must not break the graph at the ops
# whose output row count depends on the data (map builds, voxelization): one graph in all.
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_plain_compile_gives_one_graph(mode):
    torch.manual_seed(0)
    net = Net(norm_after_down=True).train(mode == "train")
    compiled_net = copy.deepcopy(net)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_net, backend=counter)
    features, idx = make_input(("plain", mode))
    eager = run(net, features, idx)
    comp = run(compiled, features, idx)
    assert counter.frame_count == 1
    for e, c in zip(eager, comp):
        assert_same_sparse(e, c)


def test_plain_compile_of_voxelization_gives_one_graph():
    voxelizer = sp.PointToVoxel([0.5, 0.5, 0.5], [0, 0, 0, 4, 4, 4], 4, 1000, 3)
    points = randn(make_gen("compile_voxelize"), 200, 4, dtype=torch.float32).abs() * 2

    def fn(p):
        voxels, coords, num = voxelizer(p)
        return voxels.sum(1) / num.clamp(min=1).unsqueeze(1), coords

    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(fn, backend=counter)(points)
    assert counter.frame_count == 1
    for g, e in zip(got, fn(points)):
        torch.testing.assert_close(g, e)


def test_compiled_net_keeps_the_grid_symbolic():
    """A grid that changes per frame (Pointcept's max + 96, SpUNetBase.input_tensor) compiles
    once more, not once per grid (after 8 grids dynamo fell back to eager)."""
    net = sp.SparseSequential(sp.SubMConv3d(4, 8, 3, indice_key="s"), nn.BatchNorm1d(8),
                              sp.SparseConv3d(8, 8, 3, stride=2, padding=1),
                              sp.SparseMaxPool3d(2, 2), sp.ToDense()).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, backend=counter)
    with torch.no_grad():
        for i in range(6):
            features, idx = make_input(("grid", i), 200 + i)
            shape = [s + i for s in SHAPE]
            x = sp.SparseConvTensor(features, idx, shape, BATCH)
            torch.testing.assert_close(compiled(x), net(x), rtol=1e-6, atol=1e-6)
    assert counter.frame_count <= 2


def test_compiled_net_handles_a_different_number_of_sites():
    torch.manual_seed(0)
    net = Net().eval()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for key, count in (("a", 300), ("b", 450), ("c", 250)):
            features, idx = make_input(key, count)
            eager = run(net, features, idx)
            comp = run(compiled, features, idx)
            for e, c in zip(eager, comp):
                assert_same_sparse(e, c)


def test_compiled_to_dense_and_global_pool():
    torch.manual_seed(0)
    net = sp.SparseSequential(sp.SparseConv3d(4, 6, 2, stride=2), nn.ReLU())
    features, idx = make_input("dense")

    def fn(f):
        y = net(sparse_tensor(f, idx, SHAPE, BATCH))
        return y.dense(), sp.SparseGlobalAvgPool()(y), sp.SparseGlobalMaxPool()(y)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for e, c in zip(fn(features), compiled(features)):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("consumer", ["dense", "global_avg", "global_max"])
@pytest.mark.parametrize("fault", ["duplicate", "outside"])
def test_compiled_site_checks(consumer, fault):
    """A compiled dense() and global pools refuse duplicate and out-of-grid sites, as they do
    eagerly (the graph asserts it: the eager check reads data). They had no check compiled: a
    duplicate site kept one of its rows in dense() and counted twice in the pools."""
    consume = {"dense": lambda x: x.dense(), "global_avg": sp.SparseGlobalAvgPool(),
               "global_max": sp.SparseGlobalMaxPool()}[consumer]
    features, idx = make_input("site_checks", count=50)
    bad = idx.clone()
    if fault == "duplicate":
        bad[7] = bad[3]
    else:
        bad[7, 2] = SHAPE[1]
    compiled = torch.compile(lambda f, i: consume(sparse_tensor(f, i, SHAPE, BATCH)),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(features, idx),
                               consume(sparse_tensor(features, idx, SHAPE, BATCH)))
    message = {"duplicate": "indices contains duplicate sites",
               "outside": r"indices has rows outside the grid"}[fault]
    with pytest.raises(RuntimeError, match=message):
        compiled(features, bad)


# The row count after a strided conv is data dependent; SparseSequential promises the tracer a
# usable count before BatchNorm so that batch_norm's size checks trace.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batchnorm_after_strided_conv_compiles(mode, device):
    torch.manual_seed(0)
    net = Net(norm_after_down=True).to(device).train(mode == "train")
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    features, idx = make_input("bn_after_down", device=device)
    with torch.no_grad():
        comp = run(compiled, features, idx)
        eager = run(net, features, idx)
    for e, c in zip(eager, comp):
        assert_same_sparse(e, c)


def test_compiled_batchnorm_on_an_empty_input_names_the_need():
    net = sp.SparseSequential(sp.SubMConv3d(3, 4, 3), nn.BatchNorm1d(4)).eval()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    empty = sp.SparseConvTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32), SHAPE,
                                BATCH)
    with pytest.raises(Exception, match=r"a BatchNorm in a compiled or exported "
                                        r"SparseSequential needs at least 1 site"):
        compiled(empty)
    assert net(empty).features.shape == (0, 4)  # eager takes it


class _ExportWrapper(nn.Module):
    """torch.export needs tensors in and out: build the sparse tensor inside."""

    def __init__(self):
        super().__init__()
        self.net = Net(norm_after_down=True).eval()

    def forward(self, features, indices):
        out, pooled = self.net(sparse_tensor(features, indices, SHAPE, BATCH))
        return out.features, out.indices, pooled.features, pooled.indices


def test_torch_export_matches_eager():
    torch.manual_seed(0)
    model = _ExportWrapper()
    features, idx = make_input("export")
    exported = torch.export.export(model, (features, idx))
    ops_in_graph = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "spconv_lite.build_conv_map.default" in ops_in_graph
    with torch.no_grad():
        for got, want in zip(exported.module()(features, idx), model(features, idx)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sparse_conv_tensor_reads_features_through_the_property():
    """TorchDynamo before torch 2.13 traces ``t.features = v`` (a property setter) as a plain
    attribute and leaves ``t._features`` as it was, so a method that read ``self._features``
    saw the old features inside a compiled region (the conv's input instead of its output in
    ``dense()`` on torch 2.11). Only the property itself and the constructor may touch it."""
    import ast
    import inspect

    from spconv_lite import tensor

    tree = ast.parse(inspect.getsource(tensor.SparseConvTensor))
    readers = sorted({
        method.name
        for method in tree.body[0].body if isinstance(method, ast.FunctionDef)
        for node in ast.walk(method)
        if isinstance(node, ast.Attribute) and node.attr == "_features"
    })
    assert readers == ["__init__", "features"], readers
