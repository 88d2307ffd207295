"""The side-by-side GPU benchmark (benchmarks/bench_cuda.py) without a GPU: its comparison,
map-recording and reporting logic, and a whole dry run on the CPU (--device cpu --quick), so
that the script's first run on a GPU is not also its first run."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import lidar_file, make_gen, random_sites

import spconv_lite as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cuda  # noqa: E402


def sparse(indices, features, shape=(4, 4, 4)):
    return sp.SparseConvTensor(features, indices, list(shape), 2)


def test_compare_by_site_ignores_row_order():
    idx = random_sites(make_gen("bench_compare"), 2, (4, 4, 4), count=20)
    f = torch.randn(20, 3, generator=make_gen("bench_compare_f"))
    perm = torch.randperm(20, generator=make_gen("bench_compare_p"))
    same = bench_cuda.compare_by_site(sparse(idx[perm], f[perm] * 1.001), sparse(idx, f))
    assert same["same_sites"] and same["sites"] == same["ref_sites"] == 20
    assert same["max_rel_err"] == pytest.approx(0.001, rel=1e-3)


def test_compare_by_site_reports_different_sites():
    idx = random_sites(make_gen("bench_sites"), 2, (4, 4, 4), count=20)
    f = torch.randn(20, 3)
    moved = idx.clone()
    moved[3, 1] = (moved[3, 1] + 1) % 4
    if len({tuple(r) for r in moved.tolist()}) < 20:
        moved[3, 0] = 1 - moved[3, 0]
    result = bench_cuda.compare_by_site(sparse(moved, f), sparse(idx, f))
    assert not result["same_sites"] and "max_rel_err" not in result
    fewer = bench_cuda.compare_by_site(sparse(idx[:19], f[:19]), sparse(idx, f))
    assert not fewer["same_sites"] and (fewer["sites"], fewer["ref_sites"]) == (19, 20)


def test_relative_error_flags_non_finite_values():
    a = torch.tensor([1.0, 2.0])
    assert bench_cuda.relative_error(a, a) == 0.0
    assert math.isnan(bench_cuda.relative_error(torch.tensor([1.0, float("nan")]), a))
    grads = bench_cuda.compare_grads({"w": a * 1.1, "b": a}, {"w": a, "b": a, "extra": a})
    assert grads["params"] == 2 and grads["worst_param"] == "w"
    assert grads["max_rel_err"] == pytest.approx(0.1)


# (arguments of a map builder, type): ours (build_subm_map / build_conv_map) and spconv's names.
MAP_TYPES = [
    (dict(kernel_size=[3, 3, 3], dilation=[1, 1, 1]), "subm k3"),
    (dict(kernel_size=[3, 3, 3], stride=[2, 2, 2], transposed=False), "regular k3 s2"),
    (dict(kernel_size=[3, 1, 1], stride=[2, 1, 1], transposed=False), "regular k3x1x1 s2x1x1"),
    (dict(ksize=[3, 3, 3], stride=[1, 1, 1], subm=True), "subm k3"),
    (dict(ksize=[2, 2, 2], stride=[2, 2, 2], subm=False, transpose=True), "transposed k2 s2"),
    ({}, "unknown"),
]


@pytest.mark.parametrize("arguments, kind", MAP_TYPES)
def test_map_type_names_ours_and_spconvs_alike(arguments, kind):
    assert bench_cuda.map_type(arguments) == kind


def test_recording_maps_sees_every_map_a_forward_builds():
    lib = bench_cuda.load_library("spconv_lite")
    net = sp.SparseSequential(sp.SubMConv3d(3, 4, 3, indice_key="a"),
                              sp.SubMConv3d(4, 4, 3, indice_key="a"),  # reuses the map
                              sp.SparseConv3d(4, 4, 3, stride=2, padding=1),
                              sp.SparseMaxPool3d(2, 2))
    idx = random_sites(make_gen("bench_record"), 1, (8, 8, 8), count=60)
    x = sp.SparseConvTensor(torch.randn(60, 3), idx, [8, 8, 8], 1)
    original = lib.map_module.build_subm_map
    with bench_cuda.recording_maps(lib) as calls:
        net(x)
    assert [c.kind for c in calls] == ["subm k3", "regular k3 s2", "regular k2 s2"]
    assert lib.map_module.build_subm_map is original
    bench_cuda.replay(calls)()  # the recorded calls run again on their own


def test_missing_libraries_are_a_reported_skip():
    libs, skipped = bench_cuda.load_libraries(["spconv_lite", "no_such_library"])
    assert list(libs) == ["spconv_lite"]
    assert "no_such_library" in skipped["no_such_library"]


def test_a_library_that_fails_is_an_error_of_its_own():
    # A peer that cannot build the network (or fails in a call) is reported; the others run.
    ours = bench_cuda.load_library("spconv_lite")
    broken = dataclasses.replace(ours, name="broken", ns=types.SimpleNamespace())
    gen = make_gen("bench_broken")
    inp = bench_cuda.Input("tiny", torch.randn(80, 3, generator=gen),
                           random_sites(gen, 1, (64, 64, 64), count=80), [64, 64, 64])
    state = bench_cuda.NETWORKS["spconv"](ours.ns).state_dict()
    case = bench_cuda.bench_network_case(
        "spconv", inp, torch.float32, True, {"spconv_lite": ours, "broken": broken}, state,
        torch.device("cpu"), types.SimpleNamespace(warmup=0, repeats=1), lambda: None)
    assert "AttributeError" in case["errors"]["broken"]
    assert list(case["libs"]) == ["spconv_lite"] and case["libs"]["spconv_lite"]["median_ms"] > 0


def test_dry_run_on_the_cpu_and_its_results_file(tmp_path):
    data = lidar_file("kitti_object_training_000000.bin").parent
    lidar_file("spconv_benchmark-pc.npz")
    out = tmp_path / "bench.json"
    result = bench_cuda.main(["--device", "cpu", "--quick", "--dtypes", "float32",
                              "--repeats", "1", "--warmup", "0", "--data", str(data),
                              "--json", str(out)])
    meta = result["meta"]
    # Every library is either measured or skipped with its reason.
    assert set(meta["libraries"]) | set(meta["skipped_libraries"]) == set(bench_cuda.LIBRARIES)
    cases = {(c["network"], c["input"], c["pass"]) for c in result["networks"]}
    assert cases == {(n, i, p) for n, i in bench_cuda.PLAN for p in ("fwd", "train")}
    for case in result["networks"]:
        assert case["libs"]["spconv_lite"]["median_ms"] > 0
    assert all(m["libs"]["spconv_lite"]["maps"] > 0 for m in result["maps"])
    assert result["voxelize"]["libs"]["spconv_lite"]["median_ms"] > 0
    assert json.loads(out.read_text())["meta"]["quick"] is True

    paths = bench_cuda.write_results(json.loads(out.read_text()), tmp_path / "results")
    assert [p.suffix for p in paths] == [".json", ".md"]
    page = paths[1].read_text()
    assert "| second | kitti (3,000) | float32 | fwd |" in page
    assert "## Kernel maps of one forward" in page and "## PointToVoxel" in page
    if "spconv" in meta["libraries"]:  # the baseline ran beside ours: its ratio is reported
        assert "spconv / spconv_lite" in page
        fwd = next(c for c in result["networks"] if c["pass"] == "fwd")
        assert fwd["compare"]["spconv_lite"]["same_sites"]
