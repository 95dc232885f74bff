"""`uswap demo`: the main job on an embedded default.

Starts a daemon on the default store with a small resident budget, runs a
NumPy workload four times larger through it (fill, several rounds of writes to
one word per page, verify every word) with a progress display, prints the
daemon's status, and stops the daemon.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from uswap.daemon.process import DaemonProcess
from uswap.daemon.status import fetch_status, render_status
from uswap.units import format_size

CHUNK_WORDS = 1 << 20  # 8 MiB of the array per progress step
ROUNDS = 3


class Progress:
    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.2:
            return
        self.last = now
        text = f"{phase:<8} {100 * done // total:3d}%  ({format_size(done * 8)} of {format_size(total * 8)})"
        if self.tty:
            print(f"\r{text}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        elif done >= total:
            print(text, file=sys.stderr, flush=True)


def workload(region_buffer, words: int, progress: Progress) -> int:
    """Fill, update and verify; returns the number of mismatched words."""
    import numpy
    a = numpy.frombuffer(region_buffer, dtype=numpy.uint64)
    for start in range(0, words, CHUNK_WORDS):
        end = min(words, start + CHUNK_WORDS)
        a[start:end] = numpy.arange(start, end, dtype=numpy.uint64) * 0x9E3779B97F4A7C15
        progress.show("fill", end, words)
    for r in range(ROUNDS):
        for start in range(0, words, CHUNK_WORDS):
            end = min(words, start + CHUNK_WORDS)
            a[start:end:512] += 1
            progress.show(f"round {r + 1}", end, words)
    bad = 0
    for start in range(0, words, CHUNK_WORDS):
        end = min(words, start + CHUNK_WORDS)
        expect = numpy.arange(start, end, dtype=numpy.uint64) * 0x9E3779B97F4A7C15
        expect[::512] += ROUNDS
        bad += int((a[start:end] != expect).sum())
        progress.show("verify", end, words)
    del a
    return bad


def run_demo(*, store_path: str, budget: int, size: int | None = None) -> int:
    import uswap
    size = size or 4 * budget
    workdir = tempfile.mkdtemp(prefix="uswap-demo-")
    print(f"daemon: store {store_path}, resident budget {format_size(budget)}; "
          f"workload: {format_size(size)} ({size / budget:.0f}x the budget)", file=sys.stderr)
    try:
        with DaemonProcess(store_path, os.path.join(workdir, "uswap.sock"), os.path.join(workdir, "daemon.log"),
                           budget=budget) as daemon:
            t0 = time.perf_counter()
            with uswap.Region(size, socket=daemon.socket) as region:
                mismatches = workload(region.buffer, size // 8, Progress())
                status = fetch_status(daemon.socket)
            elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(render_status(status))
    d = status["daemon"]
    print(f"\n{format_size(size)} through a {format_size(budget)} budget in {elapsed:.1f} s: "
          f"pswpin {d['pswpin']}, pswpout {d['pswpout']}, {mismatches} mismatches")
    return 1 if mismatches else 0
