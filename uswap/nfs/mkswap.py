"""`uswap mkswap nfs://...`: create a store on an NFS server, written in full.

As for a local store (uswap.store.mkswap): the file is built under a
temporary name with FILE_SYNC writes of real zeros (no holes: the server
allocates every block) and renamed into place only when complete, so a
failure leaves the target as it was.  An existing target is replaced only if
it is an idle uswap store, or with ``force``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import time
import uuid

import trio

from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.nfs.connection import NfsConnection
from uswap.nfs.lock import read_lock
from uswap.nfs import DEFAULT_TIMEOUT
from uswap.nfs.store import check_store_file, read_at, stat
from uswap.nfs.url import NfsUrl
from uswap.store.header import StoreHeader
from uswap.store.lock import StoreError
from uswap.store.mkswap import _version, validate_geometry
from uswap._nfs import lib

CHUNK = 1 << 20   # bytes per WRITE while filling (ganesha's and libnfs's largest)


async def mkswap_nfs(url: str, size: int, *, page_size: int = PAGE_SIZE, force: bool = False,
                     progress=None, timeout: float = DEFAULT_TIMEOUT) -> StoreHeader:
    slots = validate_geometry(size, page_size)
    target = NfsUrl.parse(url)
    conn = await NfsConnection.connect(target, timeout=timeout, file_flags=None)
    try:
        await _refuse_existing(conn, target, force)
        header = StoreHeader(page_size=page_size, slot_count=slots, uuid=uuid.uuid4(), created=int(time.time()),
                             host=socket.gethostname(), created_by=_version())
        tmp = dataclasses.replace(target, file=f"{target.file}.mkswap-{os.getpid()}")
        req = await conn.request(lambda ctx, fh, r: lib.uswap_nfs_create(
            ctx, tmp.file.encode(), os.O_RDWR | os.O_EXCL, 0o600, r), f"create {tmp.file}")
        await conn.close_handle(req.fh, conn.generation)
        try:
            await _fill(tmp, header, progress, timeout)
            await conn.request(lambda ctx, fh, r: lib.uswap_nfs_rename(
                ctx, tmp.file.encode(), target.file.encode(), r), f"rename to {target.file}")
        except BaseException:
            with trio.CancelScope(shield=True):   # Ctrl-C too: leave nothing behind if the server lets us
                try:
                    await conn.request(lambda ctx, fh, r: lib.uswap_nfs_unlink(ctx, tmp.file.encode(), r),
                                       f"unlink {tmp.file}")
                except OSError:
                    pass
            raise
        return header
    finally:
        conn.close()


async def _refuse_existing(conn: NfsConnection, url: NfsUrl, force: bool) -> None:
    try:
        await stat(conn, url.file)
    except FileNotFoundError:
        return
    holder = await read_lock(conn, url)
    if holder:
        raise StoreError(errno.EBUSY, f"store is in use by {holder}", url.url)
    if force:
        return
    probe = await NfsConnection.connect(url, timeout=conn.timeout, file_flags=os.O_RDONLY)
    try:
        report = await check_store_file(probe, url)
    finally:
        probe.close()
    if report.header is None:
        raise StoreError(errno.EEXIST, "exists and is not a uswap store; use --force to overwrite it", url.url)


async def _fill(tmp: NfsUrl, header: StoreHeader, progress, timeout: float) -> None:
    """Header page, then zeros to the end, as FILE_SYNC writes through a connection to the new file."""
    conn = await NfsConnection.connect(tmp, timeout=timeout, file_flags=os.O_RDWR | os.O_SYNC)
    try:
        buf = AlignedBuffer(CHUNK)
        buf.view[:] = bytes(CHUNK)
        buf.view[:header.page_size] = header.pack()
        total = header.file_size
        done = 0
        while done < total:
            n = min(CHUNK, total - done)
            req = await conn.request(lambda ctx, fh, r: lib.uswap_nfs_pwrite(ctx, fh, done, n, buf.ptr, r),
                                     f"write {n} bytes at {done}")
            if req.result != n:
                raise OSError(errno.EIO, f"short write at offset {done}: {req.result} of {n} bytes", tmp.url)
            if done == 0:
                buf.view[:header.page_size] = bytes(header.page_size)
            done += n
            if progress:
                progress(done, total)
        check = AlignedBuffer(PAGE_SIZE)
        await read_at(conn, 0, PAGE_SIZE, check.ptr)
        if bytes(check.view[:header.page_size]) != header.pack():
            raise OSError(errno.EIO, "the header page read back differs from what was written", tmp.url)
    finally:
        conn.close()
