"""The side-by-side GPU benchmark (benchmarks/bench_cuda.py) without a GPU: its comparison,
map-recording and reporting logic, and a whole dry run on the CPU (--device cpu --quick), so
that the script's first run on a GPU is not also its first run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import lidar_file, make_gen, random_sites

import spconv_lite as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cuda  # noqa: E402
import common  # noqa: E402
import results_file  # noqa: E402


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
    ceilings = meta["ceilings"]
    assert ceilings["copy_gb_per_s"] > 0 and list(ceilings["mm_tflops"]) == ["float32"]
    assert ceilings["mm_tflops"]["float32"] > 0

    paths = bench_cuda.write_results(json.loads(out.read_text()), tmp_path / "results")
    assert [p.suffix for p in paths] == [".json", ".md"]
    page = paths[1].read_text()
    assert "| second | kitti (3,000) | float32 | fwd |" in page
    assert "## Kernel maps of one forward" in page and "## PointToVoxel" in page
    assert f"- {bench_cuda.ceilings_line(ceilings)}; datasheet peaks float16 989," in page
    assert "% of peak, " in page and "% of torch.mm) |" in page  # the networks' useful TFLOP/s
    if "spconv" in meta["libraries"]:  # the baseline ran beside ours: its ratio is reported
        assert "spconv / spconv_lite" in page
        fwd = next(c for c in result["networks"] if c["pass"] == "fwd")
        assert fwd["compare"]["spconv_lite"]["same_sites"]


# (sweep entry, SPCONV_LITE_CUDA_VARIANTS inside, SPCONV_LITE_CUDA_CONV_ALGO inside)
VARIANT_ENTRIES = [("", "", "auto"), ("rows=2,tiles=pipelined", "rows=2,tiles=pipelined", "auto"),
                   ("algo=fused,rows=3", "rows=3", "fused")]


@pytest.mark.parametrize("entry, variants, algo", VARIANT_ENTRIES)
def test_variants_env_sets_and_restores_the_switches(entry, variants, algo, monkeypatch):
    monkeypatch.setenv("SPCONV_LITE_CUDA_CONV_ALGO", "gemm")
    monkeypatch.delenv("SPCONV_LITE_CUDA_VARIANTS", raising=False)
    with bench_cuda.variants_env(entry):
        assert (os.environ["SPCONV_LITE_CUDA_VARIANTS"], os.environ["SPCONV_LITE_CUDA_CONV_ALGO"]
                ) == (variants, algo)
    assert "SPCONV_LITE_CUDA_VARIANTS" not in os.environ
    assert os.environ["SPCONV_LITE_CUDA_CONV_ALGO"] == "gemm"


def test_measured_ceilings_and_the_shares_of_them():
    args = types.SimpleNamespace(quick=True, warmup=0, repeats=1)
    ceilings = bench_cuda.measure_ceilings(torch.device("cpu"), [torch.float64], args)
    assert ceilings["copy_bytes"] == 1 << 24 and ceilings["mm_size"] == 256
    assert ceilings["copy_gb_per_s"] > 0 and ceilings["mm_tflops"]["float64"] > 0
    measured = {"mm_tflops": {"float16": 800.0}}
    assert bench_cuda.peak_note("float16", 98.9, measured) == " (10% of peak, 12% of torch.mm)"
    assert bench_cuda.peak_note("float32", 6.7, measured) == " (10% of peak)"
    assert bench_cuda.peak_note("float64", 1.0, None) == ""
    assert bench_cuda.ceilings_line({"error": "RuntimeError: out of memory"}) == (
        "measured ceilings: error: RuntimeError: out of memory")


def test_tile_use_counts_the_multiplications_of_skipping_tiles():
    # Rows 0 and 2 have offset 0, rows 1 and 3 offset 1. Two-row tiles in row order both need
    # both offsets (half of their slots are pairs); sorted by mask, each needs one.
    nbr = torch.tensor([[5, -1], [-1, 6], [7, -1], [-1, 8]], dtype=torch.int32)
    assert bench_cuda.tile_use(nbr, None, 0, 2) == 0.5
    order = sp.ops.conv_row_order(nbr, 1)
    assert order.tolist() == [[0, 2, 1, 3]]
    assert bench_cuda.tile_use(nbr, order, 1, 2) == 1.0
    # Two splits: offset 0 alone, then offset 1 alone; a 3-row tile pads with empty rows.
    assert bench_cuda.tile_use(nbr, sp.ops.conv_row_order(nbr, 2), 2, 3) == 4 / 12


def test_dry_run_of_the_variant_sweep_and_its_tables(tmp_path):
    data = lidar_file("kitti_object_training_000000.bin").parent
    lidar_file("spconv_benchmark-pc.npz")
    out = tmp_path / "variants.json"
    result = bench_cuda.main(["--device", "cpu", "--quick", "--dtypes", "float32",
                              "--repeats", "1", "--warmup", "0", "--data", str(data),
                              "--libs", "spconv_lite", "--inputs", "kitti", "--no-voxelize",
                              "--variants", "rows=2;algo=fused,wgrad=compact", "--layers",
                              "--json", str(out)])
    assert result["variants"] == ["rows=2", "algo=fused,wgrad=compact"]
    for case in result["networks"]:
        assert set(case["variant_speedup"]) == {"spconv_lite[rows=2]",
                                                "spconv_lite[algo=fused,wgrad=compact]"}
        # On the CPU the variants change nothing: the same outputs.
        assert all(v["identical"] for v in case["vs_default"].values())
    (group,) = result["layers"]
    assert len(group["layers"]) == 12  # VoxelBackBone8x's conv layers
    for row in group["layers"]:
        assert set(row["variants"]) == {"default", "rows=2", "algo=fused,wgrad=compact"}
        assert all(row["variants"]["default"][f"{op}_ms"] > 0 for op in ("fwd", "dgrad", "wgrad"))
        assert "64 rows, 2 splits" in row["tile_use"]
    page = bench_cuda.write_results(json.loads(out.read_text()), tmp_path / "results")[1]
    text = page.read_text()
    assert "## Kernel variants" in text and "| second | kitti | float32 | fwd | rows=2 |" in text
    assert "## Layers of second on kitti, float32" in text
    # Without the 8x cloud no variant can meet the rule for a new default.
    assert "| float32 | rows=2 | no |" in text and "8x cloud not timed" in text


def verdict_case(dtype, input_name, pass_name, variants, peak_spconv=1000.0):
    """A network case of a variants run as bench_cuda records it; ``variants`` maps each variant
    to (speed-up, outputs identical, their max relative error, weight gradients identical or
    None for a forward, their max relative error, peak MiB)."""
    case = {"network": "spconv", "input": input_name, "dtype": dtype, "pass": pass_name,
            "variant_speedup": {}, "vs_default": {},
            "libs": {"spconv_lite": {"peak_mib": 500.0}, "spconv": {"peak_mib": peak_spconv}}}
    for variant, (speedup, identical, err, grads_identical, grad_err, peak) in variants.items():
        name = f"spconv_lite[{variant}]"
        case["variant_speedup"][name] = speedup
        same = {"same_rows": True, "identical": identical, "max_rel_err": err}
        if grads_identical is not None:
            same.update(grads_identical=grads_identical, grads={"max_rel_err": grad_err})
        case["vs_default"][name] = same
        case["libs"][name] = {"peak_mib": peak}
    return case


def test_variant_verdicts_apply_the_rule_for_a_new_default():
    fast = (1.3, True, 0.0, None, 0.0, 400.0)
    data = {"networks": [
        verdict_case("float16", "kitti", "fwd", {
            "rows=2": fast, "tiles=pipelined": (0.95, True, 0.0, None, 0.0, 400.0),
            "wgrad=compact": fast, "rows=3": fast}),
        verdict_case("float16", "spconv_pc_x8", "fwd", {
            "rows=2": fast, "tiles=pipelined": (1.5, True, 0.0, None, 0.0, 400.0),
            "wgrad=compact": (1.0, True, 0.0, None, 0.0, 400.0),
            "rows=3": (1.2, True, 0.0, None, 0.0, 1200.0)}),
        verdict_case("float16", "spconv_pc_x8", "train", {
            "rows=2": (1.1, True, 0.0, True, 0.0, 400.0),
            "tiles=pipelined": (1.4, True, 0.0, True, 0.0, 400.0),
            "wgrad=compact": (1.2, True, 0.0, False, 1e-3, 400.0),
            "rows=3": (1.2, True, 0.0, True, 0.0, 400.0)}),
        verdict_case("float32", "spconv_pc_x8", "train", {
            "tiles=pipelined": (1.2, False, 4e-6, False, 6e-6, 400.0),
            "rows=2": (1.2, False, 4e-6, True, 0.0, 400.0),
            "algo=fused,wgrad=compact": (1.2, True, 0.0, False, 3e-5, 400.0)}),
    ]}
    verdicts = {(v["dtype"], v["variant"]): v for v in bench_cuda.variant_verdicts(data)}
    assert verdicts["float16", "rows=2"]["passes"]
    assert verdicts["float16", "rows=2"]["x8"] == {"fwd": 1.3, "train": 1.1}
    assert verdicts["float16", "tiles=pipelined"]["failures"] == [
        "slower than the default in kitti fwd (0.95x)"]
    assert verdicts["float16", "wgrad=compact"]["failures"] == ["not faster on the 8x cloud"]
    assert verdicts["float16", "rows=3"]["failures"] == [
        "peak memory above spconv's (spconv_pc_x8 fwd: 1200 > 1000 MiB)"]
    # float32: a variant off the GEMMs may round differently within 1e-5; row orders may not.
    assert verdicts["float32", "tiles=pipelined"]["passes"]
    assert verdicts["float32", "rows=2"]["failures"] == [
        "outputs differ (spconv_pc_x8 train: 4.0e-06)"]
    assert verdicts["float32", "algo=fused,wgrad=compact"]["failures"] == [
        "weight gradients differ (spconv_pc_x8 train: 3.0e-05)"]
    text = "\n".join(bench_cuda.render_verdicts(data))
    assert ("| float16 | rows=2 | yes | 1.10 (spconv_pc_x8 train) | fwd 1.30, train 1.10 | - |"
            in text)


def test_time_alternating_drops_a_function_that_fails_later():
    # An error after the first call (out of memory in a timed call, say) drops that function
    # with its error; the others are still timed.
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory\nmore lines")

    errors = {}
    stats = common.time_alternating({"ok": lambda: None, "flaky": flaky}, 1, 4, errors=errors)
    assert list(stats) == ["ok"] and len(stats["ok"]["samples_ms"]) == 4
    assert errors == {"flaky": "timing: RuntimeError: CUDA out of memory"}
    calls["n"] = 0
    with pytest.raises(RuntimeError):  # without ``errors`` the error propagates, as before
        common.time_alternating({"flaky": flaky}, 1, 4)


def dry_run(tmp_path, *extra, name="run.json"):
    """bench_cuda.main on the CPU over cropped inputs, one call per library."""
    data = lidar_file("kitti_object_training_000000.bin").parent
    lidar_file("spconv_benchmark-pc.npz")
    out = tmp_path / name
    return bench_cuda.main(["--device", "cpu", "--quick", "--repeats", "1", "--warmup", "0",
                            "--data", str(data), "--no-voxelize", "--libs", "spconv_lite",
                            "--json", str(out), *extra]), out


def test_a_case_that_fails_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    original = bench_cuda.bench_network_case

    def failing_train(network, inp, dtype, train, *args):
        if train:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(network, inp, dtype, train, *args)

    monkeypatch.setattr(bench_cuda, "bench_network_case", failing_train)
    result, _ = dry_run(tmp_path, "--inputs", "kitti,spconv_pc", "--dtypes", "float32",
                        "--no-maps")
    assert [(c["input"], c["pass"], bool(c["libs"])) for c in result["networks"]] == [
        ("kitti", "fwd", True), ("kitti", "train", False),
        ("spconv_pc", "fwd", True), ("spconv_pc", "train", False)]
    assert result["networks"][1]["errors"] == {
        "case": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert result["maps"] == []  # --no-maps
    assert set(result["meta"]["inputs"]) == {"kitti", "spconv_pc"}  # only the inputs run
    page = bench_cuda.render_markdown(result)
    assert "- second kitti float32 train: case: RuntimeError: CUDA error" in page


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    # scripts/gpu_check.sh ends a stage's time box with SIGINT: the JSON keeps the cases
    # measured before and says where the run stopped.
    original = bench_cuda.bench_network_case

    def interrupted_train(network, inp, dtype, train, *args):
        if train:
            raise KeyboardInterrupt
        return original(network, inp, dtype, train, *args)

    monkeypatch.setattr(bench_cuda, "bench_network_case", interrupted_train)
    with pytest.raises(SystemExit) as stop:
        dry_run(tmp_path, "--inputs", "kitti", "--dtypes", "float32", "--no-maps")
    assert stop.value.code == 130
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["meta"]["interrupted"] == "stopped (SIGINT) during: second kitti float32 train"
    assert [c["pass"] for c in data["networks"]] == ["fwd"]
    assert not list(tmp_path.glob("*.tmp"))
    page = bench_cuda.render_markdown(data)
    assert "- **stopped (SIGINT) during: second kitti float32 train**" in page


def test_dtype_major_runs_every_input_in_one_dtype_first(tmp_path):
    result, _ = dry_run(tmp_path, "--inputs", "kitti,spconv_pc", "--dtypes", "float32,float64",
                        "--dtype-major", "--no-maps")
    assert [(c["dtype"], c["input"], c["pass"]) for c in result["networks"]] == [
        (d, i, p) for d in ("float32", "float64") for i in ("kitti", "spconv_pc")
        for p in ("fwd", "train")]


def test_results_files_are_named_by_kind(tmp_path):
    # One run of each stage of scripts/gpu_check.sh on one day: three results files, none
    # overwriting another (runs from before meta.kind: variants when they swept variants).
    bench, _ = dry_run(tmp_path, "--inputs", "kitti", "--dtypes", "float32", "--no-maps",
                       name="bench.json")
    variants, _ = dry_run(tmp_path, "--inputs", "kitti", "--dtypes", "float32", "--no-maps",
                          "--variants", "rows=2", name="variants.json")
    triton, _ = dry_run(tmp_path, "--inputs", "kitti", "--dtypes", "float32", "--no-maps",
                        "--libs", "spconv_lite,spconv_triton", "--triton-configs", "3",
                        name="triton.json")
    assert [r["meta"]["kind"] for r in (bench, variants, triton)] == [
        "bench", "variants", "triton"]
    stems = {bench_cuda.results_stem(r) for r in (bench, variants, triton)}
    day = bench["meta"]["date"][:10]
    assert stems == {f"{day}-cpu-bench", f"{day}-cpu-variants", f"{day}-cpu-triton"}
    old = dict(variants, meta={k: v for k, v in variants["meta"].items() if k != "kind"})
    assert bench_cuda.results_kind(old) == "variants"
    written = [p for r in (bench, variants, triton)
               for p in bench_cuda.write_results(r, tmp_path / "results")]
    assert len({p.name for p in written}) == 6


def test_triton_results_say_that_its_autotuning_was_cut(tmp_path):
    # spconv-Triton is measured with its autotune lists cut (scripts/gpu_check.sh stage
    # "triton"): the results page says so in its header and above the networks' table.
    run, _ = dry_run(tmp_path, "--inputs", "kitti", "--dtypes", "float32", "--no-maps",
                     "--triton-configs", "3")
    meta = run["meta"]
    # As spconv-Triton records it on a GPU (it does not import here).
    meta["libraries"]["spconv_triton"] = "1.0.0"
    meta["triton_autotune"] = {"_gather_gemm_kernel": "3 of 37",
                               "_dweight_masked_kernel": "3 of 21"}
    for case in run["networks"]:
        case["libs"]["spconv_triton"] = dict(case["libs"]["spconv_lite"])
        case["ratios"]["spconv_triton/spconv_lite"] = 1.0
    page = bench_cuda.write_results(run, tmp_path / "results")[1]
    assert page.name.endswith("-cpu-triton.md")
    text = page.read_text()
    assert text.startswith("# GPU benchmark (triton): CPU dry run")
    note = ("spconv-Triton autotuned over a cut list of configs, evenly spread over each "
            "kernel's own list (_gather_gemm_kernel 3 of 37, _dweight_masked_kernel 3 of 21)")
    assert f"- {note}" in text and f"spconv_triton: {note}" in text
    assert "spconv_triton ms" in text and "spconv_triton / spconv_lite" in text


def test_results_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out" / "run.json"
    results_file.write_json(path, {"median_ms": 1.5}, indent=1)
    assert json.loads(path.read_text()) == {"median_ms": 1.5}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    with pytest.raises(TypeError):  # a payload that cannot be written
        results_file.write_json(path, {"median_ms": 2.5, "device": object()})
    assert json.loads(path.read_text()) == {"median_ms": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temporary left
