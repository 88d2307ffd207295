"""The emulator's own checks find the bugs they are meant to find (self_check/order_and_races.cpp).

- Built with ThreadSanitizer (what scripts/emu_race_check.sh does to the kernels of src/cuda), a
  read of another warp's shared-memory slot with no barrier after its write is reported, and the
  same kernel with the barrier is not.
- SPCONV_LITE_EMU_BLOCK_ORDER=reverse runs the blocks last to first, so a kernel whose result
  depends on the order of its blocks changes its result; and the threads of a block last to
  first, so a read of another thread's write with no barrier between sees the write in one order
  and not in the other.
- Threads that wait at a barrier the others never reach end the run with an error (a GPU
  hangs; OS threads at a std::barrier would too).
- Static shared memory read before it is written holds the fill bytes, in every block.
- Every uninitialised allocation of the CUDA sources goes through the fill of
  include/emu_memory.h (a kernel that skips writing zeros shows then; on fresh CPU pages, not).
- A launch a GPU refuses (no blocks, too many, too large a block, too much dynamic shared
  memory) does not run and leaves the runtime's error; a kernel launched beyond its
  ``__launch_bounds__`` aborts.

Skipped unless SPCONV_LITE_CUDA_EMULATION=1, like the emulated kernels.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("SPCONV_LITE_CUDA_EMULATION", "0") in ("", "0"):
    pytest.skip("CUDA emulation tests run with SPCONV_LITE_CUDA_EMULATION=1",
                allow_module_level=True)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "self_check" / "order_and_races.cpp"
sys.path.insert(0, str(HERE))
import build  # noqa: E402


def compile_self_check(tmp_path: Path, sanitize: str | None) -> Path:
    torch_dir = Path(torch.__file__).resolve().parent
    exe = tmp_path / f"order_and_races_{sanitize or 'plain'}"
    source = tmp_path / SOURCE.name  # rewritten as build.py rewrites the CUDA sources
    source.write_text(build.rewrite(SOURCE))
    command = ["g++", "-std=c++20", "-O1", "-g", "-include", str(HERE / "emu.h"),
               "-I", str(HERE / "include"), "-isystem", str(torch_dir / "include"),
               str(source), "-o", str(exe), "-pthread"]
    if sanitize:
        command.append(f"-fsanitize={sanitize}")
    subprocess.run(command, check=True, capture_output=True, text=True)
    return exe


def run(exe: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    # Not the settings of the suite's own run (CI runs it with the blocks reversed too).
    environment = {k: v for k, v in os.environ.items()
                   if k != "LD_PRELOAD" and not k.startswith("SPCONV_LITE_EMU_")}
    environment.update(env)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          env=environment)


def thread_sanitizer_missing() -> bool:
    found = subprocess.run(["g++", "-print-file-name=libtsan.so"], capture_output=True,
                           text=True).stdout.strip()
    return not os.path.isabs(found)


@pytest.mark.skipif(sys.platform != "linux", reason="ThreadSanitizer build on Linux")
def test_thread_sanitizer_reports_a_missing_barrier(tmp_path):
    if thread_sanitizer_missing() and os.environ.get("CI") != "true":
        pytest.skip("g++ has no ThreadSanitizer runtime (libtsan) here")
    exe = compile_self_check(tmp_path, "thread")
    options = {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66"}
    racy = run(exe, "race", **options)
    assert racy.returncode == 66, racy.stderr[-2000:]
    assert "ThreadSanitizer: data race" in racy.stderr
    assert "read_other_warp" in racy.stderr
    clean = run(exe, "barrier", **options)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "ThreadSanitizer" not in clean.stderr
    assert clean.stdout.strip() == "32"


def test_reversed_block_order_changes_an_order_dependent_kernel(tmp_path):
    exe = compile_self_check(tmp_path, None)
    forward = run(exe, "chain")
    backward = run(exe, "chain", SPCONV_LITE_EMU_BLOCK_ORDER="reverse")
    assert forward.returncode == 0 and backward.returncode == 0, forward.stderr + backward.stderr
    assert forward.stdout.strip() == "8"  # blocks 0..7 in order: 0 -> 1 -> ... -> 8
    assert backward.stdout.strip() == "1"  # block 7 runs first and reads values[7] == 0


def test_a_missing_barrier_changes_what_a_thread_reads_between_the_two_orders(tmp_path):
    exe = compile_self_check(tmp_path, None)
    forward = run(exe, "race")
    backward = run(exe, "race", SPCONV_LITE_EMU_BLOCK_ORDER="reverse")
    assert forward.returncode == 0 and backward.returncode == 0, forward.stderr + backward.stderr
    # Thread 0 reads the slot of thread 32: before its write in thread order (the fill, NaN),
    # after it in reverse order.
    assert forward.stdout.strip() in ("nan", "-nan")
    assert backward.stdout.strip() == "32"
    for order in ("forward", "reverse"):
        synced = run(exe, "barrier", SPCONV_LITE_EMU_BLOCK_ORDER=order)
        assert synced.returncode == 0 and synced.stdout.strip() == "32", synced.stderr


def test_threads_waiting_at_a_barrier_never_reached_abort_instead_of_hanging(tmp_path):
    exe = compile_self_check(tmp_path, None)
    result = run(exe, "hang")
    assert result.returncode != 0
    assert "32 threads wait at barriers that the others never reach" in result.stderr


def test_refused_launches_do_not_run_and_leave_the_error(tmp_path):
    exe = compile_self_check(tmp_path, None)
    result = run(exe, "limits")
    assert result.returncode == 0, result.stderr[-2000:]
    refused, invalid = "9 0", "1 0"  # cudaErrorInvalidConfiguration / cudaErrorInvalidValue
    assert result.stdout.split("\n")[:-1] == [
        refused, refused, refused, refused, "0 6",  # grids
        refused, "0 2",  # block sizes
        "0 1", invalid,  # 48 KB of dynamic shared memory without the opt-in, and 16 bytes more
        "0", "0 1", invalid, invalid,  # a 64 KB opt-in: that kernel only, up to 64 KB
        "1",  # an opt-in beyond the device's shared memory is refused
    ]


def test_launch_beyond_the_kernels_launch_bounds_aborts(tmp_path):
    exe = compile_self_check(tmp_path, None)
    within = run(exe, "bounds", "64")
    assert within.returncode == 0 and within.stdout.strip() == "0 1", within.stderr[-2000:]
    beyond = run(exe, "bounds", "96")
    assert beyond.returncode != 0
    assert "__launch_bounds__(64) launched with 96 threads" in beyond.stderr


def test_unwritten_static_shared_memory_holds_the_fill_in_every_block(tmp_path):
    exe = compile_self_check(tmp_path, None)
    result = run(exe, "unwritten")
    assert result.returncode == 0, result.stderr[-2000:]
    fills = f"-1 {0x7F7F7F7F} -1"  # blocks alternate 0xFF and 0x7F bytes
    assert result.stdout.split("\n")[:-1] == [fills, fills]


def test_every_uninitialised_allocation_is_filled():
    sources = sorted((HERE.parent.parent / "src" / "cuda").glob("*.cu"))
    sources += sorted((HERE.parent.parent / "include").rglob("*.cuh"))
    assert sources
    for source in sources:
        text = build.rewrite(source)
        left = re.findall(r"\b(?:at|torch)::empty\w*\(|\bnew_empty\(", text)
        assert not left, f"{source.name}: {left} not filled (tests/cuda_emu/include/emu_memory.h)"
