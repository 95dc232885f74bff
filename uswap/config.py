"""The defaults the command line, the launchers and the service share, defined once.

``DEFAULTS`` is frozen: code reads it, nobody changes it at run time.  A
command-line flag overrides a field for one command; the systemd units pass
flags too (uswap/data/systemd).  The daemon's per-uid limits live with the
daemon (uswap.daemon.server.default_limits), the socket rule in the C client
(uswap.protocol.daemon_socket_path / default_socket_path).

Also here: where the installed package keeps what C programs and the service
need (headers, libuswap.so, data files), so that ``uswap config``, the bench's
workload build and the unit installer agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    # the store `uswap daemon` and `uswap demo` use (created if missing; its directory 0700)
    store: str = "/var/tmp/uswap/store"
    store_size: int = 1 << 30
    # the store `uswap mount` uses, and the size of each of its swap files
    fuse_store: str = "/var/tmp/uswap/fuse.store"
    fuse_file_size: int = 1 << 30
    # the daemon's resident budget, slot I/O mode and swap-in window (measured: docs/BENCHMARKS.md)
    budget: int = 256 << 20
    io: str = "sync"
    readahead: int = 32
    # fault threads per region (each holds about 1 MiB of buffers).  Several pay for a client whose threads fault
    # at once (docs/BENCHMARKS.md "Fault threads"); the default stays 1 until they have run as long as one has:
    # the bounded look at a thread's readahead ring (AHEAD_LOOK_MS in uswap_engine.c) ended a hang of 2 hog runs
    # in 8 at 4 threads on 2026-12-07, which 16 runs since have not shown again
    fault_threads: int = 1
    # the compressed pool (`uswap daemon --pool`): off, as zswap is until a user turns it on.  A store's pages
    # then go where they always went (an existing store and its users see the same I/O, counters and budget)
    # and one who wants it opts in, sizing it out of --resident (docs/DESIGN.md "Compressed pool").  lz4: the
    # fastest of the two the pool is built with (zstd compresses more, slower)
    pool: int = 0
    pool_compressor: str = "lz4"
    # the group whose members may use the daemon, when it exists (docs/SECURITY.md)
    group: str = "uswap"
    # launchers: how long a daemon may take to say READY=1, and to stop after SIGTERM
    # (it reads every swapped page back first: docs/DESIGN.md)
    start_timeout_s: float = 30.0
    stop_timeout_s: float = 60.0
    # the service: systemd's TimeoutStopSec, for the same read-back of a whole
    # store (README "As a service": measured rate, and how to size it)
    service_stop_timeout_s: int = 600
    # `uswap bench`: its store, swapfile and memcg work here
    bench_workdir: str = "/var/tmp/uswap-bench"


DEFAULTS = Defaults()

IO_MODES = ("sync", "async")

# -- where the installed package keeps things -------------------------------------------

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
INCLUDE_DIR = os.path.join(PACKAGE_DIR, "include")     # uswap.h
LIB_DIR = os.path.join(PACKAGE_DIR, "lib")             # libuswap.so (built with the package)
DATA_DIR = os.path.join(PACKAGE_DIR, "data")           # udev rule, systemd units


def c_client_flags(*, cflags: bool = True, libs: bool = True) -> list[str]:
    """Compiler and linker flags for a C program using uswap.h and libuswap.so
    (an rpath to this installation, so no LD_LIBRARY_PATH is needed)."""
    flags = []
    if cflags:
        flags.append(f"-I{INCLUDE_DIR}")
    if libs:
        flags += [f"-L{LIB_DIR}", f"-Wl,-rpath,{LIB_DIR}", "-luswap"]
    return flags


def cache_dir() -> str:
    """Per-user cache ($XDG_CACHE_HOME/uswap, else ~/.cache/uswap): what is built on first use."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "uswap")
