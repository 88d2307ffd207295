#!/usr/bin/env bash
# Prepares this checkout for a run of scripts/gpu_check.sh on the device machine and prints the
# `run` call to make: copies the peers' archive and the LiDAR frames into .gpu/ (git-ignored;
# the call carries it), drops what a dry run here unpacked or linked there (.gpu/site, .gpu/lib:
# hundreds of MB, rebuilt on the GPU machine), and checks that what travels stays under the
# 64 MiB limit.
#
# Usage: scripts/gpu_prepare.sh [SHARED_DIR]   (default: ../shared beside the repository)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${1:-$REPO/../shared}
cd "$REPO"
if ! git check-ignore -q .gpu/peers-cp312.tar.xz; then
    echo "error: .gpu/ is not git-ignored here" >&2
    exit 1
fi
rm -rf .gpu/site .gpu/lib
mkdir -p .gpu/lidar
cp -u "$SHARED/gpu/peers-cp312.tar.xz" .gpu/
cp -u "$SHARED"/data/lidar/* .gpu/lidar/
# What travels: tracked and untracked-not-ignored files, plus the carried .gpu/.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- \
    | tail -1 | cut -f1)
gpu_bytes=$(du -sb .gpu | cut -f1)
total_mib=$(( (tree_bytes + gpu_bytes) / 1048576 ))
echo "travels: working tree $((tree_bytes / 1048576)) MiB + .gpu $((gpu_bytes / 1048576)) MiB" \
    "= ${total_mib} MiB (limit 64)"
[ "$total_mib" -lt 64 ] || { echo "error: over the 64 MiB limit" >&2; exit 1; }
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
cat <<CALL
run call (one; no kind: the reply names the card):
  command:   SPCONV_LITE_COMMIT=$commit bash scripts/gpu_check.sh \$OUT/results
  carry:     [".gpu"]
  timeout_s: 600
optional second call, only within 30 s of the first reply, on that still-warm machine, for the
stages summary.json lists under "second_call" (B = lease.budget_left_s - 90, at most 520):
  command:   SPCONV_LITE_COMMIT=$commit GPU_CHECK_STAGES=<second_call> GPU_CHECK_BUDGET_S=<B> bash scripts/gpu_check.sh \$OUT/results
  carry:     none (carrying .gpu would delete the unpacked peers there)
  timeout_s: 600
afterwards, here, for each of bench, variants and triton that came back:
  python benchmarks/bench_cuda.py --write-results <files_at>/results/bench.json
CALL
