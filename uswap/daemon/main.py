"""Setting the daemon up and running it until a signal (the CLI calls trio.run on run_daemon)."""

from __future__ import annotations

import logging
import resource
import signal
import threading

import trio

from uswap._core import lib
from uswap.config import DEFAULTS
from uswap.core import PAGE_SIZE
from uswap.daemon import notify
from uswap.daemon.limits import UserLimits
from uswap.daemon.pool import PoolOptions
from uswap.daemon.runpolicy import DEFAULT_MAX_RUN_PROCESSES, DEFAULT_MAX_RUNS, RunPolicy, max_run_processes
from uswap.daemon.server import Daemon, default_limits
from uswap.store.base import StoreOptions
from uswap.store.opening import opened_stores
from uswap.store.storeset import StoreSpec

log = logging.getLogger("uswap.daemon")
WORKER_STACK = 1 << 20   # bytes: a Python worker thread's stack (Python frames live on the heap)


def lock_memory() -> None:
    """mlockall: the daemon is the swap path.  If its own pages could be
    swapped out (by kernel swap, or by being charged to a memcg under
    pressure), serving one fault could wait on another, and reclaim could wait
    on the memory it is trying to free."""
    ret = lib.uswap_mlockall()
    if ret < 0:
        log.warning("mlockall failed (errno %d): the daemon's memory can be swapped out; "
                    "raise RLIMIT_MEMLOCK or run as root", -ret)


def harden_process() -> None:
    """Swapped pages pass through this process: no core dumps, no ptrace or
    /proc/PID/mem for anyone but root (PR_SET_DUMPABLE 0); and as many fds as
    the hard limit allows (each client costs up to three), so that per-uid
    limits, not RLIMIT_NOFILE, decide who is refused."""
    ret = lib.uswap_set_undumpable()
    if ret < 0:
        log.warning("PR_SET_DUMPABLE failed (errno %d): the daemon can be dumped", -ret)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def user_limits(slot_count: int, *, max_size: int | None, max_regions: int, max_connections: int) -> UserLimits:
    """The per-uid limits from the command line; ``max_size`` None is half the store."""
    base = default_limits(slot_count)
    pages = base.max_pages if max_size is None else max_size // PAGE_SIZE
    return UserLimits(max_pages=pages, max_regions=max_regions, max_connections=max_connections,
                      exempt_uid=base.exempt_uid)


def run_policy(users: frozenset[int] | None, max_runs: int,
               max_processes: int = DEFAULT_MAX_RUN_PROCESSES) -> RunPolicy:
    """Who may start runs (--run-users; None: the default), how many processes each (--user-max-runs) and
    all together (--max-run-processes, lowered to what RLIMIT_NOFILE allows: runpolicy.max_run_processes)."""
    default = RunPolicy.default()
    processes = max_run_processes(max_processes, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if processes < max_processes:
        log.info("run processes: at most %d (half of RLIMIT_NOFILE %d, not --max-run-processes %d)", processes,
                 resource.getrlimit(resource.RLIMIT_NOFILE)[0], max_processes)
    return RunPolicy(default.users if users is None else users, max_runs, exempt_uid=default.exempt_uid,
                     max_processes=processes)


async def run_daemon(*, store_specs: list[StoreSpec], socket_path: str, budget: int, io_mode: str, readahead: int,
                     fault_threads: int = DEFAULTS.fault_threads,
                     nfs_timeout: float, nfs_stable: str, group: int | None = None, user_max_size: int | None = None,
                     user_max_regions: int = 64, user_max_connections: int = 64, map_timeout: float = 10.0,
                     encrypt: bool = True, writeback_batch: int | None = None,
                     run_users: frozenset[int] | None = None, user_max_runs: int = DEFAULT_MAX_RUNS,
                     max_run_processes: int = DEFAULT_MAX_RUN_PROCESSES, pool: PoolOptions | None = None,
                     copies: int = 1) -> None:
    """Open the store (a path or an nfs:// URL; several: a store set), serve until signalled, close the store.
    With ``pool``, the compressed pool lives from after the store opened until everything that used it
    stopped."""
    # Worker threads (trio.to_thread: async and remote slot I/O, blocking opens) run C calls only; the daemon is
    # mlockall'd, so each thread's stack would be resident whole at the default size (8 MiB).
    threading.stack_size(WORKER_STACK)
    options = StoreOptions(encrypt=encrypt, nfs_timeout=nfs_timeout, nfs_stable=nfs_stable, copies=copies)
    async with opened_stores(store_specs, options) as store:
        limits = user_limits(store.slot_count, max_size=user_max_size, max_regions=user_max_regions,
                             max_connections=user_max_connections)
        daemon = Daemon(store, socket_path, budget=budget, io_mode=io_mode, readahead=readahead,
                        fault_threads=fault_threads, group=group,
                        limits=limits, map_timeout=map_timeout, batch=writeback_batch,
                        run_policy=run_policy(run_users, user_max_runs, max_run_processes), pool=pool)
        try:
            await serve_until_signalled(daemon)
        finally:
            daemon.close_pool()     # serve returned: no region, run or writeback uses it any more


async def serve_until_signalled(daemon: Daemon) -> None:
    """SIGTERM/SIGINT: stop gracefully (detach every region); a second one: stop now.

    The supervisor ($NOTIFY_SOCKET: systemd, or uswap.daemon.process) hears
    READY=1 once the socket is bound and listening, and STOPPING=1 when a stop begins."""
    async with trio.open_nursery() as nursery:
        async def watch_signals():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if daemon.stopping:
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("%s: stopping", signal.Signals(signum).name)
                    _tell_supervisor(notify.stopping, "stopping: reading every swapped page back")
                    daemon.request_stop()

        async def serve_then_stop(task_status=trio.TASK_STATUS_IGNORED):
            await daemon.serve(task_status=task_status)
            nursery.cancel_scope.cancel()
        nursery.start_soon(watch_signals)
        await nursery.start(serve_then_stop)
        _tell_supervisor(notify.ready, f"serving {daemon.store.path} on {daemon.socket_path}")


def _tell_supervisor(send, status: str) -> None:
    try:
        send(status)
    except OSError as e:
        log.warning("%s: the supervisor may not know we are %s", e, status.split(":")[0])
