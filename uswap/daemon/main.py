"""Setting the daemon up and running it until a signal (the CLI calls trio.run on run_daemon)."""

from __future__ import annotations

import logging
import signal

import trio

from uswap._core import lib
from uswap.daemon.server import Daemon
from uswap.store.opening import opened_store

log = logging.getLogger("uswap.daemon")


def lock_memory() -> None:
    """mlockall: the daemon is the swap path.  If its own pages could be
    swapped out (by kernel swap, or by being charged to a memcg under
    pressure), serving one fault could wait on another, and reclaim could wait
    on the memory it is trying to free."""
    ret = lib.uswap_mlockall()
    if ret < 0:
        log.warning("mlockall failed (errno %d): the daemon's memory can be swapped out; "
                    "raise RLIMIT_MEMLOCK or run as root", -ret)


async def run_daemon(*, store_spec: str, socket_path: str, budget: int, io_mode: str, readahead: int,
                     nfs_timeout: float, nfs_stable: str) -> None:
    """Open the store (a path or an nfs:// URL), serve until signalled, close the store."""
    async with opened_store(store_spec, nfs_timeout=nfs_timeout, nfs_stable=nfs_stable) as store:
        daemon = Daemon(store, socket_path, budget=budget, io_mode=io_mode, readahead=readahead)
        await serve_until_signalled(daemon)


async def serve_until_signalled(daemon: Daemon) -> None:
    """SIGTERM/SIGINT: stop gracefully (detach every region); a second one: stop now."""
    async with trio.open_nursery() as nursery:
        async def watch_signals():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if daemon.stopping:
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("%s: stopping", signal.Signals(signum).name)
                    daemon.request_stop()
        nursery.start_soon(watch_signals)
        await daemon.serve()
        nursery.cancel_scope.cancel()
