#!/usr/bin/env bash
# One command for a GPU machine: unpack the peer libraries, build spconv_lite with its CUDA
# kernels, run every CUDA test (compute-sanitizer over a few small ones alongside), the
# side-by-side benchmark against spconv 2.3.8, the kernel variants, and spconv-Triton last, and
# write everything into a results folder. Every stage is time-boxed inside one budget, so that a
# failure or a hang in one does not eat the others' time, and summary.json is written however
# the run ends.
#
# Usage: scripts/gpu_check.sh RESULTS_DIR [--data DIR]
#   RESULTS_DIR  created if missing; gets at most 8 files (the device tool returns 8):
#                gpu_check.log (everything printed), build.log, tests.xml (JUnit),
#                sanitizer.log, bench.json, variants.json, triton.json, summary.json (with
#                stage "profile": ncu.csv, and the build's output goes into gpu_check.log)
#   --data DIR   folder of the LiDAR files (default: .gpu/lidar, else shared/data/lidar beside
#                the repository or inside it)
#
# Stages, in the order they run (GPU_CHECK_STAGES, comma-separated; default all but profile):
#   build      setup.py build_ext for TORCH_CUDA_ARCH_LIST (default 9.0). Without it the
#              spconv_lite/_C*.so there is used (a later call on a machine still warm); where
#              there is none, the build runs anyway.
#   tests      pytest -k cuda over tests/ (pytest-xdist workers, a per-test timeout), JUnit XML.
#   sanitizer  alongside the tests, in the same time box: compute-sanitizer memcheck,
#              racecheck and synccheck, in parallel, over 32 small CUDA parity tests,
#              instrumenting spconv_lite's kernels only.
#   bench      benchmarks/bench_cuda.py: spconv_lite against spconv 2.3.8 (bench.json).
#   variants   the CUDA kernel variants of issue 13 beside the default kernels and spconv,
#              networks then per layer (variants.json; see "Kernel variants" below).
#   profile    (not in the default) ncu over one layer's conv kernels (ncu.csv).
#   triton     spconv-Triton beside spconv_lite and spconv (triton.json), last: its autotuning
#              compiles every config of every kernel for each new shape, so it runs on a
#              reduced scope (VoxelBackBone8x on KITTI, spconv's net on its cloud; float16 for
#              both before float32; forward and training step) with its autotune lists cut to
#              GPU_CHECK_TRITON_CONFIGS configs per kernel (default 3), which triton.json and
#              its tables say.
# Each stage gets its cap or what is left of the budget less the least that the wanted stages
# after it need (their floors), so tests and bench come first and triton still gets its
# floor; a stage with under 20 s left is skipped. With the default budget of 520 s (no GPU run
# yet: the expected times are guesses; the boxes are what the budget gives at most):
#   stage      cap  floor  box (s)  expected (build 100 s, tests 150 s: t = 20 .. 505 s)
#   prelude     -     -      90     ~20 s: nvidia-smi, torch import, unpacking the peers
#   build      240   60     170     60-150 s: ninja over 5 .cu files for sm_90, 16 cores
#   tests      200  120   120-200   100-200 s: ~760 tests on 8 workers, sanitizer alongside
#   bench      200   75    75-200   115 s: 12 network cases, maps, PointToVoxel (as many as fit)
#   variants   420   45    45-420   45 s: the sweep's first cases (a second call gives more)
#   triton     300   75    75-300   75 s: the first cases (each new shape autotunes first)
#   summary     15    -             reserved: kill grace, writing summary.json
# A stage stopped by its box gets SIGINT (pytest still writes its JUnit XML, bench_cuda.py
# marks its JSON interrupted), then SIGKILL 15 s later; that grace is inside the box.
#
# Environment:
#   GPU_CHECK_STAGES        see above
#   GPU_CHECK_BUDGET_S      seconds for the whole run, summary included (default 520: a
#                           timeout_s of 600 with margin)
#   GPU_CHECK_BUILD_S       the build's cap (default 240; a rehearsal on 2 cores needs more)
#   GPU_CHECK_TEST_WORKERS  pytest-xdist workers (default 8; 0 = none)
#   GPU_CHECK_TEST_TIMEOUT_S  per-test timeout (default 60; pytest-timeout's thread method,
#                           which ends a worker stuck in a CUDA synchronisation; xdist then
#                           replaces the worker and reports the test as crashed)
#   GPU_CHECK_BENCH_ARGS    extra arguments for the bench stage's bench_cuda.py (e.g.
#                           "--repeats 5")
#   GPU_CHECK_VARIANTS_ARGS extra arguments for the variants stage, split at spaces, no quotes
#                           (e.g. '--variants rows=2;tiles=pipelined' for a shorter sweep)
#   GPU_CHECK_TRITON_CONFIGS  configs kept per autotuned spconv-Triton kernel (default 3)
#   GPU_CHECK_TRITON_ARGS   extra arguments for the triton stage's bench_cuda.py
#   GPU_CHECK_PROFILE_LAYER the profile stage's layer, NETWORK:INPUT:LAYER:DTYPE (default
#                           spconv:spconv_pc_x8:1:float16, the 8x cloud's 64->64 SubM; the
#                           same with :float32 profiles the SIMT kernels and the GEMM path)
#   NCU                     the Nsight Compute program (default: on PATH or in CUDA_HOME)
#   COMPUTE_SANITIZER       the compute-sanitizer program (default: on PATH or in CUDA_HOME)
#   SPCONV_LITE_COMMIT      the commit to record in the JSON when the checkout has no .git
#   PYTHON                  the interpreter (default python3, else python)
#   GPU_CHECK_DRY_RUN=1     a rehearsal without a GPU: no build unless asked (the _C*.so there
#                           is used), the tests as selected (they skip without CUDA), the
#                           benchmarks with --device cpu --quick
#
# Needs: a CUDA build of torch with pytest (pytest-xdist, pytest-timeout if there), nvcc, a
# GPU; no internet. Peers: .gpu/peers-cp312.tar.xz (spconv 2.3.8 with its CUDA kernels and
# spconv-Triton 1.0.0, see ../shared/gpu/README.md) is unpacked into .gpu/site (by tar with xz,
# else Python's tarfile), which goes first on PYTHONPATH, so that `import spconv` is that
# spconv; without the archive the benchmarks report the peers as skipped.
#
# On this project's device machine (the `run` tool; 15 minutes of device time in all, starts
# included; the machine goes back 30 s after a call ends), from the checkout that travels:
#   0. first, here: scripts/gpu_rehearsal.sh builds and tests against the GPU machine's torch
#      (2.11, CUDA 13.0) on the CPU, and collects the CUDA test selection with a faked CUDA,
#      at no device time.
#   1. here, once: scripts/gpu_prepare.sh (copies the peers' archive and the LiDAR frames into
#      .gpu/, git-ignored, and prints the call below with the commit).
#   2. ONE call: command "SPCONV_LITE_COMMIT=<git rev-parse HEAD here> bash
#      scripts/gpu_check.sh $OUT/results", carry [".gpu"], timeout_s 600, no kind named: the
#      first call gets an H100 (or an H200 where none starts); naming nvidia-h200 rules out free
#      H100s, and the H200 seen on gVisor refused compute-sanitizer and ncu (KINDS.md). The
#      results name the GPU (bench.json meta.gpu); say which card gave the numbers.
#   3. optional, and only on the still-warm machine, sent within 30 s of the first call's
#      reply (decide it before the first call): the stages summary.json lists under
#      "second_call" (cut by the budget: bench, variants or triton), e.g.
#      command "SPCONV_LITE_COMMIT=<commit> GPU_CHECK_STAGES=variants,triton
#      GPU_CHECK_BUDGET_S=<B> bash scripts/gpu_check.sh $OUT/results", timeout_s 600, WITHOUT
#      carry (carrying .gpu would replace the machine's .gpu and delete the unpacked peers;
#      the _C*.so built by the first call stays), B = the first reply's lease.budget_left_s
#      minus 90 (machine time is counted to the give-back), at most 520. Copy the first call's
#      results aside first (seconds, here). If the first call's build or tests failed, give
#      the machine back instead, fix it here, and rerun on what is left.
#   4. here, after: python benchmarks/bench_cuda.py --write-results <files_at>/results/X.json
#      for X in bench, variants and triton: writes benchmarks/results/DATE-GPU-X.json and .md.
#
# Kernel variants (issue 13; none has run on a GPU yet). The tests stage already checks them on
# the hardware (tests/test_cuda_parity.py: each variant's outputs equal the default kernels'
# bitwise, the compacted weight gradient matches the CPU, the radix-sorted maps and the row
# orders equal the CPU's), and compute-sanitizer runs the small variant cases. The variants
# stage runs bench_cuda.py --libs spconv_lite,spconv --variants default --layers, the x8 cloud
# first, float16 before float32: each network case alternates the default kernels, each
# variant of bench_cuda.DEFAULT_SWEEP and spconv (variants.json: "variant_speedup",
# "vs_spconv", "vs_default"), then every conv layer's forward / input gradient / weight gradient
# per variant ("layers"). In the one call it gets what the budget leaves (the first cases); a
# second call gives it more. Afterwards, here: bench_cuda.py --write-results variants.json
# writes the tables (README "CUDA" says which numbers decide the defaults). mma=sync is not in
# the default sweep: for float16 its machine code has the same instruction counts as WMMA's,
# and bfloat16 is not one of #13's cases; to time it, GPU_CHECK_VARIANTS_ARGS='--dtypes bfloat16
# --variants tiles=pipelined,wgrad=compact;tiles=pipelined,wgrad=compact,mma=sync'. The stage
# "profile" runs ncu (--clock-control none; it reads counters on Firecracker machines, not on
# gVisor ones) over one layer's conv kernels with the default kernels and four variants:
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
TEE_PID=$!
cd "$REPO"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-520}
TAIL=15   # kept for the end: a stage's kill grace, writing summary.json
GRACE=15  # SIGINT at the end of a box, SIGKILL this much later (inside the box)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # temporary files: not in RESULTS

if [ "$DRY_RUN" = 1 ]; then
    STAGES=",${GPU_CHECK_STAGES:-tests,sanitizer,bench,variants,triton},"
else
    STAGES=",${GPU_CHECK_STAGES:-build,tests,sanitizer,bench,variants,triton},"
fi
want() { [[ "$STAGES" == *",$1,"* ]]; }
# Without a built extension every later stage would fail at its import: build first.
if [ "$DRY_RUN" != 1 ] && ! want build && ! ls spconv_lite/_C*.so >/dev/null 2>&1; then
    echo "no spconv_lite/_C*.so here: adding the build stage"
    STAGES=",build$STAGES"
fi
# The benchmark stages' arguments for a rehearsal: on the CPU, cropped inputs, one call.
DRY_BENCH_ARGS=()
[ "$DRY_RUN" = 1 ] && DRY_BENCH_ARGS=(--device cpu --quick --dtypes float32 --repeats 1 --warmup 0)

if [ -z "$DATA" ]; then
    for candidate in "$REPO/.gpu/lidar" "$REPO/../shared/data/lidar" "$REPO/shared/data/lidar"; do
        if [ -d "$candidate" ]; then DATA=$(cd "$candidate" && pwd); break; fi
    done
fi
[ -n "$DATA" ] && export SPCONV_LITE_DATA=$DATA  # the tests' LiDAR frames (tests/helpers.py)

# ----------------------------------------------------------------------------- time boxes
# The stages in the order they run ("tests" is also the sanitizer's box), their caps and their
# floors (the least a stage is worth starting with, reserved while earlier stages run).
ORDER="build tests bench variants profile triton"
declare -A CAP=([build]=${GPU_CHECK_BUILD_S:-240} [tests]=200 [bench]=200 [variants]=420 [profile]=150 [triton]=300)
declare -A FLOOR=([build]=60 [tests]=120 [bench]=75 [variants]=45 [profile]=60 [triton]=75)
declare -A STATE=() RC=() SECS=()  # per stage: ok / failed / timed out / skipped ... / interrupted
wanted_box() {
    if [ "$1" = tests ]; then want tests || want sanitizer; else want "$1"; fi
}
# Seconds stage $1 may use: what is left of the budget less the floors of the wanted stages
# after it, at least its own floor (while the budget has it), at most its cap.
allowance() {
    local stage=$1 reserve=0 later=0 s left seconds
    for s in $ORDER; do
        if [ "$s" = "$stage" ]; then later=1
        elif [ $later = 1 ] && wanted_box "$s"; then reserve=$((reserve + FLOOR[$s]))
        fi
    done
    left=$((BUDGET - (SECONDS - START) - TAIL))
    seconds=$((left - reserve))
    [ "$seconds" -lt "${FLOOR[$stage]}" ] && seconds=${FLOOR[$stage]}
    [ "$seconds" -gt "${CAP[$stage]}" ] && seconds=${CAP[$stage]}
    [ "$seconds" -gt "$left" ] && seconds=$left
    echo "$seconds"
}
# Starts stage $1 (sets STAGE_S, its box in seconds, and STAGE_START); false, with the stage
# recorded as skipped, when under 20 s are left for it.
begin_stage() {
    STAGE_S=$(allowance "$1")
    STAGE_START=$SECONDS
    if [ "$STAGE_S" -lt 20 ]; then
        STATE[$1]="skipped: no time left (${STAGE_S}s)"; RC[$1]=-1; SECS[$1]=0
        echo "=== $1 skipped: ${STAGE_S}s left"
        return 1
    fi
    CURRENT=$1
}
end_stage() {  # $1 stage, $2 rc
    RC[$1]=$2
    SECS[$1]=$((SECONDS - STAGE_START))
    case $2 in
        0) STATE[$1]=ok ;;
        124|137) STATE[$1]="timed out" ;;
        *) STATE[$1]=failed ;;
    esac
    CURRENT=""
    echo "$1: ${STATE[$1]} (rc=$2) in ${SECS[$1]}s"
}
# Runs "$@" for at most $1 seconds in all: SIGINT at $1 - GRACE, SIGKILL at $1 (timeout sends
# them to the whole process group: pytest's workers, compute-sanitizer's target). In the
# background, waited for, so that a TERM to this script is handled at once (bash runs traps
# between commands only). Sets BOX_RC: the command's, or 124 / 137 when the box ended it.
CURRENT=""
BOX_PID=""
boxed() {
    local seconds=$1
    shift
    timeout -s INT -k "$GRACE" "$((seconds > GRACE + 5 ? seconds - GRACE : 5))" "$@" &
    BOX_PID=$!
    wait "$BOX_PID"
    BOX_RC=$?
    BOX_PID=""
}

# ----------------------------------------------------------------------------- sanitizer
# compute-sanitizer runs alongside the tests, in the same box (both check correctness, neither
# is timed), its three tools in parallel, each in a process of its own. Small cases only:
# it slows the kernels it instruments 10-100x, so it instruments spconv_lite's kernels only
# (their mangled names hold "spconv_lite"), not torch's; memcheck without torch's caching
# allocator, so that an access past a tensor's end is past an allocation's end. "float16" also
# matches "bfloat16", hence "and not bfloat16".
F16="(float16 and not bfloat16)"
SANITIZER_TESTS="(test_kernel_maps_are_identical and 1500) or test_zero_sites_maps
 or (test_conv_matches_cpu and subm-16-16 and float32)
 or (test_conv_variants_equal_the_default_kernels and subm-16-16 and (float32 or $F16))
 or (test_compact_weight_grad_pipelined_sums_as_unpipelined and float32-36-28)
 or (test_sync_mma_sums_as_wmma and subm-16-16 and bfloat16)
 or (test_half_precision_close_to_float32 and (subm-16-16 or subm-3-5) and $F16)
 or (test_non_finite_weights_reach_only_real_pairs and $F16)
 or test_conv_with_an_empty_kernel or (test_pooling_is_identical and float32)
 or (test_voxelize_is_identical and 5000)"
SANITIZER_K=$(echo $SANITIZER_TESTS)  # one line
SANITIZER_TOOLS="memcheck racecheck synccheck"
declare -A SANITIZER_RC=()
start_sanitizer() {  # $1: seconds for each tool
    local help tool env_args options
    help=$("$SANITIZER" --help 2>&1)
    "$SANITIZER" --version 2>&1 | tail -1
    for tool in $SANITIZER_TOOLS; do
        env_args=(OMP_NUM_THREADS=1)  # 16 cores shared with the test workers
        options=(--tool "$tool" --error-exitcode 97 --print-limit 30)
        [[ "$help" == *--kernel-name* ]] && options+=(--kernel-name kns=spconv_lite)
        [ "$tool" = memcheck ] && env_args+=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
        [ "$tool" = racecheck ] && [[ "$help" == *--racecheck-num-workers* ]] \
            && options+=(--racecheck-num-workers 2)
        echo "--- compute-sanitizer ${options[*]} (at most $1s)" > "$SCRATCH/$tool.log"
        timeout -s INT -k "$GRACE" "$(($1 - GRACE))" env "${env_args[@]}" "$SANITIZER" \
            "${options[@]}" "$PY" -m pytest tests/test_cuda_parity.py -q -p no:cacheprovider \
            -k "$SANITIZER_K" >> "$SCRATCH/$tool.log" 2>&1 &
        SANITIZER_PIDS+=($!)
    done
}
wait_sanitizer() {
    local i=0 tool
    for tool in $SANITIZER_TOOLS; do
        wait "${SANITIZER_PIDS[$i]}"
        SANITIZER_RC[$tool]=$?
        # A rehearsal selects nothing (no CUDA device): pytest's "no tests ran" is fine there.
        [ "$DRY_RUN" = 1 ] && [ "${SANITIZER_RC[$tool]}" = 5 ] && SANITIZER_RC[$tool]=0
        i=$((i + 1))
    done
    SANITIZER_PIDS=()
}
# sanitizer.log: each tool's output after the other, with its exit status.
collect_sanitizer_logs() {
    local tool
    [ -f "$SCRATCH/memcheck.log" ] || return 0
    for tool in $SANITIZER_TOOLS; do
        cat "$SCRATCH/$tool.log"
        echo "sanitizer $tool: rc=${SANITIZER_RC[$tool]:-interrupted}"
    done > "$RESULTS/sanitizer.log"
    rm -f "$SCRATCH"/*check.log
}

# A rehearsal (dry run): both selections collected as on a GPU, torch reporting one CUDA device
# (scripts/fake_cuda.py), so that a selection that errors or selects nothing fails here, at no
# device time. The sanitizer's list is printed whole. $1: seconds for each collection.
fake_cuda_collect() {
    local out rc ok=0 count parity
    out=$(PYTHONPATH="$REPO/scripts:$PYTHONPATH" timeout -k 5 "$1" "$PY" -m pytest -p fake_cuda \
        --collect-only -q -p no:cacheprovider tests -k cuda 2>&1)
    rc=$?
    count=$(grep -c "::" <<< "$out")
    parity=$(grep -c "^tests/test_cuda_parity.py::" <<< "$out")
    echo "fake-CUDA collection of the tests stage: $count tests, $parity of" \
        "tests/test_cuda_parity.py (rc=$rc)"
    [ "$rc" = 0 ] && [ "$parity" -gt 0 ] || { ok=1; grep -E "rror" <<< "$out" | head -20; }
    out=$(PYTHONPATH="$REPO/scripts:$PYTHONPATH" timeout -k 5 "$1" "$PY" -m pytest -p fake_cuda \
        --collect-only -q -p no:cacheprovider tests/test_cuda_parity.py -k "$SANITIZER_K" 2>&1)
    rc=$?
    count=$(grep -c "::" <<< "$out")
    echo "fake-CUDA collection of the sanitizer's selection: $count tests (rc=$rc):"
    grep "::" <<< "$out" | sed 's/^tests\/test_cuda_parity.py::/    /'
    [ "$rc" = 0 ] && [ "$count" -gt 0 ] || { ok=1; grep -E "rror" <<< "$out" | head -20; }
    return $ok
}

# ----------------------------------------------------------------------------- the end
# summary.json, however the run ends: normally, by `exit`, or by a TERM / INT / HUP (the device
# tool's own timeout). A stage still running is stopped and recorded as interrupted.
SANITIZER_PIDS=()
INTERRUPTED=""
finish() {
    trap - EXIT TERM INT HUP
    local pid
    # Each box is a process group of its own (timeout makes one): stop all of it.
    for pid in ${BOX_PID:-} "${SANITIZER_PIDS[@]}"; do
        kill -INT -- "-$pid" 2>/dev/null
    done
    for _ in 1 2 3 4 5; do  # a few seconds to write their reports
        [ -n "$(jobs -pr)" ] || break
        sleep 1
    done
    for pid in $(jobs -pr); do kill -KILL -- "-$pid" 2>/dev/null; done
    if [ -n "$CURRENT" ]; then
        STATE[$CURRENT]="interrupted"; RC[$CURRENT]=${RC[$CURRENT]:--1}
        SECS[$CURRENT]=$((SECONDS - STAGE_START))
    fi
    collect_sanitizer_logs
    rm -f "$RESULTS"/*.tmp  # a JSON being rewritten when its writer was killed
    write_summary
    rm -rf "$SCRATCH"
    echo "=== gpu_check done in $((SECONDS - START))s: $RESULTS/summary.json"
    # Let tee write the log's last lines before the results are collected.
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
}
# summary.json: each stage's state, rc and seconds, the tests' counts (selected against run),
# each sanitizer tool's errors, each benchmark's cases, and what a second call could rerun.
write_summary() {
    local s records=""
    for s in $ORDER; do
        want "$s" || continue
        records+="$s|${RC[$s]:--1}|${SECS[$s]:-0}|${STATE[$s]:-not run}"$'\n'
    done
    RESULTS="$RESULTS" LOG="$LOG" RECORDS="$records" STAGES="$STAGES" BUDGET="$BUDGET" \
    TOTAL_S=$((SECONDS - START)) INTERRUPTED="$INTERRUPTED" "$PY" - <<'PY'
import json, os, re, xml.etree.ElementTree as ET
from pathlib import Path

results = Path(os.environ["RESULTS"])
stages = [s for s in os.environ["STAGES"].split(",") if s]
summary = {"total_s": int(os.environ["TOTAL_S"]), "budget_s": int(os.environ["BUDGET"]),
           "stages": stages, "interrupted": os.environ["INTERRUPTED"] or None}
for line in os.environ["RECORDS"].splitlines():
    stage, rc, seconds, state = line.split("|", 3)
    summary[stage] = {"state": state, "rc": int(rc), "seconds": int(seconds),
                      "ok": state == "ok"}


def read_json(name):
    try:
        return json.loads((results / name).read_text())
    except (OSError, ValueError):
        return None


tests = summary.get("tests")
if tests is not None and "tests" in stages:
    log = (results / "gpu_check.log").read_text(errors="replace") if (
        results / "gpu_check.log").exists() else ""
    # "8 workers [761 items]" (xdist) or "collected 2097 items / 1336 deselected / 761 selected"
    if m := (re.search(r"workers \[(\d+) items?\]", log) or re.search(r"(\d+) selected", log)):
        tests["selected"] = int(m.group(1))
    try:
        root = ET.parse(results / "tests.xml").getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for key in ("tests", "failures", "errors", "skipped"):
            tests[key] = sum(int(s.get(key, 0)) for s in suites)
        tests["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites
                           for c in s.iter("testcase")
                           if c.find("failure") is not None or c.find("error") is not None][:60]
    except (OSError, ET.ParseError) as exc:
        tests["junit"] = f"unreadable: {exc}"
    # Every selected test ran (a box or a signal cuts the run short: fewer; the JUnit count
    # also holds the modules skipped whole).
    tests["complete"] = "selected" in tests and tests.get("tests", -1) >= tests["selected"]
if "sanitizer" in stages:
    sanitizer = {"tools": {}}
    log = results / "sanitizer.log"
    tool = None
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if m := re.match(r"--- compute-sanitizer --tool (\w+)", line):
            tool = m.group(1)
            sanitizer["tools"][tool] = {}
        elif tool and (m := re.search(r"ERROR SUMMARY: (\d+) error", line)):
            sanitizer["tools"][tool]["errors"] = int(m.group(1))
        elif tool and (m := re.search(  # racecheck's own summary line
                r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warn", line)):
            sanitizer["tools"][tool].update(errors=int(m.group(2)), warnings=int(m.group(3)))
        elif tool and (m := re.match(r"sanitizer \w+: rc=(\S+)", line)):
            sanitizer["tools"][tool]["rc"] = int(m.group(1)) if m.group(1).lstrip(
                "-").isdigit() else m.group(1)
        elif tool and (m := re.search(r"(\d+) passed", line)):
            sanitizer["tools"][tool]["passed"] = int(m.group(1))
    sanitizer["ok"] = bool(sanitizer["tools"]) and all(
        t.get("rc") == 0 and t.get("errors") == 0 for t in sanitizer["tools"].values())
    summary["sanitizer"] = sanitizer


def case_name(c):
    return f"{c['network']} {c['input']} {c['dtype']} {c['pass']}"


for stage, name in (("bench", "bench.json"), ("variants", "variants.json"),
                    ("triton", "triton.json")):
    if stage not in summary or (data := read_json(name)) is None:
        continue
    entry, meta = summary[stage], data["meta"]
    entry["interrupted"] = meta.get("interrupted")
    entry["complete"] = "seconds" in meta and not meta.get("interrupted") and not data.get(
        "skipped_cases")
    entry["meta"] = {k: meta.get(k) for k in ("gpu", "driver", "torch", "cuda", "libraries",
                                              "skipped_libraries", "triton_autotune")}
    entry["skipped_cases"] = data.get("skipped_cases", [])
    if stage == "variants":
        entry["cases"] = {case_name(c): {
            "default_ms": round(c["libs"].get("spconv_lite", {}).get("median_ms", 0), 3),
            "speedup": {k[len("spconv_lite["):-1]: round(v, 3)
                        for k, v in c.get("variant_speedup", {}).items()},
            "not_identical": [k for k, v in c.get("vs_default", {}).items()
                              if not v.get("identical")],
            "errors": c["errors"]} for c in data["networks"]}
    else:
        entry["cases"] = {case_name(c): {
            "median_ms": {n: round(s["median_ms"], 3) for n, s in c["libs"].items()},
            "ratios": {k: round(v, 3) for k, v in c["ratios"].items()},
            "errors": c["errors"]} for c in data["networks"]}
wanted = [s for s in ("build", "tests", "bench", "variants", "profile", "triton")
          if s in summary]
summary["ok"] = all(summary[s]["ok"] for s in wanted) and (
    "sanitizer" not in summary or summary["sanitizer"]["ok"])
# What a second call on the warm machine could still measure (see the script's header): the
# benchmarks that time cut short, not those that failed or had no build.
summary["second_call"] = [s for s in ("bench", "variants", "triton") if s in summary and (
    summary[s]["state"] in ("timed out", "interrupted", "not run")
    or summary[s]["state"].startswith("skipped: no time")
    or (summary[s]["ok"] and not summary[s].get("complete", True)))]
summary["files"] = sorted({p.name for p in results.iterdir()} | {"summary.json"})
(results / "summary.json").write_text(json.dumps(summary, indent=1))

print("=== summary")
for s in wanted:
    e = summary[s]
    extra = ""
    if s == "tests" and "tests" in e:
        extra = (f"; {e['tests']} of {e.get('selected', '?')} selected ran: "
                 f"{e['failures']} failed, {e['errors']} errors, {e['skipped']} skipped")
    if "cases" in e:
        extra = f"; {len(e['cases'])} cases" + (
            f", INTERRUPTED ({e['interrupted']})" if e.get("interrupted") else "")
    print(f"{s:9} {e['state']} (rc {e['rc']}) in {e['seconds']}s{extra}")
    for name, case in e.get("cases", {}).items():
        times = case.get("median_ms") or {"default": case.get("default_ms")}
        print(f"    {name}: " + ", ".join(f"{n} {v}" for n, v in times.items())
              + (f" | {case['ratios']}" if case.get("ratios") else "")
              + (f" | speed-ups {case['speedup']}" if case.get("speedup") else "")
              + (f" | ERRORS {case['errors']}" if case["errors"] else ""))
if "sanitizer" in summary:
    print(f"sanitizer {'ok' if summary['sanitizer']['ok'] else 'NOT OK'}: "
          f"{summary['sanitizer']['tools']}")
print(f"ok: {summary['ok']}; files: {summary['files']}; second call could run: "
      f"{','.join(summary['second_call']) or 'nothing'}")
PY
}
trap finish EXIT
trap 'INTERRUPTED="signal"; exit 143' TERM INT HUP

echo "=== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo $REPO, results $RESULTS"
echo "stages: ${STAGES:1:-1}; budget ${BUDGET}s; data: ${DATA:-not found}"
echo "commit: ${SPCONV_LITE_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
command -v nvidia-smi >/dev/null && nvidia-smi \
    --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
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
        if command -v xz >/dev/null; then
            boxed 90 tar -xJf "$PEERS_ARCHIVE" -C "$PEERS_SITE"
        else  # tar -J needs the xz program; Python reads xz itself
            boxed 90 "$PY" -c "import sys, tarfile
kw = {'filter': 'tar'} if hasattr(tarfile, 'tar_filter') else {}  # as tar does
tarfile.open(sys.argv[1]).extractall(sys.argv[2], **kw)" "$PEERS_ARCHIVE" "$PEERS_SITE"
        fi
        if [ "$BOX_RC" = 0 ]; then
            touch "$PEERS_SITE/.unpacked"
        else
            echo "unpacking failed (rc=$BOX_RC): the benchmarks will report the peers as skipped"
        fi
    fi
else
    echo "no $PEERS_ARCHIVE: the benchmarks will report the peers as skipped"
fi
# The peers first, so that `import spconv` is theirs; then this checkout's spconv_lite.
if [ -f "$PEERS_SITE/.unpacked" ]; then
    export PYTHONPATH="$PEERS_SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# ----------------------------------------------------------------------------- build
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
# The 8 files the device tool returns: with ncu.csv the build's output goes into the main log.
BUILD_LOG="$RESULTS/build.log"
want profile && BUILD_LOG="$SCRATCH/build.log"
BUILD_OK=0
if want build && begin_stage build; then
    link_dir=$(cudart_link_dir)
    [ -n "$link_dir" ] && export LIBRARY_PATH="$link_dir${LIBRARY_PATH:+:$LIBRARY_PATH}"
    echo "=== build (at most ${STAGE_S}s; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}," \
        "CUDA_HOME=${CUDA_HOME:-unset}${link_dir:+, libcudart.so from $link_dir})"
    rm -f spconv_lite/_C*.so
    SPCONV_LITE_WITH_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        MAX_JOBS=${MAX_JOBS:-$(nproc)} boxed "$STAGE_S" \
        "$PY" setup.py build_ext --inplace > "$BUILD_LOG" 2>&1
    build_rc=$BOX_RC
    grep -iE "error|warning" "$BUILD_LOG" | grep -v "^ninja: " | head -30
    if [ "$BUILD_LOG" = "$SCRATCH/build.log" ]; then cat "$BUILD_LOG"; else tail -3 "$BUILD_LOG"; fi
    end_stage build "$build_rc"
elif ls spconv_lite/_C*.so >/dev/null 2>&1; then
    echo "=== build skipped: using $(ls spconv_lite/_C*.so)"
fi
if ls spconv_lite/_C*.so >/dev/null 2>&1 && [ "${RC[build]:-0}" = 0 ]; then
    "$PY" - <<'PY' && BUILD_OK=1
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
    [ "$DRY_RUN" = 1 ] && BUILD_OK=1  # a rehearsal: the CPU build will do
fi
if [ "$BUILD_OK" != 1 ]; then
    echo "no working CUDA build of spconv_lite: the other stages are skipped"
    for s in $ORDER; do
        [ "$s" != build ] && wanted_box "$s" && { STATE[$s]="skipped: no build"; RC[$s]=-1; }
    done
    exit 1  # the EXIT trap writes summary.json
fi

# ----------------------------------------------------------------------------- tests
if wanted_box tests && begin_stage tests; then
    SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer \
        || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null || true)}
    if want sanitizer && [ -n "$SANITIZER" ]; then
        echo "=== compute-sanitizer over small CUDA parity tests, alongside (sanitizer.log)"
        start_sanitizer "$STAGE_S"
    elif want sanitizer; then
        echo "compute-sanitizer not found: sanitizer skipped" | tee "$RESULTS/sanitizer.log"
    fi
    tests_rc=0
    [ "$DRY_RUN" = 1 ] && { fake_cuda_collect $((STAGE_S / 4)) || tests_rc=3; }
    if want tests; then
        extra=()
        workers=${GPU_CHECK_TEST_WORKERS:-8}
        if [ "$workers" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
            # A worker that crashes (or that pytest-timeout ends) is replaced: its test fails.
            extra+=(-n "$workers" --max-worker-restart 20)
            threads=$(( ($(nproc) - 3) / workers ))  # cores shared by workers and sanitizer
            export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
        fi
        # Well inside the box: one hung kernel costs its test, not the stage. The thread method
        # also ends a worker blocked in a CUDA synchronisation, where a signal would wait.
        "$PY" -c "import pytest_timeout" 2>/dev/null \
            && extra+=(--timeout "${GPU_CHECK_TEST_TIMEOUT_S:-60}" --timeout-method thread)
        echo "=== CUDA tests (pytest -k cuda, at most ${STAGE_S}s)"
        # Not -q: the log then says how many tests were selected ("N workers [M items]").
        boxed $((STAGE_S - (SECONDS - STAGE_START))) "$PY" -m pytest tests -k cuda -rfEs \
            -p no:cacheprovider --junitxml="$RESULTS/tests.xml" -o junit_family=xunit1 \
            --durations=15 "${extra[@]}"
        [ "$tests_rc" = 0 ] && tests_rc=$BOX_RC
        # A rehearsal selects nothing (no CUDA device): pytest's "no tests ran" is fine there.
        [ "$DRY_RUN" = 1 ] && [ "$tests_rc" = 5 ] && tests_rc=0
        unset OMP_NUM_THREADS
    fi
    if [ ${#SANITIZER_PIDS[@]} -gt 0 ]; then
        echo "waiting for compute-sanitizer (boxed like the tests)"
        wait_sanitizer
        collect_sanitizer_logs
        grep -E "^--- |SUMMARY|^sanitizer |passed|failed|error" "$RESULTS/sanitizer.log" \
            | head -40
    fi
    if want tests; then
        end_stage tests "$tests_rc"
    else  # the sanitizer alone: summary.json judges it by its log
        STATE[tests]="not asked"; RC[tests]=-1; SECS[tests]=$((SECONDS - STAGE_START))
        CURRENT=""
    fi
fi

# ----------------------------------------------------------------------------- benchmarks
# bench_cuda.py in a box of $1 seconds, with a case budget that leaves the last case up to 30 s
# before the box's SIGINT (a case cut there is lost, the earlier ones are in the JSON).
bench_run() {
    local seconds=$1
    shift
    local margin=$((seconds / 4 < 30 ? seconds / 4 : 30))
    local budget=$((seconds - GRACE - margin))
    boxed "$seconds" "$PY" benchmarks/bench_cuda.py ${DATA:+--data "$DATA"} \
        --budget-s $((budget > 10 ? budget : 10)) "$@" "${DRY_BENCH_ARGS[@]}"
}

if want bench && begin_stage bench; then
    echo "=== side-by-side benchmark, spconv_lite and spconv (at most ${STAGE_S}s; bench.json)"
    # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of words
    bench_run "$STAGE_S" --libs spconv_lite,spconv --repeats 7 --warmup 2 \
        --json "$RESULTS/bench.json" ${GPU_CHECK_BENCH_ARGS:-}
    end_stage bench "$BOX_RC"
fi

if want variants && begin_stage variants; then
    echo "=== kernel variants beside the default kernels and spconv (at most ${STAGE_S}s)"
    # shellcheck disable=SC2086  # GPU_CHECK_VARIANTS_ARGS is a list of words
    bench_run "$STAGE_S" --libs spconv_lite,spconv --variants default --layers --no-voxelize \
        --inputs spconv_pc_x8,kitti,spconv_pc --dtypes float16,float32 --repeats 5 --warmup 1 \
        --json "$RESULTS/variants.json" ${GPU_CHECK_VARIANTS_ARGS:-}
    end_stage variants "$BOX_RC"
fi

if want profile && begin_stage profile; then
    NCU=${NCU:-$(command -v ncu || ls "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" 2>/dev/null || true)}
    if [ -n "$NCU" ]; then
        echo "=== ncu over one layer's conv kernels (at most ${STAGE_S}s; ncu.csv)"
        boxed "$STAGE_S" "$NCU" --clock-control none --nvtx --target-processes all \
            -k "regex:conv_|weight_grad" --section SpeedOfLight --section Occupancy \
            --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
            --log-file "$RESULTS/ncu.csv" "$PY" benchmarks/bench_cuda.py ${DATA:+--data "$DATA"} \
            --libs spconv_lite --no-voxelize \
            --profile-layer "${GPU_CHECK_PROFILE_LAYER:-spconv:spconv_pc_x8:1:float16}" \
            --variants "rows=2;tiles=pipelined;rows=2,tiles=pipelined;wgrad=compact"
        end_stage profile "$BOX_RC"
    else
        echo "ncu not found: profile stage skipped"
        STATE[profile]="skipped: ncu not found"; RC[profile]=-1; SECS[profile]=0; CURRENT=""
    fi
fi

# Last: its first call of every shape autotunes (compiles each config), see the header.
if want triton && begin_stage triton; then
    echo "=== spconv-Triton beside spconv_lite and spconv (at most ${STAGE_S}s; triton.json;" \
        "autotune lists cut to ${GPU_CHECK_TRITON_CONFIGS:-3} configs per kernel)"
    # shellcheck disable=SC2086  # GPU_CHECK_TRITON_ARGS is a list of words
    bench_run "$STAGE_S" --libs spconv_lite,spconv,spconv_triton \
        --triton-configs "${GPU_CHECK_TRITON_CONFIGS:-3}" --inputs kitti,spconv_pc \
        --dtypes float16,float32 --dtype-major --no-voxelize --no-maps --repeats 5 --warmup 2 \
        --json "$RESULTS/triton.json" ${GPU_CHECK_TRITON_ARGS:-}
    end_stage triton "$BOX_RC"
fi
exit 0  # the EXIT trap writes summary.json
