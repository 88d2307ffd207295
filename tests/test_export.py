"""Deploying without Python: spconv_lite.export packages, libspconv_lite_ops and the C++ example.

- A SECOND backbone (VoxelBackBone8x + HeightCompression, KITTI grid) is exported once per
  session; the package, loaded back, gives the eager BEV map on two real frames of different
  sizes (relative error = max |package - eager| / max |eager| <= 1e-5).
- A small net exported for a batch of two clouds gives the eager sparse output.
- Models that cannot become a correct package fail at export with a clear ExportError.
- The operator library and examples/cpp are built with CMake against the installed torch; the
  library links no Python, and the C++ program prints and writes the eager BEV map of a frame.
  Without cmake, ninja or a compiler these tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import lidar_file, make_gen, randn, require
from torch import nn

import spconv_lite as sp
from spconv_lite.export import BEVBackbone, ExportError, export_model, load_package
from spconv_lite.io import read_points
from spconv_lite.models import HeightCompression, VoxelBackBone8x

REPO = Path(__file__).resolve().parents[1]
FRAMES = ["kitti_object_training_000000.bin", "kitti_000008_reduced_mmdet3d_demo.bin"]
MAX_RELATIVE_ERROR = 1e-5


def kitti_voxelizer(voxel_size=(0.05, 0.05, 0.1)) -> sp.PointToVoxel:
    """OpenPCDet's KITTI test-time voxelization (5 points per voxel, 40000 voxels)."""
    return sp.PointToVoxel(voxel_size, [0, -40, -3, 70.4, 40, 1], 4, 40000, 5)


def frame_input(voxelizer: sp.PointToVoxel, names: list[str], spatial_shape):
    """The sparse input of a batch of frames, on ``spatial_shape``."""
    x = sp.batch_point_clouds([read_points(lidar_file(n)) for n in names], voxelizer)
    return sp.SparseConvTensor(x.features, x.indices, spatial_shape, x.batch_size)


def randomize_norms(model: nn.Module, *key) -> nn.Module:
    """Seeded BatchNorm statistics and affine parameters, so that every layer matters and the
    outputs are O(1) (fresh statistics would leave them tiny)."""
    gen = make_gen("export", *key)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
            n = bn.num_features
            bn.running_mean.copy_(randn(gen, n, dtype=torch.float32, scale=0.1))
            bn.running_var.copy_(randn(gen, n, dtype=torch.float32).abs() * 0.05 + 0.02)
            bn.weight.copy_(randn(gen, n, dtype=torch.float32).abs() + 0.5)
            bn.bias.copy_(randn(gen, n, dtype=torch.float32, scale=0.1))
    return model.eval()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def second_package(tmp_path_factory):
    """(eager model, voxelizer, package path) of SECOND's backbone, exported from frame 0."""
    torch.manual_seed(0)
    voxelizer = kitti_voxelizer()
    backbone = VoxelBackBone8x(4, voxelizer.geometry.grid_size)
    model = randomize_norms(BEVBackbone(backbone, HeightCompression(256)), "second")
    example = frame_input(voxelizer, FRAMES[:1], backbone.sparse_shape)
    path = tmp_path_factory.mktemp("export") / "second_bev.pt2"
    export_model(model, example, path, voxelizer=voxelizer)
    return model, voxelizer, path


def eager_bev(model: BEVBackbone, voxelizer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = frame_input(voxelizer, [name], model.backbone.sparse_shape)
    with torch.no_grad():
        return model(x), x


def test_package_matches_eager_on_frames_of_different_sizes(second_package):
    model, voxelizer, path = second_package
    package = load_package(path)
    counts = []
    for name in FRAMES:  # one loaded package, two clouds: the site count is dynamic
        want, x = eager_bev(model, voxelizer, name)
        (got,) = package(x.features, x.indices)
        assert got.shape == want.shape == (1, 256, 200, 176)
        assert relative_error(got, want) <= MAX_RELATIVE_ERROR, name
        counts.append(x.indices.shape[0])
    assert counts[0] != counts[1]


def test_package_metadata_holds_the_voxel_grid(second_package):
    _, voxelizer, path = second_package
    meta = load_package(path).get_metadata()
    g = voxelizer.geometry
    assert [float(v) for v in meta["spconv_lite.voxel_size"].split()] == g.voxel_size
    assert [float(v) for v in meta["spconv_lite.range_min"].split()] == g.range_min
    assert [int(v) for v in meta["spconv_lite.grid_size"].split()] == g.grid_size
    assert meta["spconv_lite.max_points_per_voxel"] == "5"
    assert meta["spconv_lite.max_voxels"] == "40000"
    assert meta["spconv_lite.batch_size"] == "1"


class SmallNet(nn.Module):
    """SubM -> strided conv -> SubM with norms: a sparse tensor out (features and sites)."""

    def __init__(self):
        super().__init__()
        self.net = sp.SparseSequential(
            sp.SubMConv3d(4, 16, 3, bias=False, indice_key="subm1"),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            sp.SparseConv3d(16, 32, 3, stride=2, padding=1, bias=False, indice_key="down1"),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            sp.SubMConv3d(32, 32, 3, indice_key="subm2"),
        )

    def forward(self, x):
        return self.net(x)


def test_package_for_a_batch_of_two_matches_eager(tmp_path):
    torch.manual_seed(0)
    voxelizer = kitti_voxelizer(voxel_size=(0.2, 0.2, 0.2))  # coarse: a quick small net
    model = randomize_norms(SmallNet(), "batch2")
    shape = voxelizer.spatial_shape
    path = export_model(model, frame_input(voxelizer, FRAMES, shape), tmp_path / "b2.pt2")
    package = load_package(path)
    for names in (FRAMES, FRAMES[::-1]):
        x = frame_input(voxelizer, names, shape)
        with torch.no_grad():
            want = model(x)
        features, indices = package(x.features, x.indices)
        assert torch.equal(indices, want.indices)
        assert set(indices[:, 0].tolist()) == {0, 1}
        assert relative_error(features, want.features) <= MAX_RELATIVE_ERROR


# ---------------------------------------------------------------------------------------------
# What cannot be exported fails at export, with a message that says why.


def small_example() -> sp.SparseConvTensor:
    gen = make_gen("export_errors")
    lin = torch.randperm(8 * 9 * 10, generator=gen)[:60]
    indices = torch.stack([lin * 0, lin // 90, lin // 10 % 9, lin % 10], 1).int()
    return sp.SparseConvTensor(randn(gen, 60, 4, dtype=torch.float32), indices, [8, 9, 10], 1)


class ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sp.SubMConv3d(4, 8, 3)

    def forward(self, x):
        return {"out": self.conv(x)}


class KeepsKernelMaps(nn.Module):
    """Builds its kernel maps on the first call and reuses them for every later input."""

    def __init__(self):
        super().__init__()
        self.conv = sp.SubMConv3d(4, 8, 3, indice_key="subm1")
        self.maps = None

    def forward(self, x):
        if self.maps is None:
            out = self.conv(x)
            self.maps = out.indice_dict
            return out
        x.indice_dict.update(self.maps)
        return self.conv(x)


class ReadsPlainTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.full((1, 4), 2.0)  # not a parameter or buffer

    def forward(self, x):
        return x.features * self.scale


class AddsOtherSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.subm = sp.SubMConv3d(4, 8, 3)
        self.conv = sp.SparseConv3d(4, 8, 3, padding=1)

    def forward(self, x):
        return sp.functional.sparse_add(self.subm(x), self.conv(x)).features


def _warmed(model: nn.Module) -> nn.Module:
    model.eval()(small_example())  # a first eager call, as a user would have made
    return model


@pytest.mark.parametrize(
    "make_model, message",
    [
        (lambda: ReturnsDict().eval(), r"got dict .*BEVBackbone"),
        (lambda: _warmed(KeepsKernelMaps()), r"fixes the number of sites to the example's 60"),
        (lambda: ReadsPlainTensor().eval(), r"not inputs, parameters or buffers: \['model\.scale"),
        (lambda: SmallNet().train(), r"training mode"),
        (lambda: AddsOtherSites().eval(), r"branches in Python on a value computed from the "
                                          r"input's data.*sparse_add"),
    ],
    ids=["dict_output", "kernel_maps_kept_across_calls", "plain_tensor_attribute", "training",
         "sparse_add"],
)
def test_unexportable_model_fails_at_export(make_model, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export_model(make_model(), small_example(), tmp_path / "never.pt2")
    assert not list(tmp_path.iterdir())  # no package, not even a partial one


@pytest.mark.parametrize("sites", [1, 0])
def test_example_of_fewer_than_two_sites_is_refused(sites, tmp_path):
    # torch.export would take its site count for a constant of the model and blame the model.
    example = small_example()
    example = sp.SparseConvTensor(example.features[:sites], example.indices[:sites], [8, 9, 10], 1)
    with pytest.raises(ValueError, match=rf"example must have at least 2 sites .*got {sites} "):
        export_model(SmallNet().eval(), example, tmp_path / "never.pt2")
    assert not list(tmp_path.iterdir())


def test_example_the_model_cannot_take_is_refused_before_tracing(tmp_path):
    # A float64 example for a float32 model was traced as a float64 graph and packaged: the
    # package then corrupted the heap on float32 inputs. Now the eager error comes first.
    example = small_example()
    example = example.replace_feature(example.features.double())
    with pytest.raises(TypeError, match="weight dtype Float must match features dtype Double"):
        export_model(SmallNet().eval(), example, tmp_path / "never.pt2")
    assert not list(tmp_path.iterdir())


class HalvesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = sp.SubMConv3d(4, 8, 3)

    def forward(self, x):
        x.features.mul_(0.5)  # in place
        return self.conv(x).features


def test_export_leaves_the_example_as_it_was(tmp_path):
    example = small_example()
    before = example.features.clone()
    export_model(HalvesItsInput().eval(), example, tmp_path / "halves.pt2")
    assert torch.equal(example.features, before)


def test_tracing_refuses_a_weight_of_another_dtype():
    # The fake kernel checks the dtypes as the real one does, so no graph of another dtype is
    # traced past it (torch.export alone, without export_model's eager call).
    conv = sp.SubMConv3d(4, 8, 3).eval()
    example = small_example()
    model = sp.export.SparseInputModel(conv, example.spatial_shape, 1)
    with pytest.raises(Exception, match="weight dtype torch.float32 must match features dtype "
                                        "torch.float64"):
        torch.export.export(model, (example.features.double(), example.indices))


def test_voxelizer_with_another_feature_count_is_refused(tmp_path):
    voxelizer = sp.PointToVoxel(vsize_xyz=[1.0, 1.0, 1.0], coors_range_xyz=[0, 0, 0, 10, 9, 8],
                                num_point_features=5, max_num_voxels=100,
                                max_num_points_per_voxel=4)
    with pytest.raises(ValueError, match="num_point_features 5 differs from the example's "
                                         "input channels 4"):
        export_model(SmallNet().eval(), small_example(), tmp_path / "never.pt2",
                     voxelizer=voxelizer)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# C++: the operator library and examples/cpp, built with CMake against the installed torch.


def _tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed (pip install cmake ninja)")
    return path


def _run(args: list, cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def cpp_build(tmp_path_factory) -> dict:
    """Builds and installs libspconv_lite_ops, then builds examples/cpp against the installed
    package (find_package(spconv_lite)) and the torch wheel's libtorch."""
    cmake, _ = _tool("cmake"), _tool("ninja")
    require(shutil.which("c++") is not None, "no C++ compiler (c++) on PATH")
    root = tmp_path_factory.mktemp("cpp")
    prefix = root / "install"
    common = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"]
    torch_prefix = torch.utils.cmake_prefix_path
    _run([cmake, "-S", REPO, "-B", root / "ops", *common, f"-DCMAKE_PREFIX_PATH={torch_prefix}",
          "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"])
    _run([cmake, "--build", root / "ops"])
    _run([cmake, "--install", root / "ops", "--prefix", prefix])
    _run([cmake, "-S", REPO / "examples" / "cpp", "-B", root / "example", *common,
          f"-DCMAKE_PREFIX_PATH={prefix};{torch_prefix}"])
    _run([cmake, "--build", root / "example"])
    return {"library": prefix / "lib" / "libspconv_lite_ops.so", "ops_build": root / "ops",
            "example": root / "example" / "run_backbone"}


def _needed_libraries(path: Path) -> list[str]:
    readelf = _tool("readelf")
    dynamic = _run([readelf, "-d", path]).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)


def test_operator_library_links_libtorch_and_no_python(cpp_build):
    needed = _needed_libraries(cpp_build["library"])
    assert "libtorch_cpu.so" in needed and "libc10.so" in needed
    assert not [lib for lib in needed if "python" in lib or "pybind" in lib], needed
    undefined = _run([_tool("nm"), "-D", "--undefined-only", cpp_build["library"]]).stdout
    assert not re.findall(r"\b(Py\w+|_Py\w+|\w*pybind11\w*)", undefined)


def test_cmake_and_setup_compile_the_same_operator_sources(cpp_build):
    with mock.patch("setuptools.setup"):  # setup.py's functions, without running a build
        setup_py = runpy.run_path(str(REPO / "setup.py"))
    from_setup = {REPO / p for p in setup_py["operator_sources"]("cpp")}
    commands = json.loads((cpp_build["ops_build"] / "compile_commands.json").read_text())
    from_cmake = {Path(c["file"]) for c in commands}
    assert REPO / "src" / "registration.cpp" in from_cmake
    assert from_cmake == from_setup
    # The Python extension adds its own sources, and only those, to the operators (and the CUDA
    # sources where torch and a toolkit allow a CUDA build).
    extension = setup_py["_extension"]()
    cuda = setup_py["operator_sources"]("cuda") if setup_py["_want_cuda"]() else []
    assert set(extension.sources) == {*setup_py["operator_sources"]("cpp"), *cuda,
                                      "src/python/module.cpp", "src/python/lzf.cpp"}


def test_cpp_example_gives_the_eager_bev_map(cpp_build, second_package, tmp_path):
    model, voxelizer, path = second_package
    name = FRAMES[0]
    out = tmp_path / "bev.bin"
    printed = _run([cpp_build["example"], path, lidar_file(name), out, "2"]).stdout
    want, x = eager_bev(model, voxelizer, name)
    got = torch.from_numpy(np.fromfile(out, dtype=np.float32)).reshape(want.shape)
    assert relative_error(got, want) <= MAX_RELATIVE_ERROR
    assert f"voxels {x.indices.shape[0]}\n" in printed
    assert "output [1, 256, 200, 176] float32" in printed
    sums = re.search(r"sum (\S+), abs max (\S+)", printed)
    assert float(sums[1]) == pytest.approx(float(want.sum()), rel=MAX_RELATIVE_ERROR)
    assert float(sums[2]) == pytest.approx(float(want.abs().max()), rel=MAX_RELATIVE_ERROR)


def test_cpp_example_refuses_bad_arguments_with_a_message(cpp_build, second_package, tmp_path):
    _, _, path = second_package
    empty, outside = tmp_path / "empty.bin", tmp_path / "outside.bin"
    empty.write_bytes(b"")
    np.array([[500.0, 500.0, 500.0, 1.0]], dtype=np.float32).tofile(outside)
    frame = lidar_file(FRAMES[0])
    for args, message in [
        ((empty,), "no point of .*empty.bin \\(0 points\\) lies inside the package's voxel grid"),
        ((outside,), "no point of .*outside.bin \\(1 points\\) lies inside"),
        ((tmp_path,), "FRAME .* is not a file"),
        ((frame, "abc"), "THREADS must be a whole number >= 1, got 'abc'"),
        ((frame, "0"), "THREADS must be a whole number >= 1, got '0'"),
        ((frame, "2x"), "THREADS must be a whole number >= 1, got '2x'"),
    ]:
        out = tmp_path / "bev.bin"
        done = subprocess.run([cpp_build["example"], path, args[0], out, *args[1:]],
                              capture_output=True, text=True)
        assert done.returncode == 1, (args, done.stderr)
        assert re.search("run_backbone: error: " + message, done.stderr), done.stderr
        assert not out.exists()
