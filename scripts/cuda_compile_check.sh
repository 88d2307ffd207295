#!/usr/bin/env bash
# Compile check of every CUDA source (src/cuda/*.cu) with nvcc for sm_80 and sm_90, against the
# installed torch's headers and with the flags the extension build uses (setup.py plus
# torch.utils.cpp_extension's nvcc flags). Needs nvcc, not a GPU, and works with a CPU-only
# torch wheel: such a wheel lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h,
# which is supplied from a temporary folder when missing.
#
# Usage: scripts/cuda_compile_check.sh [file.cu ...]    (default: every src/cuda/*.cu)
# Environment: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc),
#              CUDA_CHECK_ARCHS (default "80 90"),
#              CUDA_CHECK_JOBS: files compiled at once (default: the number of cores),
#              CUDA_CHECK_RESOURCES=1: also prints each kernel's registers, stack frame, spills and
#              static shared memory for the last architecture (ptxas --resource-usage), the
#              numbers that decide how many blocks fit on a multiprocessor.
#              CUDA_CHECK_SASS=1: also counts, per kernel of the last architecture's machine
#              code, the instructions that show whether a kernel does what its comments say
#              (tensor-core MMAs, ldmatrix, 16-byte shared loads, FMAs, cp.async, generic
#              loads, local memory). Needs cuobjdump (CUOBJDUMP, else on PATH), which PyPI ships: pip install
#              nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, then put the folder of those two
#              programs (site-packages/nvidia/cu13/bin) on PATH.
# Exits non-zero when any file fails for any architecture, naming each failure.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCHS=${CUDA_CHECK_ARCHS:-"80 90"}
if [ ! -x "$NVCC" ]; then
    echo "cuda_compile_check: nvcc not found (set NVCC)" >&2
    exit 2
fi
if [ $# -gt 0 ]; then
    SOURCES=("$@")
else
    SOURCES=(src/cuda/*.cu)
fi
if [ ! -e "${SOURCES[0]}" ]; then
    echo "cuda_compile_check: no CUDA sources found" >&2
    exit 2
fi

# Torch's include folders and Python's, as the extension build passes them.
mapfile -t INCLUDES < <(python - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths() + [sysconfig.get_paths()["include"]]:
    print(path)
PY
)
if [ ${#INCLUDES[@]} -eq 0 ]; then
    echo "cuda_compile_check: could not import torch to find its headers" >&2
    exit 2
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
EXTRA_INCLUDE=()
if [ ! -f "${INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    mkdir -p "$TMP/include/c10/cuda/impl"
    cat > "$TMP/include/c10/cuda/impl/cuda_cmake_macros.h" <<'H'
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
H
    EXTRA_INCLUDE=(-I "$TMP/include")
fi

# Flags of the CUDAExtension in setup.py: torch's COMMON_NVCC_FLAGS, -fPIC, our -O3 -std=c++20
# and macros, the extension-name macros.
FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       --expt-relaxed-constexpr --compiler-options -fPIC -O3 -std=c++20
       -DSPCONV_LITE_WITH_CUDA=1 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
       -I include "${EXTRA_INCLUDE[@]}")
for inc in "${INCLUDES[@]}"; do FLAGS+=(-I "$inc"); done

# Per kernel of $1 (compiled again, to the object $2), for the last architecture: registers,
# stack frame and spill stores / loads (bytes), static shared memory (bytes), demangled name.
resources() {
    local arch=${ARCHS##* }
    "$NVCC" "${FLAGS[@]}" -gencode "arch=compute_$arch,code=sm_$arch" --resource-usage \
        -c "$1" -o "$2" 2>&1 | python3 -c '
import re, subprocess, sys
kernels, name = [], None
for line in sys.stdin:
    if m := re.search(r"Compiling entry function .(\S+). for", line):
        name, stack = m.group(1), (0, 0, 0)
    elif name and (m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        stack = tuple(map(int, m.groups()))
    elif name and (m := re.search(r"Used (\d+) registers", line)):
        smem = re.search(r"(\d+) bytes smem", line)
        kernels.append((name, int(m.group(1)), stack, int(smem.group(1)) if smem else 0))
        name = None
demangled = subprocess.run(["c++filt"], input="\n".join(k[0] for k in kernels),
                           capture_output=True, text=True).stdout.splitlines()
print("    regs stack spill st/ld   smem  kernel")
for full, (_, regs, (frame, stores, loads), smem) in zip(demangled, kernels):
    full = re.sub(r"spconv_lite::\(anonymous namespace\)::|c10::|at::", "", full)
    print(f"    {regs:4d} {frame:5d} {stores:5d}/{loads:<5d} {smem:6d}  {full[:120]}")
'
}

# Per kernel of the object $1, for the last architecture: static counts of chosen
# instructions in its machine code (not how often they run).
sass_counts() {
    "$CUOBJDUMP" -sass -arch "sm_${ARCHS##* }" "$1" | python3 -c '
import collections, re, subprocess, sys
columns = ["HMMA", "LDSM", "LDS.128", "LDS", "FFMA", "DFMA", "LDGSTS", "LDG", "LD", "LDL/STL"]
def column(opcode):  # the column an instruction counts in, or None
    base = opcode.split(".")[0]
    if base == "LDS":
        return "LDS.128" if opcode.startswith("LDS.128") else "LDS"
    if base in ("LDL", "STL"):
        return "LDL/STL"
    return base if base in columns else None
kernels = []
for line in sys.stdin:
    if m := re.match(r"\s+Function : (\S+)", line):
        kernels.append((m.group(1), collections.Counter()))
    elif kernels and (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)):
        kernels[-1][1][column(m.group(1))] += 1
demangled = subprocess.run(["c++filt"], input="\n".join(k[0] for k in kernels),
                           capture_output=True, text=True).stdout.splitlines()
print("   " + "".join(f"{c:>8}" for c in columns) + "  kernel")
for full, (_, counts) in zip(demangled, kernels):
    full = re.sub(r"spconv_lite::\(anonymous namespace\)::|c10::|at::", "", full)
    print("   " + "".join(f"{counts[c]:8d}" for c in columns) + f"  {full[:100]}")
'
}

CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
if [ "${CUDA_CHECK_SASS:-0}" = 1 ] && [ -z "$CUOBJDUMP" ]; then
    echo "cuda_compile_check: CUDA_CHECK_SASS=1 needs cuobjdump (pip install" \
         "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm; put their bin folder on PATH)" >&2
    exit 2
fi

echo "cuda_compile_check: $("$NVCC" --version | tail -1), archs: $ARCHS"
GENCODE=()
for arch in $ARCHS; do GENCODE+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
# Checks one source, printing what it found; a line "  FAIL  SOURCE sm_ARCH" per failure.
check_file() {
    local src=$1 name start log
    name=$(basename "$src")
    # One nvcc call for all architectures (the host side is compiled once); on failure, one
    # call per architecture to name the ones that fail.
    start=$SECONDS
    log="$TMP/$name.log"
    if "$NVCC" "${FLAGS[@]}" "${GENCODE[@]}" -c "$src" -o "$TMP/$name.o" > "$log" 2>&1; then
        echo "  ok    $src [sm_${ARCHS// /, sm_}] ($((SECONDS - start)) s)"
        grep -i "warning" "$log" | head -20  # worth reading even when the file compiles
        [ "${CUDA_CHECK_RESOURCES:-0}" = 1 ] && resources "$src" "$TMP/$name.o"
        [ "${CUDA_CHECK_SASS:-0}" = 1 ] && sass_counts "$TMP/$name.o"
        return 0
    fi
    for arch in $ARCHS; do
        log="$TMP/$name.sm_$arch.log"
        if "$NVCC" "${FLAGS[@]}" -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" \
            -o "$TMP/$name.o" > "$log" 2>&1; then
            echo "  ok    $src sm_$arch"
        else
            echo "  FAIL  $src sm_$arch"
            head -60 "$log"
        fi
    done
}

# The files are checked side by side, CUDA_CHECK_JOBS at a time (default: one per core), and
# reported in order.
JOBS=${CUDA_CHECK_JOBS:-$(nproc)}
start_all=$SECONDS
for src in "${SOURCES[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    check_file "$src" > "$TMP/$(basename "$src").report" 2>&1 &
done
wait
failures=()
for src in "${SOURCES[@]}"; do
    report="$TMP/$(basename "$src").report"
    cat "$report"
    mapfile -t -O ${#failures[@]} failures < <(sed -n 's/^  FAIL  \(.*\) \(sm_[0-9]*\)$/\1:\2/p' "$report")
done
echo "cuda_compile_check: ${#SOURCES[@]} files in $((SECONDS - start_all)) s"
if [ ${#failures[@]} -gt 0 ]; then
    echo "cuda_compile_check: FAILED: ${failures[*]}" >&2
    exit 1
fi
echo "cuda_compile_check: all CUDA sources compile"
