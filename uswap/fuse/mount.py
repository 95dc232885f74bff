"""Mounting the FUSE swap store and serving it (the CLI calls trio.run on run_mount).

The process that serves the mount is on the kernel's swap-out path: the
kernel writes dirty anonymous pages to the loop device, the loop device writes
to our file, FUSE hands the write to us.  If serving that write needed memory
that reclaim is trying to free, the machine would deadlock.  So, before the
mount exists:
  * mlockall(MCL_CURRENT | MCL_FUTURE): our pages are never reclaimed;
  * PR_SET_IO_FLUSHER: our allocations never recurse into I/O reclaim
    (PF_MEMALLOC_NOIO), as the kernel does for loop and nbd workers;
  * the I/O buffer is allocated once (1 MiB, the largest request we accept);
and the data path does not allocate beyond the bytes object pyfuse3 hands us
and the one a read returns, both bounded by the request size.
"""

from __future__ import annotations

import logging
import os
import subprocess

import pyfuse3
import trio

from uswap._core import lib
from uswap.child import uswap_argv
from uswap.daemon import notify
from uswap.fuse.mounts import FSNAME
from uswap.fuse.ops import SwapStoreOps
from uswap.store.base import StoreOptions
from uswap.store.opening import opened_store

log = logging.getLogger("uswap.fuse")



def prepare_process() -> None:
    """mlockall and PR_SET_IO_FLUSHER; a failure is a warning (not root)."""
    for name, ret in (("mlockall", lib.uswap_mlockall()), ("PR_SET_IO_FLUSHER", lib.uswap_set_io_flusher())):
        if ret < 0:
            log.warning("%s failed (errno %d): under memory pressure swap through this mount can deadlock",
                        name, -ret)


async def run_mount(store_spec: str, mountpoint: str, *, files: int, file_pages: int, ready_fd: int | None,
                    nfs_timeout: float, nfs_stable: str, encrypt: bool = True) -> None:
    """Open the store (a path or an nfs:// URL) and serve the mount until unmounted or signalled."""
    options = StoreOptions(encrypt=encrypt, nfs_timeout=nfs_timeout, nfs_stable=nfs_stable)
    async with opened_store(store_spec, options) as store:
        await serve_mount(SwapStoreOps(store, files=files, file_pages=file_pages), mountpoint, ready_fd)


async def serve_mount(ops: SwapStoreOps, mountpoint: str, ready_fd: int | None = None) -> None:
    options = set(pyfuse3.default_options)
    options |= {f"fsname={FSNAME}", "allow_other"}
    pyfuse3.init(ops, mountpoint, options)
    log.info("mounted %s on %s: %d file(s) of %d pages", ops.store.path, mountpoint, ops.files, ops.file_pages)
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    try:   # under systemd (Type=notify): the swapon unit ordered after this one may start now
        notify.ready(f"serving {ops.store.path} on {mountpoint}")
    except OSError as e:
        log.warning("%s: the supervisor may not know the mount is ready", e)
    try:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal():
                import signal
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def mount_in_background(mountpoint: str, options: list[str]) -> tuple[int, str]:
    """Like other FUSE mount commands: return once the mount is ready, keep serving.

    The serving process runs in its own session, logging to a file; it says
    "ready" through a pipe once the mount exists.  If it dies first, its log
    is the error message.
    """
    runtime = "/run/uswap" if os.geteuid() == 0 else (os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    os.makedirs(runtime, exist_ok=True)
    mountpoint = os.path.abspath(mountpoint)
    log_path = os.path.join(runtime, "mount" + mountpoint.replace("/", "-") + ".log")
    r, w = os.pipe()
    # cwd "/": the server outlives this command and must hold no directory busy (paths in
    # ``options`` are absolute); uswap_argv: the current directory cannot shadow the package
    with open(log_path, "w") as log:
        proc = subprocess.Popen(uswap_argv("mount", mountpoint, *options, "--foreground", "--ready-fd", str(w)),
                                pass_fds=[w], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                env={k: v for k, v in os.environ.items() if k != notify.ENV},  # it says ready here
                                start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        said = ready.read(6)
    if said != b"ready\n":
        proc.wait()
        with open(log_path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        raise OSError(f"mount failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc.pid, log_path
