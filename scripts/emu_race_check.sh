#!/usr/bin/env bash
# Race check of the CUDA kernels without a GPU: the emulator's tests (tests/cuda_emu) with the
# kernels built under ThreadSanitizer. In the emulator each CUDA thread of a block is an OS
# thread, ordered only by the barriers and the warp collectives, so every pair of accesses by
# two threads of a block with no barrier between them, one of them a write, is reported
# whatever the interleaving: a missing __syncthreads / __syncwarp, or a stage refilled while
# other warps still read it (compute-sanitizer's racecheck finds these on a GPU, in the few
# cases that gpu_check.sh can afford). Races between blocks are out of its reach (the blocks run
# in sequence).
#
# Usage: scripts/emu_race_check.sh [PYTEST ARGS]
#   default: one case of every kernel family (RACE_CHECK_SELECTION below); pass e.g.
#   "tests/cuda_emu -k compact" for more (all of tests/cuda_emu takes hours on 2 cores).
# Exit status: 1 when ThreadSanitizer reported a race (the reports are printed) or a test failed.
# Needs g++ with its ThreadSanitizer runtime (libtsan). The CPU ops run on one thread
# (OMP_NUM_THREADS=1): torch's OpenMP runtime is not instrumented, so its barriers would show
# as races.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
# The interpreter itself: a wrapper script (pyenv's shims) would run its shell under the
# preloaded runtime, which crashes it.
PY=$("$PY" -c "import sys; print(sys.executable)")
TSAN=$(g++ -print-file-name=libtsan.so)
if [ ! -f "$TSAN" ]; then
    echo "emu_race_check: g++ has no ThreadSanitizer runtime (libtsan.so)" >&2
    exit 2
fi
# One case of each kernel family: maps (hash table, radix sort), row orders, pooling, the
# voxelizer, the default convs (WMMA, SIMT, per-offset GEMMs; WMMA's correction for inf / NaN
# weights) and their weight gradients, the pipelined tiles (WMMA and mma.sync, 64 and 128
# rows, copies landing late and early) and the compacted weight gradients (tensor-core, SIMT,
# pipelined).
T=tests/cuda_emu/test_emulated_cuda.py
RACE_CHECK_SELECTION=(
    "$T::test_subm_map[2-9-8-10-300-3-1]"
    "$T::test_conv_map_with_radix_sort"
    "$T::test_row_order_matches_cpu[strided-1]"
    "$T::test_pooling[strided-float32]"
    "$T::test_voxelize_mean[odd-sizes]"
    "$T::test_conv_forward_and_gradients[subm-16-32-float16-fused-9]"
    "$T::test_conv_forward_and_gradients[strided-64-64-float32-fused-9]"
    "$T::test_conv_forward_and_gradients[transposed-13-70-float32-gemm-9]"
    "$T::test_conv_with_non_finite_weights[16-24-float16-fused-9]"
    "$T::test_conv_variants_equal_the_default_kernels[strided-40-32-tiles=pipelined-1-float16-9]"
    "$T::test_conv_variants_equal_the_default_kernels[subm-4-16-tiles=pipelined,mma=sync-2-bfloat16-9]"
    "$T::test_conv_variants_equal_the_default_kernels[subm-16-16-tiles=pipelined-2-float32-9]"
    "$T::test_pipelined_tiles_of_128_rows[subm-16-16-tiles=pipelined,mma=sync-2-float16]"
    "$T::test_pipelines_with_copies_landing_early[conv-subm-16-16-tiles=pipelined-0-float32]"
    "$T::test_compact_weight_grad[strided-64-64-float16-9]"
    "$T::test_compact_weight_grad[subm-16-32-float32-9]"
    "$T::test_compact_weight_grad_pipelined_sums_as_unpipelined[subm-float32-4-16]"
    "$T::test_compact_weight_grad_with_sync_mma_sums_as_wmma[subm-3-64-bfloat16-copies]"
)
LOGS=$(mktemp -d)
SPCONV_LITE_EMU_SANITIZE=thread SPCONV_LITE_CUDA_EMULATION=1 OMP_NUM_THREADS=1 \
    LD_PRELOAD="$TSAN" TSAN_OPTIONS="halt_on_error=0 report_signal_unsafe=0 log_path=$LOGS/tsan" \
    "$PY" -m pytest -q -p no:cacheprovider "${@:-${RACE_CHECK_SELECTION[@]}}"
status=$?
reports=$(cat "$LOGS"/tsan.* 2>/dev/null | grep -c "WARNING: ThreadSanitizer" || true)
echo "emu_race_check: pytest exit status $status, ThreadSanitizer reports: $reports"
if [ "$reports" -gt 0 ]; then
    cat "$LOGS"/tsan.* | head -300
    exit 1
fi
[ $status -eq 0 ] || exit 1
