#!/usr/bin/env bash
# One command for a GPU machine: build spconv_lite with its CUDA kernels, run the CUDA tests,
# run the GPU benchmarks, and write a log and a JSON summary into a results folder.
#
# Usage: scripts/gpu_check.sh RESULTS_DIR [--data DIR]
#   RESULTS_DIR  created if missing; gets gpu_check.log, summary.json, tests.xml (JUnit),
#                bench.json and build.log
#   --data DIR   folder of the LiDAR files (default: shared/data/lidar beside the repository or
#                inside it)
#
# Needs: Python with a CUDA build of torch and pytest, nvcc, a GPU; no internet. Builds for
# TORCH_CUDA_ARCH_LIST (default 9.0). Stages share a deadline (GPU_CHECK_BUDGET_S, default 450 s)
# so the whole run stays under 8 minutes; a stage that runs out of time is stopped and
# reported as timed out.
set -uo pipefail

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: $0 RESULTS_DIR [--data DIR]" >&2
    exit 2
fi
RESULTS=$1
shift
DATA=""
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG="$RESULTS/gpu_check.log"
exec > >(tee "$LOG") 2>&1
cd "$REPO"

if [ -z "$DATA" ]; then
    for candidate in "$REPO/../shared/data/lidar" "$REPO/shared/data/lidar"; do
        if [ -d "$candidate" ]; then DATA=$(cd "$candidate" && pwd); break; fi
    done
fi

START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-450}
# Seconds a stage may use: its cap, or what is left of the budget minus a reserve for the
# stages after it.
allowance() {
    local cap=$1 reserve=$2 left=$((BUDGET - (SECONDS - START) - $2))
    [ "$left" -lt "$cap" ] && cap=$left
    [ "$cap" -lt 10 ] && cap=10
    echo "$cap"
}

echo "=== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $REPO, results $RESULTS"
echo "data: ${DATA:-not found}"
(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout") | sed 's/^/commit: /'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
command -v nvcc >/dev/null && nvcc --version | tail -1
python - <<'PY'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}")
PY

# ----------------------------------------------------------------------------- build
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
fi
echo "=== build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}, CUDA_HOME=${CUDA_HOME:-unset})"
build_start=$SECONDS
rm -f spconv_lite/_C*.so
SPCONV_LITE_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "$(allowance 240 200)" \
    python setup.py build_ext --inplace > "$RESULTS/build.log" 2>&1
BUILD_RC=$?
BUILD_S=$((SECONDS - build_start))
tail -5 "$RESULTS/build.log"
echo "build: rc=$BUILD_RC in ${BUILD_S}s (full log: build.log)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ $BUILD_RC -eq 0 ]; then
    python - <<'PY'
import torch, spconv_lite
ops = ["build_subm_map", "build_conv_map", "sparse_conv", "sparse_conv_weight_grad",
       "sparse_sum_pool", "sparse_max_pool", "sparse_max_pool_backward", "voxelize",
       "voxelize_mean"]
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"spconv_lite::{op}", "CUDA")]
print("spconv_lite from", spconv_lite.__file__)
print("CUDA kernels registered for every op" if not missing else f"NO CUDA KERNEL: {missing}")
PY
fi

# ----------------------------------------------------------------------------- tests
TESTS_RC=-1
TESTS_S=0
if [ $BUILD_RC -eq 0 ]; then
    echo "=== CUDA tests (pytest -k cuda)"
    tests_start=$SECONDS
    timeout "$(allowance 220 110)" python -m pytest tests -q -k cuda -p no:cacheprovider \
        --junitxml="$RESULTS/tests.xml" -o junit_family=xunit1 2>&1 | tail -40
    TESTS_RC=${PIPESTATUS[0]}
    TESTS_S=$((SECONDS - tests_start))
    echo "tests: rc=$TESTS_RC in ${TESTS_S}s"
fi

# ----------------------------------------------------------------------------- benchmarks
BENCH_RC=-1
BENCH_S=0
if [ $BUILD_RC -eq 0 ]; then
    echo "=== GPU benchmarks"
    bench_start=$SECONDS
    timeout "$(allowance 150 5)" python benchmarks/bench_cuda.py ${DATA:+--data "$DATA"} \
        --repeats 7 --warmup 2 --json "$RESULTS/bench.json"
    BENCH_RC=$?
    BENCH_S=$((SECONDS - bench_start))
    echo "benchmarks: rc=$BENCH_RC in ${BENCH_S}s"
fi

# ----------------------------------------------------------------------------- summary
RESULTS="$RESULTS" BUILD_RC=$BUILD_RC BUILD_S=$BUILD_S TESTS_RC=$TESTS_RC TESTS_S=$TESTS_S \
BENCH_RC=$BENCH_RC BENCH_S=$BENCH_S TOTAL_S=$((SECONDS - START)) python - <<'PY'
import json, os, xml.etree.ElementTree as ET
from pathlib import Path

results = Path(os.environ["RESULTS"])
env = {k: int(os.environ[k]) for k in ("BUILD_RC", "BUILD_S", "TESTS_RC", "TESTS_S", "BENCH_RC",
                                         "BENCH_S", "TOTAL_S")}
summary = {"total_s": env["TOTAL_S"],
           "build": {"ok": env["BUILD_RC"] == 0, "rc": env["BUILD_RC"], "seconds": env["BUILD_S"]}}
tests = {"rc": env["TESTS_RC"], "seconds": env["TESTS_S"], "ran": env["TESTS_RC"] != -1}
junit = results / "tests.xml"
if junit.exists():
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    for key in ("tests", "failures", "errors", "skipped"):
        tests[key] = sum(int(s.get(key, 0)) for s in suites)
    tests["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites
                       for c in s.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None][:50]
tests["ok"] = env["TESTS_RC"] == 0
summary["tests"] = tests
bench = {"rc": env["BENCH_RC"], "seconds": env["BENCH_S"], "ok": env["BENCH_RC"] == 0}
bench_file = results / "bench.json"
if bench_file.exists():
    data = json.loads(bench_file.read_text())
    bench["meta"] = data["meta"]
    bench["median_ms"] = {
        " ".join(str(r[k]) for k in ("network", "input", "dtype", "pass", "algo")): round(r["median_ms"], 3)
        for r in data["results"]}
summary["bench"] = bench
summary["ok"] = summary["build"]["ok"] and tests["ok"] and bench["ok"]
(results / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: (v if k != "bench" else {x: v[x] for x in ("ok", "rc", "seconds")})
                  for k, v in summary.items()}, indent=2))
PY
echo "=== gpu_check done in $((SECONDS - START))s: $RESULTS/summary.json"
