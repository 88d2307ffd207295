#!/usr/bin/env bash
# One command for a GPU machine: unpack the peer libraries, build spconv_lite with its CUDA
# kernels, run every CUDA test (and compute-sanitizer over a few small ones, alongside), run the
# side-by-side benchmark, and write everything into a results folder. Every stage is
# time-boxed, so that a failure or a hang in one does not eat the others' time.
#
# Usage: scripts/gpu_check.sh RESULTS_DIR [--data DIR]
#   RESULTS_DIR  created if missing; gets (up to 7 files) gpu_check.log (everything printed),
#                build.log, tests.xml (JUnit), sanitizer.log, bench.json, variants.json (stage
#                "variants"), summary.json
#   --data DIR   folder of the LiDAR files (default: .gpu/lidar, else shared/data/lidar beside
#                the repository or inside it)
#
# Environment:
#   GPU_CHECK_STAGES        stages to run, default "build,tests,sanitizer,bench"; without
#                           "build" the spconv_lite/_C*.so already there is used (a rerun on
#                           a machine still warm). Stage "variants" (not in the default): the
#                           CUDA kernel variants of issue 13 (SPCONV_LITE_CUDA_VARIANTS) timed
#                           beside the default kernels and spconv, networks then per layer;
#                           see "Kernel variants" below. Stage "profile" (not in the default):
#                           ncu over one layer's conv kernels, default and variants (ncu.csv)
#   GPU_CHECK_BUDGET_S      seconds for the whole run (default 450); each stage gets its cap or
#                           what is left minus a reserve for the stages after it
#   GPU_CHECK_TEST_WORKERS  pytest-xdist workers for the tests (default 4; 0 = none)
#   GPU_CHECK_BENCH_ARGS    extra arguments for benchmarks/bench_cuda.py (e.g. "--repeats 5")
#   GPU_CHECK_VARIANTS_ARGS extra arguments for the variants stage's bench_cuda.py run, split
#                           at spaces, no quotes (e.g. '--variants rows=2;tiles=pipelined' for a
#                           shorter sweep)
#   GPU_CHECK_PROFILE_LAYER the profile stage's layer, NETWORK:INPUT:LAYER:DTYPE (default
#                           spconv:spconv_pc_x8:1:float16, the 8x cloud's 64->64 SubM; the
#                           same with :float32 profiles the SIMT kernels and the GEMM path)
#   NCU                     the Nsight Compute program (default: on PATH or in CUDA_HOME)
#   SPCONV_LITE_COMMIT      the commit to record in bench.json when the checkout has no .git
#   PYTHON                  the interpreter (default python3, else python)
#   COMPUTE_SANITIZER       the compute-sanitizer program (default: on PATH or in CUDA_HOME)
#   GPU_CHECK_DRY_RUN=1     a rehearsal without a GPU: no build (the _C*.so there is used),
#                           the tests as selected (they skip without CUDA), the benchmark with
#                           --device cpu --quick
#
# Needs: a CUDA build of torch with pytest, nvcc, a GPU; no internet. Builds for
# TORCH_CUDA_ARCH_LIST (default 9.0). Peers: .gpu/peers-cp312.tar.xz (spconv 2.3.8 with its
# CUDA kernels and spconv-Triton 1.0.0, see ../shared/gpu/README.md) is unpacked into .gpu/site,
# which goes first on PYTHONPATH, so that `import spconv` is that spconv; without the archive
# the benchmark reports the peers as skipped.
#
# On this project's device machine (the `run` tool), from the checkout that travels:
#   0. first, here: scripts/gpu_rehearsal.sh builds and tests against the GPU
#      machine's torch (2.11, CUDA 13.0) on the CPU, at no device time.
#   1. here, once:   mkdir -p .gpu && cp ../shared/gpu/peers-cp312.tar.xz .gpu/ &&
#                    cp -r ../shared/data/lidar .gpu/lidar          (.gpu/ is git-ignored; 54 MB)
#   2. run:          command "SPCONV_LITE_COMMIT=<git rev-parse HEAD here> bash
#                    scripts/gpu_check.sh $OUT/results", carry [".gpu"], timeout_s 600,
#                    kind "nvidia-h200" (issue 13's targets are set on the H200; a call
#                    without a kind now gets an H100). Where no H200 is lent, the H100 runs
#                    the same script: the same tensor-core and SIMT peaks, about 3.0 TB/s of
#                    copies against the H200's 4.3, and no test needs more than 24 GiB. The
#                    results name the GPU; say in the note which card gave the numbers.
#   3. here, after:  python benchmarks/bench_cuda.py --write-results <files_at>/results/bench.json
#                    (writes benchmarks/results/DATE-GPU.json and .md for the commit)
#   A rerun on the still-warm machine can skip what passed, e.g.
#   GPU_CHECK_STAGES=bench bash scripts/gpu_check.sh $OUT/results
#
# The device time (15 minutes a session, machine starts included) fits two calls only if the
# second follows at once: the machine goes back 30 s after a call ends, and a fresh one costs a
# minute or more to start plus the build again. So decide the second call before the first:
# if the first one's summary says build and tests ok, send the variants call (below, without
# "build": the warm machine keeps spconv_lite/_C*.so) within those 30 s and read both results
# afterwards; if something failed, give the machine back, fix it here, and rerun on what is
# left.
#
# Kernel variants (issue 13; none has run on a GPU yet). The tests stage already checks them on
# the hardware (tests/test_cuda_parity.py: each variant's outputs equal the default kernels'
# bitwise, the compacted weight gradient matches the CPU, the radix-sorted maps and the row
# orders equal the CPU's), and compute-sanitizer runs the small variant cases. To time them, a
# call of its own once the bring-up passes, at once on the warm machine (budget: the session's
# device time left, from `status`, minus a minute):
#     command "SPCONV_LITE_COMMIT=<commit> GPU_CHECK_STAGES=variants
#              GPU_CHECK_BUDGET_S=300 bash scripts/gpu_check.sh $OUT/results", carry [".gpu"]
# (on a fresh machine GPU_CHECK_STAGES=build,variants: the build takes about a minute more).
# It runs bench_cuda.py --libs spconv_lite,spconv --variants default --layers, the x8 cloud
# first, float16 before float32: each network case alternates the default kernels, each
# variant of bench_cuda.DEFAULT_SWEEP and spconv (variants.json: "variant_speedup",
# "vs_spconv", "vs_default"), then every conv layer's forward / input gradient / weight gradient
# per variant ("layers"). Afterwards, here: bench_cuda.py --write-results variants.json writes
# the tables (README "CUDA" says which numbers decide the defaults). mma=sync is not in the
# default sweep: for float16 its machine code has the same instruction counts as WMMA's, and
# bfloat16 is not one of #13's cases; to time it, GPU_CHECK_VARIANTS_ARGS='--dtypes bfloat16
# --variants tiles=pipelined,wgrad=compact;tiles=pipelined,wgrad=compact,mma=sync'. Adding
# "profile" to the stages runs ncu (--clock-control none; it reads counters on Firecracker
# machines, not on gVisor ones) over one layer's conv kernels with the default kernels and four
# variants:
# ncu.csv, SpeedOfLight / Occupancy / WarpStateStats / MemoryWorkloadAnalysis per kernel, each
# kernel under an NVTX range named after its variant and op.
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
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
    STAGES=",${GPU_CHECK_STAGES:-tests,sanitizer,bench},"
else
    STAGES=",${GPU_CHECK_STAGES:-build,tests,sanitizer,bench},"
fi
want() { [[ "$STAGES" == *",$1,"* ]]; }
# The benchmark stages' arguments for a rehearsal: on the CPU, cropped inputs, one call.
DRY_BENCH_ARGS=()
[ "$DRY_RUN" = 1 ] && DRY_BENCH_ARGS=(--device cpu --quick --dtypes float32 --repeats 1 --warmup 0)

if [ -z "$DATA" ]; then
    for candidate in "$REPO/.gpu/lidar" "$REPO/../shared/data/lidar" "$REPO/shared/data/lidar"; do
        if [ -d "$candidate" ]; then DATA=$(cd "$candidate" && pwd); break; fi
    done
fi
[ -n "$DATA" ] && export SPCONV_LITE_DATA=$DATA  # the tests' LiDAR frames (tests/helpers.py)

START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-450}
# Seconds a stage may use: its cap, or what is left of the budget minus a reserve for the
# stages after it (at least 10).
allowance() {
    local cap=$1 left=$((BUDGET - (SECONDS - START) - $2))
    [ "$left" -lt "$cap" ] && cap=$left
    [ "$cap" -lt 10 ] && cap=10
    echo "$cap"
}
# Runs "$@" for at most $1 seconds, then SIGINT (pytest then still writes its report and
# JUnit XML; a Python script stops with KeyboardInterrupt), SIGKILL 20 s later; rc 124 = timed
# out.
boxed() {
    local seconds=$1
    shift
    timeout -s INT -k 20 "$seconds" "$@"
}

echo "=== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $REPO, results $RESULTS"
echo "stages: ${STAGES:1:-1}; budget ${BUDGET}s; data: ${DATA:-not found}"
echo "commit: ${SPCONV_LITE_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
    2>&1 || true
command -v nvcc >/dev/null && nvcc --version | tail -1
"$PY" - <<'PY'
import sys, torch
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")
PY

# ----------------------------------------------------------------------------- peers
PEERS_ARCHIVE="$REPO/.gpu/peers-cp312.tar.xz"
PEERS_SITE="$REPO/.gpu/site"
if [ -f "$PEERS_ARCHIVE" ]; then
    if [ ! -f "$PEERS_SITE/.unpacked" ] || [ "$PEERS_ARCHIVE" -nt "$PEERS_SITE/.unpacked" ]; then
        echo "=== unpacking the peers into .gpu/site"
        rm -rf "$PEERS_SITE" && mkdir -p "$PEERS_SITE"
        if boxed 120 tar -xJf "$PEERS_ARCHIVE" -C "$PEERS_SITE"; then
            touch "$PEERS_SITE/.unpacked"
        else
            echo "unpacking failed: the benchmark will report the peers as skipped"
        fi
    fi
else
    echo "no $PEERS_ARCHIVE: the benchmark will report the peers as skipped"
fi
# The peers first, so that `import spconv` is theirs; then this checkout's spconv_lite.
if [ -f "$PEERS_SITE/.unpacked" ]; then
    export PYTHONPATH="$PEERS_SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# ----------------------------------------------------------------------------- build
BUILD_RC=-1
BUILD_S=0
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
fi
# torch links the extension with -lcudart from CUDA_HOME's lib64 (or lib). Where nvcc is a
# wrapper outside the toolkit, or the toolkit is pip's, that folder may hold no unversioned
# libcudart.so (seen on the development VM): then put a folder that has one (or a link to the
# versioned one torch loads) on LIBRARY_PATH.
cudart_link_dir() {
    local dir lib
    for dir in "${CUDA_HOME:-/usr/local/cuda}"/{lib64,lib,targets/x86_64-linux/lib}; do
        [ -e "$dir/libcudart.so" ] && return 0
    done
    for dir in /usr/local/cuda*/{lib64,lib,targets/x86_64-linux/lib}; do
        [ -e "$dir/libcudart.so" ] && { echo "$dir"; return 0; }
    done
    lib=$("$PY" -c "import torch, pathlib; print(next(iter(sorted(
        pathlib.Path(torch.__file__).parents[1].glob('nvidia/**/libcudart.so.*'))), ''))")
    [ -n "$lib" ] || return 0
    mkdir -p "$REPO/.gpu/lib" && ln -sf "$lib" "$REPO/.gpu/lib/libcudart.so"
    echo "$REPO/.gpu/lib"
}
if want build; then
    link_dir=$(cudart_link_dir)
    [ -n "$link_dir" ] && export LIBRARY_PATH="$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
    echo "=== build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}," \
        "CUDA_HOME=${CUDA_HOME:-unset}${link_dir:+, libcudart.so from $link_dir})"
    build_start=$SECONDS
    rm -f spconv_lite/_C*.so
    SPCONV_LITE_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        MAX_JOBS=${MAX_JOBS:-$(nproc)} boxed "$(allowance 240 240)" \
        "$PY" setup.py build_ext --inplace > "$RESULTS/build.log" 2>&1
    BUILD_RC=$?
    BUILD_S=$((SECONDS - build_start))
    grep -iE "error|warning" "$RESULTS/build.log" | grep -v "^ninja: " | head -30
    tail -3 "$RESULTS/build.log"
    echo "build: rc=$BUILD_RC in ${BUILD_S}s (full log: build.log)"
elif ls spconv_lite/_C*.so >/dev/null 2>&1; then
    BUILD_RC=0
    echo "=== build skipped: using $(ls spconv_lite/_C*.so)"
fi
if [ $BUILD_RC -eq 0 ]; then
    "$PY" - <<'PY' || BUILD_RC=1
import sys, torch, spconv_lite
ops = sorted(s.name.split("::")[1] for s in torch._C._jit_get_all_schemas()
             if s.name.startswith("spconv_lite::"))
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"spconv_lite::{op}", "CUDA")]
print("spconv_lite from", spconv_lite.__file__)
print(f"CUDA kernels registered for all {len(ops)} ops" if not missing
      else f"NO CUDA KERNEL: {missing}")
sys.exit(1 if missing or not torch.cuda.is_available() else 0)
PY
    [ "$DRY_RUN" = 1 ] && BUILD_RC=0  # a rehearsal: the CPU build will do
fi

# ----------------------------------------------------------------------------- tests
# The sanitizer runs alongside the tests (both check correctness, neither is timed). Small
# cases only: compute-sanitizer slows kernels 10-100x; memcheck without torch's caching
# allocator, so that an access past a tensor's end is past an allocation's end.
SANITIZER_TESTS="(test_kernel_maps_are_identical and 1500) or test_zero_sites_maps
 or (test_conv_matches_cpu and subm-16-16 and float32)
 or (test_conv_variants_equal_the_default_kernels and subm-16-16 and (float16 or float32))
 or (test_compact_weight_grad_pipelined_sums_as_unpipelined and float32-36-28)
 or (test_sync_mma_sums_as_wmma and subm-16-16 and bfloat16)
 or (test_half_precision_close_to_float32 and (subm-16-16 or subm-3-5) and float16)
 or (test_non_finite_weights_reach_only_real_pairs and float16)
 or test_conv_with_an_empty_kernel or (test_pooling_is_identical and float32)
 or (test_voxelize_is_identical and 5000)"
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer \
    || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || true)}
sanitizer_stage() {  # $1: seconds in all
    local per_tool=$(( $1 / 3 )) tool rc
    "$SANITIZER" --version | tail -1
    for tool in memcheck racecheck synccheck; do
        echo "--- compute-sanitizer --tool $tool (at most ${per_tool}s)"
        local env_args=()
        [ "$tool" = memcheck ] && env_args=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
        env "${env_args[@]}" timeout -k 10 "$per_tool" "$SANITIZER" --tool "$tool" \
            --error-exitcode 97 --print-limit 30 "$PY" -m pytest tests/test_cuda_parity.py \
            -q -p no:cacheprovider -k "$(echo $SANITIZER_TESTS)"
        rc=$?
        echo "sanitizer $tool: rc=$rc"
    done
}

TESTS_RC=-1
TESTS_S=0
SANITIZER_S=0
if [ $BUILD_RC -eq 0 ] && { want tests || want sanitizer; }; then
    stage_start=$SECONDS
    stage_s=$(allowance 200 120)
    sanitizer_pid=""
    if want sanitizer && [ -n "$SANITIZER" ]; then
        echo "=== compute-sanitizer over small CUDA parity tests, alongside (log: sanitizer.log)"
        ( sanitizer_stage "$stage_s" > "$RESULTS/sanitizer.log" 2>&1 ) &
        sanitizer_pid=$!
    elif want sanitizer; then
        echo "compute-sanitizer not found: sanitizer stage skipped" | tee "$RESULTS/sanitizer.log"
    fi
    if want tests; then
        echo "=== CUDA tests (pytest -k cuda, at most ${stage_s}s)"
        extra=()
        workers=${GPU_CHECK_TEST_WORKERS:-4}
        if [ "$workers" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
            extra+=(-n "$workers")
            threads=$(( $(nproc) / (workers + 1) ))
            export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))  # cores shared by workers
        fi
        "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 240)
        boxed "$stage_s" "$PY" -m pytest tests -q -k cuda -rfEs -p no:cacheprovider \
            --junitxml="$RESULTS/tests.xml" -o junit_family=xunit1 --durations=15 "${extra[@]}"
        TESTS_RC=$?
        unset OMP_NUM_THREADS
        TESTS_S=$((SECONDS - stage_start))
        echo "tests: rc=$TESTS_RC in ${TESTS_S}s"
    fi
    if [ -n "$sanitizer_pid" ]; then
        wait "$sanitizer_pid"
        SANITIZER_S=$((SECONDS - stage_start))
        grep -E "^--- |ERROR SUMMARY|^sanitizer |passed|failed|error" "$RESULTS/sanitizer.log" \
            | head -40
    fi
fi

# ----------------------------------------------------------------------------- benchmark
BENCH_RC=-1
BENCH_S=0
if [ $BUILD_RC -eq 0 ] && want bench; then
    bench_s=$(allowance 240 5)
    echo "=== side-by-side benchmark (at most ${bench_s}s)"
    bench_start=$SECONDS
    # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of words
    boxed "$bench_s" "$PY" benchmarks/bench_cuda.py ${DATA:+--data "$DATA"} --repeats 7 \
        --warmup 2 --budget-s $((bench_s - 45)) --json "$RESULTS/bench.json" \
        "${DRY_BENCH_ARGS[@]}" ${GPU_CHECK_BENCH_ARGS:-}
    BENCH_RC=$?
    BENCH_S=$((SECONDS - bench_start))
    echo "benchmark: rc=$BENCH_RC in ${BENCH_S}s"
fi

# ----------------------------------------------------------------------------- variants
VARIANTS_RC=-1
VARIANTS_S=0
if [ $BUILD_RC -eq 0 ] && want variants; then
    variants_s=$(allowance 420 5)
    echo "=== kernel variants beside the default kernels and spconv (at most ${variants_s}s)"
    variants_start=$SECONDS
    # shellcheck disable=SC2086  # GPU_CHECK_VARIANTS_ARGS is a list of words
    boxed "$variants_s" "$PY" benchmarks/bench_cuda.py ${DATA:+--data "$DATA"} \
        --libs spconv_lite,spconv --variants default --layers --no-voxelize \
        --inputs spconv_pc_x8,kitti,spconv_pc --dtypes float16,float32 --repeats 5 --warmup 1 \
        --budget-s $((variants_s - 45)) --json "$RESULTS/variants.json" "${DRY_BENCH_ARGS[@]}" \
        ${GPU_CHECK_VARIANTS_ARGS:-}
    VARIANTS_RC=$?
    VARIANTS_S=$((SECONDS - variants_start))
    echo "variants: rc=$VARIANTS_RC in ${VARIANTS_S}s"
fi

# ----------------------------------------------------------------------------- profile
if [ $BUILD_RC -eq 0 ] && want profile; then
    NCU=${NCU:-$(command -v ncu || ls "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" 2>/dev/null || true)}
    profile_s=$(allowance 150 5)
    if [ -n "$NCU" ]; then
        echo "=== ncu over one layer's conv kernels (at most ${profile_s}s; ncu.csv)"
        boxed "$profile_s" "$NCU" --clock-control none --nvtx --target-processes all \
            -k "regex:conv_|weight_grad" --section SpeedOfLight --section Occupancy \
            --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
            --log-file "$RESULTS/ncu.csv" "$PY" benchmarks/bench_cuda.py ${DATA:+--data "$DATA"} \
            --libs spconv_lite --no-voxelize \
            --profile-layer "${GPU_CHECK_PROFILE_LAYER:-spconv:spconv_pc_x8:1:float16}" \
            --variants "rows=2;tiles=pipelined;rows=2,tiles=pipelined;wgrad=compact"
        echo "profile: rc=$?"
    else
        echo "ncu not found: profile stage skipped"
    fi
fi

# ----------------------------------------------------------------------------- summary
RESULTS="$RESULTS" BUILD_RC=$BUILD_RC BUILD_S=$BUILD_S TESTS_RC=$TESTS_RC TESTS_S=$TESTS_S \
SANITIZER_S=$SANITIZER_S BENCH_RC=$BENCH_RC BENCH_S=$BENCH_S TOTAL_S=$((SECONDS - START)) \
VARIANTS_RC=$VARIANTS_RC VARIANTS_S=$VARIANTS_S STAGES="$STAGES" "$PY" - <<'PY'
import json, os, re, xml.etree.ElementTree as ET
from pathlib import Path

results = Path(os.environ["RESULTS"])
env = {k: int(os.environ[k]) for k in ("BUILD_RC", "BUILD_S", "TESTS_RC", "TESTS_S",
                                       "SANITIZER_S", "BENCH_RC", "BENCH_S", "TOTAL_S",
                                       "VARIANTS_RC", "VARIANTS_S")}
stages = [s for s in os.environ["STAGES"].split(",") if s]
summary = {"total_s": env["TOTAL_S"], "stages": stages,
           "build": {"ok": env["BUILD_RC"] == 0, "rc": env["BUILD_RC"], "seconds": env["BUILD_S"]}}
tests = {"rc": env["TESTS_RC"], "seconds": env["TESTS_S"], "ran": env["TESTS_RC"] != -1,
         "ok": env["TESTS_RC"] == 0}
junit = results / "tests.xml"
if tests["ran"] and junit.exists():
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    for key in ("tests", "failures", "errors", "skipped"):
        tests[key] = sum(int(s.get(key, 0)) for s in suites)
    tests["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites
                       for c in s.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None][:60]
summary["tests"] = tests
sanitizer = {"seconds": env["SANITIZER_S"], "tools": {}}
log = results / "sanitizer.log"
if "sanitizer" in stages and log.exists():
    tool = None
    for line in log.read_text(errors="replace").splitlines():
        if m := re.match(r"--- compute-sanitizer --tool (\w+)", line):
            tool = m.group(1)
            sanitizer["tools"][tool] = {}
        elif tool and (m := re.search(r"ERROR SUMMARY: (\d+) error", line)):
            sanitizer["tools"][tool]["errors"] = int(m.group(1))
        elif tool and (m := re.match(r"sanitizer \w+: rc=(-?\d+)", line)):
            sanitizer["tools"][tool]["rc"] = int(m.group(1))
    sanitizer["ok"] = bool(sanitizer["tools"]) and all(
        t.get("rc") == 0 and t.get("errors") == 0 for t in sanitizer["tools"].values())
summary["sanitizer"] = sanitizer
bench = {"rc": env["BENCH_RC"], "seconds": env["BENCH_S"], "ok": env["BENCH_RC"] == 0}
bench_file = results / "bench.json"
if "bench" in stages and bench_file.exists():
    data = json.loads(bench_file.read_text())
    bench["meta"] = {k: data["meta"].get(k) for k in ("gpu", "driver", "torch", "cuda",
                                                       "libraries", "skipped_libraries")}
    bench["cases"] = {
        f"{c['network']} {c['input']} {c['dtype']} {c['pass']}": {
            "median_ms": {n: round(s["median_ms"], 3) for n, s in c["libs"].items()},
            "ratios": {k: round(v, 3) for k, v in c["ratios"].items()},
            "errors": c["errors"]}
        for c in data["networks"]}
    bench["skipped_cases"] = data.get("skipped_cases", [])
summary["bench"] = bench
variants = {"rc": env["VARIANTS_RC"], "seconds": env["VARIANTS_S"], "ok": env["VARIANTS_RC"] == 0}
variants_file = results / "variants.json"
if "variants" in stages and variants_file.exists():
    data = json.loads(variants_file.read_text())
    variants["cases"] = {
        f"{c['network']} {c['input']} {c['dtype']} {c['pass']}": {
            "default_ms": round(c["libs"].get("spconv_lite", {}).get("median_ms", float("nan")), 3),
            "speedup": {k[len("spconv_lite["):-1]: round(v, 3)
                        for k, v in c.get("variant_speedup", {}).items()},
            "vs_spconv": {k: round(v, 3) for k, v in c.get("vs_spconv", {}).items()},
            "not_identical": [k for k, v in c.get("vs_default", {}).items()
                              if not v.get("identical")],
            "errors": c["errors"]}
        for c in data["networks"]}
    variants["skipped_cases"] = data.get("skipped_cases", [])
summary["variants"] = variants
summary["ok"] = (summary["build"]["ok"] and ("tests" not in stages or tests["ok"])
                 and ("bench" not in stages or bench["ok"])
                 and ("variants" not in stages or variants["ok"]))
(results / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k not in ("bench", "variants")},
                 indent=2))
print(json.dumps({k: bench[k] for k in ("ok", "rc", "seconds")}))
if "variants" in stages:
    print(json.dumps(variants, indent=1))
PY
echo "=== gpu_check done in $((SECONDS - START))s: $RESULTS/summary.json"
