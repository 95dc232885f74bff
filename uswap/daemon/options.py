"""What the numeric options of `uswap daemon` and `uswap run` accept.

The command line checks every one of them before it makes anything (no directory, store, socket, lock or log
for a refused option: uswap.cli.cmd_daemon); each refusal is one line naming the option and the range.  The
ranges are what the daemon can serve, not taste:

- ``--resident``: at least one swap-in window of the engine's largest size (a fault's window must fit in the
  budget), at most the machine's physical memory (a budget above it bounds nothing);
- ``--readahead``: 1 (off) to the engine's largest window (csrc/daemon/uswap_engine.h USWAP_MAX_READAHEAD);
- ``--fault-threads``: 1 to the engine's most (csrc/daemon/uswap_engine.h USWAP_MAX_FAULT_THREADS); each thread of
  each region holds its buffers, io_uring rings and stack (about 1 MiB);
- timeouts: from 0.1 s to a day;
- per-uid counts: 0 or 1 (as the option's meaning needs) to fs.nr_open, the most fds a process may hold (each
  connection, region and run holds at least one of the daemon's);
- ``--user-max-size``: a page to the largest user address space;
- ``--pool``: 0 (off) or a page to half of ``--resident``: the compressed pool is paid for out of the budget
  (uswap.daemon.pool), so at most half of it, and the other half keeps room for the clients' pages;
- ``--pool-compressor``: one of the compressors the pool is built with (csrc/daemon/uswap_pool.h).
"""

from __future__ import annotations

import os

from uswap._core import lib
from uswap.core import PAGE_SIZE
from uswap.units import check_range, format_size_exact

MAX_READAHEAD = lib.USWAP_MAX_READAHEAD
MAX_FAULT_THREADS = lib.USWAP_MAX_FAULT_THREADS
MIN_BUDGET = MAX_READAHEAD * PAGE_SIZE
TIMEOUT_S = (0.1, 86400.0)
MAX_USER_ADDRESS = 1 << 57  # above any x86-64/arm64 user address space (5-level paging included)
POOL_COMPRESSORS = ("lz4", "zstd")   # what the pool is built with (uswap.daemon.pool maps them to the C enum)


def max_budget() -> int:
    """The machine's physical memory, rounded down to a whole MiB (a bound a user can type back)."""
    return (PAGE_SIZE * os.sysconf("SC_PHYS_PAGES")) >> 20 << 20


def max_count() -> int:
    """fs.nr_open: no process holds more fds, so no uid can hold more connections, regions or runs."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20      # the kernel's default


def resident(nbytes: int, option: str = "--resident") -> int:
    return check_range(option, nbytes, MIN_BUDGET, max_budget(), show=format_size_exact,
                       why="one readahead window to the physical memory")


def readahead(pages: int) -> int:
    return check_range("--readahead", pages, 1, MAX_READAHEAD, unit=" pages", why="1 is off; at most the engine's "
                       "largest window")


def fault_threads(n: int) -> int:
    return check_range("--fault-threads", n, 1, MAX_FAULT_THREADS, why="fault threads per region, at most the "
                       "engine's most")


def timeout(option: str, seconds: float) -> float:
    return check_range(option, seconds, *TIMEOUT_S, show=lambda s: f"{s:g}", unit=" seconds")


def count(option: str, n: int, low: int) -> int:
    return check_range(option, n, low, max_count(), why="at most fs.nr_open, the fds a process may hold")


def user_max_size(nbytes: int) -> int:
    return check_range("--user-max-size", nbytes, PAGE_SIZE, MAX_USER_ADDRESS, show=format_size_exact,
                       why="a page to the largest user address space")


def pool(nbytes: int, budget: int) -> int:
    """``--pool``: 0 (off), or from a page to half of ``--resident`` (``budget``, checked first)."""
    if nbytes == 0:
        return 0
    if not PAGE_SIZE <= nbytes <= budget // 2:
        raise ValueError(f"--pool {format_size_exact(nbytes)} is out of range: give 0 (off) or "
                         f"{format_size_exact(PAGE_SIZE)} to {format_size_exact(budget // 2)} (at most half of "
                         f"--resident {format_size_exact(budget)}: the pool is paid for out of the budget, and the "
                         f"rest keeps room for pages)")
    return nbytes


def pool_compressor(name: str) -> str:
    if name not in POOL_COMPRESSORS:
        raise ValueError(f"--pool-compressor {name!r}: give {' or '.join(POOL_COMPRESSORS)}")
    return name
