"""Helpers shared by the benchmark scripts: the optional spconv baseline, timing, statistics."""

from __future__ import annotations

import contextlib
import io
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

try:  # the baseline is optional
    with contextlib.redirect_stdout(io.StringIO()):
        import spconv.pytorch as spconv_torch
        from spconv.core import ConvAlgo
        from spconv.pytorch import ops as spconv_ops
    SPCONV_VERSION: str | None = metadata.version("spconv")
except Exception:  # noqa: BLE001  (any import failure means: no baseline)
    spconv_torch = ConvAlgo = spconv_ops = None
    SPCONV_VERSION = None

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data" / "lidar"


class Case:
    """A benchmark case: ``ours()`` and ``theirs()`` run one call; ``check()`` compares them."""

    def __init__(self, name: str, ours: Callable, theirs: Callable | None = None,
                 check: Callable[[], str] | None = None) -> None:
        self.name = name
        self.ours = ours
        self.theirs = theirs
        self.check = check


def probe(fn: Callable) -> str | None:
    """Runs ``fn`` once; returns None if it works, else a one-line reason (spconv's own error
    printing is swallowed)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fn()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]


def stats(samples: list[float]) -> dict:
    q = np.percentile(samples, [25, 75])
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "p25_ms": float(q[0]),
        "p75_ms": float(q[1]),
        "samples_ms": samples,
    }


def time_case(case: Case, warmup: int, repeats: int, with_theirs: bool) -> dict:
    """Times ours (and theirs when asked and working), alternating call by call."""
    fns = {"spconv_lite": case.ours}
    errors = {}
    if with_theirs and case.theirs is not None:
        reason = probe(case.theirs)
        if reason is None:
            fns["spconv"] = case.theirs
        else:
            errors["spconv"] = reason
    return {"stats": time_alternating(fns, warmup, repeats), "errors": errors}


def one_line(exc: BaseException) -> str:
    """An exception as "Type: first line of its message" (at most 300 characters)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def time_alternating(fns: dict[str, Callable], warmup: int, repeats: int,
                     sync: Callable[[], None] | None = None,
                     errors: dict[str, str] | None = None) -> dict:
    """Statistics (ms) of each function, run in turn call by call so that they share the
    machine's state (clock, caches, other load) evenly. With ``sync`` (for example
    ``torch.cuda.synchronize``), each timed call runs between two calls of it, so that its time
    includes the device work it queued. With ``errors``, a function that raises (out of memory
    in a later call, say) is dropped with its error recorded there, and the others go on;
    without it the error propagates."""
    sync = sync or (lambda: None)
    fns = dict(fns)
    samples = {name: [] for name in fns}

    def call(name: str, fn: Callable, stage: str) -> float | None:
        try:
            sync()
            start = time.perf_counter()
            fn()
            sync()
            return (time.perf_counter() - start) * 1e3
        except Exception as exc:
            if errors is None:
                raise
            errors[name] = f"{stage}: {one_line(exc)}"
            del fns[name], samples[name]
            return None

    for _ in range(warmup):
        for name, fn in list(fns.items()):
            call(name, fn, "warm-up")
    for _ in range(repeats):
        for name, fn in list(fns.items()):
            ms = call(name, fn, "timing")
            if ms is not None:
                samples[name].append(ms)
    return {name: stats(s) for name, s in samples.items() if s}


def fmt(st: dict | None) -> str:
    if st is None:
        return "-"
    return (f"{st['median_ms']:8.2f} [{st['p25_ms']:.2f}-{st['p75_ms']:.2f}] "
            f"({st['min_ms']:.2f}-{st['max_ms']:.2f})")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


