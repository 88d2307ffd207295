#!/usr/bin/env bash
# Rehearses the GPU run on a machine without a GPU, with the GPU machine's torch (2.11.0, CUDA
# 13.0): what would fail there for reasons other than the GPU fails here first, where it costs
# no device time. Found so far: Dynamo in torch 2.11 skips property setters (compiled forwards
# read stale features); FindOpenMP fails with a CUDA libtorch; the link needs an unversioned
# libcudart.so.
#
# Usage: scripts/gpu_rehearsal.sh [RESULTS_DIR]     (default /tmp/spconv_lite-rehearsal/results)
#
#   1. a virtual environment (Python 3.12 where found) with torch==$TORCH_VERSION (PyPI's CUDA
#      build, ~5 GB; made once and kept in $VENV), numpy, pytest, hypothesis and spconv 2.3.8;
#   2. a copy of this checkout (tracked and untracked, not ignored files; .gpu/ too when
#      scripts/gpu_prepare.sh filled it) in $WORK;
#   3. there, scripts/gpu_check.sh as a dry run of every stage of the GPU run but the
#      sanitizer: the CUDA build for TORCH_CUDA_ARCH_LIST=9.0 through setup.py, as on the GPU
#      machine; the tests stage's selection and the sanitizer's collected with a faked CUDA
#      device (scripts/fake_cuda.py: the CUDA parity tests and every test parametrized over
#      devices collect as on the GPU; a collection error or an empty selection fails the
#      stage), then the CUDA tests (they skip without a device); the bench, variants and
#      triton stages on the CPU (the peers that import run up to their first GPU-only call;
#      spconv-Triton's autotune lists are cut as on the GPU);
#   4. the whole test suite on the CPU against that build (CMake tests included: the C++
#      library is built with a CUDA libtorch).
#
# Environment: TORCH_VERSION (default 2.11.0), VENV (default /tmp/spconv_lite-torch$TORCH_VERSION),
# REHEARSAL_PYTHON (the interpreter the environment is made with; default a Python 3.12 where
# found, as on the GPU machine, else python3), WORK (default /tmp/spconv_lite-rehearsal),
# CUDA_HOME (default: the toolkit nvcc belongs to).
# Needs nvcc and PyPI. About 10 minutes on 2 cores once the environment exists.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
VENV=${VENV:-/tmp/spconv_lite-torch$TORCH_VERSION}
WORK=${WORK:-/tmp/spconv_lite-rehearsal}
RESULTS=${1:-$WORK/results}

# The GPU machine runs Python 3.12, and the peers' archive (.gpu/peers-cp312.tar.xz) is built
# for it: with a 3.12 here, the benchmark's dry run imports spconv's CUDA build and
# spconv-Triton as the GPU run will. pybind11 and portalocker are what their imports need
# beyond torch (the GPU machine has both).
if [ -z "${REHEARSAL_PYTHON:-}" ]; then
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 python3; do
        if "$candidate" -c "" 2>/dev/null; then REHEARSAL_PYTHON=$candidate; break; fi
    done
fi
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "=== making $VENV (torch==$TORCH_VERSION, $("$REHEARSAL_PYTHON" --version))"
    "$REHEARSAL_PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy pytest pytest-xdist hypothesis \
        pybind11 portalocker cmake ninja
fi
# spconv from PyPI is the CPU suite's reference; the cp312 peers replace it in the GPU check.
"$VENV/bin/python" -c "import spconv" 2>/dev/null || "$VENV/bin/pip" install -q spconv==2.3.8
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The toolkit the CMake tests look for: nvcc's own folder, or the real one behind a wrapper.
if [ -z "${CUDA_HOME:-}" ]; then
    for candidate in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" \
        /usr/local/cuda /usr/local/cuda-*; do
        if [ -x "$candidate/bin/nvcc" ] && [ -e "$candidate/include/cuda_runtime.h" ]; then
            CUDA_HOME=$candidate
            break
        fi
    done
fi
export CUDA_HOME CUDA_PATH=$CUDA_HOME PATH="$CUDA_HOME/bin:$VENV/bin:$PATH"

echo "=== copying the checkout into $WORK"
rm -rf "$WORK" && mkdir -p "$WORK"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
    | tar -xf - -C "$WORK"
[ -d "$REPO/.gpu" ] && cp -r "$REPO/.gpu" "$WORK/.gpu"
for data in "$REPO/.gpu/lidar" "$REPO/../shared/data/lidar"; do
    [ -d "$data" ] && { export SPCONV_LITE_DATA=$(cd "$data" && pwd); break; }
done

cd "$WORK"
echo "=== scripts/gpu_check.sh, dry run with the CUDA build"
# Fewer test workers than the GPU machine's 8 and more time for the build: fewer cores here.
PYTHON="$VENV/bin/python" GPU_CHECK_DRY_RUN=1 GPU_CHECK_TEST_WORKERS=2 GPU_CHECK_BUILD_S=900 \
    GPU_CHECK_BUDGET_S=1500 GPU_CHECK_STAGES=build,tests,bench,variants,triton \
    bash scripts/gpu_check.sh "$RESULTS" || true
"$VENV/bin/python" - "$RESULTS/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
failed = [s for s in ("build", "tests", "bench", "variants", "triton") if not summary[s]["ok"]]
if failed:  # tests: the fake-CUDA collections (gpu_check.log says which)
    sys.exit(f"stages {failed} failed in the dry run: {sys.argv[1]}")
PY

echo "=== the test suite on the CPU, against the CUDA build and torch $TORCH_VERSION"
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider -rfE
