"""argparse types shared by the benchmark scripts (no heavy imports: bench_voxelize's memory
child measures what it imports)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (repeats, threads)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0 (warm-up runs)."""
    return _int_at_least(text, 0)


def thread_counts(text: str) -> list[int]:
    """argparse type: comma-separated thread counts, each >= 1 (``"1,2"``)."""
    counts = [positive_int(part) for part in text.split(",") if part.strip()]
    if not counts:
        raise argparse.ArgumentTypeError(f"expected thread counts such as 1,2, got {text!r}")
    return counts


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
    return value
