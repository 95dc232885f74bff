"""One user at a time for a store on an NFS server: a lock file next to it.

There is no flock through libnfs (it does not speak NLM), so the store FILE
has a lock file FILE.lock, created exclusively (NFSv3 CREATE, GUARDED) and
holding "HOST PID".  A lock whose process no longer exists on this host is
taken over (a daemon that was SIGKILLed); any other lock refuses the store.
Handles other than the store file's die with their connection, so the
requests on them are not retried across a reconnect.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import NamedTuple

from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.nfs.connection import NfsConnection
from uswap.nfs.url import NfsUrl
from uswap.store.lock import StoreError
from uswap._nfs import lib


class LockHolder(NamedTuple):
    host: str
    pid: int

    def __str__(self) -> str:
        return f"PID {self.pid} on {self.host}" if self.pid else "another process (its lock file is unreadable)"

    @property
    def gone(self) -> bool:
        """The holder was a process on this host that no longer exists."""
        if self.host != socket.gethostname() or not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def _lock_path(url: NfsUrl) -> bytes:
    return (url.file + ".lock").encode()


async def read_lock(conn: NfsConnection, url: NfsUrl) -> LockHolder | None:
    """Who holds the store's lock, or None if nobody does."""
    path = _lock_path(url)
    try:
        req = await conn.request(lambda ctx, _, r: lib.uswap_nfs_open(ctx, path, os.O_RDONLY, r), "open lock file")
    except FileNotFoundError:
        return None
    fh, opened = req.fh, conn.generation
    buf = AlignedBuffer(PAGE_SIZE)
    try:
        req = await conn.request(lambda ctx, _, r: lib.uswap_nfs_pread(ctx, fh, 0, 256, buf.ptr, r),
                                 "read lock file", retry=False)
        words = bytes(buf.view[:req.result]).decode(errors="replace").split()
    finally:
        await conn.close_handle(fh, opened)
    if len(words) == 2 and words[1].isdigit():
        return LockHolder(words[0], int(words[1]))
    return LockHolder("", 0)


async def take_lock(conn: NfsConnection, url: NfsUrl) -> None:
    """Create the lock file, or raise StoreError(EBUSY) naming its holder."""
    path = _lock_path(url)
    content = f"{socket.gethostname()} {os.getpid()}\n".encode()
    for _ in range(2):
        try:
            req = await conn.request(lambda ctx, _, r: lib.uswap_nfs_create(
                ctx, path, os.O_RDWR | os.O_EXCL | os.O_SYNC, 0o600, r), "create lock file")
        except FileExistsError:
            holder = await read_lock(conn, url)
            if holder and not holder.gone:
                raise StoreError(errno.EBUSY, f"store is in use by {holder}", url.url) from None
            await drop_lock(conn, url)   # stale
            continue
        fh, opened = req.fh, conn.generation
        buf = AlignedBuffer(PAGE_SIZE)
        buf.view[:len(content)] = content
        try:
            await conn.request(lambda ctx, _, r: lib.uswap_nfs_pwrite(ctx, fh, 0, len(content), buf.ptr, r),
                               "write lock file", retry=False)
        finally:
            await conn.close_handle(fh, opened)
        return
    raise StoreError(errno.EBUSY, "store is in use (its lock file came back at once)", url.url)


async def drop_lock(conn: NfsConnection, url: NfsUrl) -> None:
    path = _lock_path(url)
    await conn.request(lambda ctx, _, r: lib.uswap_nfs_unlink(ctx, path, r), "remove lock file")
