"""A store file on an NFS server, reached through libnfs: no kernel NFS client needed.

The same layout as a local store (uswap.store.header): header page, then
slot N at offset (N + 1) * page_size, each slot through the store's slot codec
(uswap.store.checksums: sealed with AES-256-GCM by default, or crc32c only), so
the server holds only ciphertext and never hands back wrong data.

Stable writes.  A slot counts as written only once the server has it on
stable storage, as the kernel's swap-over-NFS writes do.  ``file_sync``
(the default) sends every WRITE as FILE_SYNC; ``commit`` sends UNSTABLE
WRITEs and a COMMIT after each batch.  libnfs 4.0 does not compare write
verifiers, so with ``commit`` a failure anywhere in write + commit sends the
write again, never only the commit.  docs/BENCHMARKS.md has both measured.

One user at a time: a lock file next to the store (uswap.nfs.lock).
"""

from __future__ import annotations

import errno
import os

from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.nfs import DEFAULT_TIMEOUT, STABLE_MODES
from uswap.nfs.connection import NfsConnection
from uswap.nfs.lock import drop_lock, read_lock, take_lock
from uswap.nfs.url import NfsUrl
from uswap.store.checks import CheckReport, check_header_page, check_nfs_allocation
from uswap.store.header import StoreHeader
from uswap.store.base import SlotIO, Store, StoreOptions
from uswap.store.lock import StoreUnusable
from uswap.store.sealing import slot_codec
from uswap.store.swapfile import slot_span
from uswap._nfs import lib


async def stat(conn: NfsConnection, path: str):
    return await conn.request(lambda ctx, fh, req: lib.uswap_nfs_stat(ctx, path.encode(), req), f"stat {path}")


async def read_at(conn: NfsConnection, offset: int, count: int, ptr) -> None:
    """Read from the connection's store file."""
    req = await conn.request(lambda ctx, fh, r: lib.uswap_nfs_pread(ctx, fh, offset, count, ptr, r),
                             f"read {count} bytes at {offset}")
    if req.result != count:
        raise OSError(errno.EIO, f"short read at offset {offset}: {req.result} of {count} bytes", conn.url.url)


async def check_store_file(conn: NfsConnection, url: NfsUrl) -> CheckReport:
    """The activation checks that apply over NFS: allocation (as nfs_swap_activate) and the header."""
    report = CheckReport(url.url, fs_name="nfs")
    st = await stat(conn, url.file)
    report.size = st.size
    report.note("filesystem", f"NFSv3 server {url.server}, export {url.export}, through libnfs "
                              "(uswap's userspace client; no kernel NFS mount)")
    check_nfs_allocation(report, st.used)
    n = min(PAGE_SIZE, st.size)
    buf = AlignedBuffer(PAGE_SIZE)
    if n:
        await read_at(conn, 0, n, buf.ptr)
    check_header_page(report, bytes(buf.view[:n]), PAGE_SIZE)
    return report


async def check_nfs_store(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> CheckReport:
    """`uswap check nfs://...`: the activation checks that apply over NFS, and the lock."""
    nfs_url = NfsUrl.parse(url)
    conn = await NfsConnection.connect(nfs_url, timeout=timeout, file_flags=os.O_RDONLY)
    try:
        report = await check_store_file(conn, nfs_url)
        holder = await read_lock(conn, nfs_url)
        if holder:
            report.refuse("file", f"in use by {holder}")
        return report
    finally:
        conn.close()


# -- the open store ----------------------------------------------------------------

class NfsStore(Store, SlotIO):
    """A checked, locked store on an NFS server.  Use :meth:`open`, then ``await aclose()``.

    It is its own slot I/O, whatever the mode: its reads and writes are
    asynchronous by nature (libnfs on the event loop, several in flight)."""

    mode = "nfs"

    def __init__(self, conn: NfsConnection, url: NfsUrl, header: StoreHeader, report: CheckReport, stable: str,
                 *, encrypt: bool = True):
        self.conn = conn
        self.url = url
        self.path = url.url
        self.header = header
        self.report = report
        self.stable = stable
        self.page_size = header.page_size
        self.slot_count = header.slot_count
        self.codec = slot_codec(self.path, self.slot_count, self.page_size, encrypt=encrypt)
        self.write_ios = 0

    @classmethod
    async def open(cls, url: str, *, timeout: float = DEFAULT_TIMEOUT, stable: str = "file_sync",
                   encrypt: bool = True) -> "NfsStore":
        if stable not in STABLE_MODES:
            raise ValueError(f"unknown stable-write mode {stable!r} ({' or '.join(STABLE_MODES)})")
        nfs_url = NfsUrl.parse(url)
        flags = os.O_RDWR | (os.O_SYNC if stable == "file_sync" else 0)   # O_SYNC: libnfs sends FILE_SYNC
        conn = await NfsConnection.connect(nfs_url, timeout=timeout, file_flags=flags)
        try:
            await take_lock(conn, nfs_url)
            try:
                report = await check_store_file(conn, nfs_url)
                if not report.usable:
                    raise StoreUnusable(report)
                return cls(conn, nfs_url, report.header, report, stable, encrypt=encrypt)
            except BaseException:
                await drop_lock(conn, nfs_url)
                raise
        except BaseException:
            conn.close()
            raise

    async def aclose(self) -> None:
        self.codec.close()
        try:
            await drop_lock(self.conn, self.url)
        finally:
            self.conn.close()

    async def write(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        offset, length = slot_span(self.header, first, count, buf, buf_page)
        ptr = buf.ptr + buf_page * self.page_size
        self.codec.encode(first, count, ptr)   # sealed in place: a resend or a second WRITE sends the same bytes
        await self._write(offset, length, ptr)
        if self.stable == "commit":
            await self._commit(offset, length, ptr)
        self.codec.written(first, count)

    @classmethod
    async def open_for_use(cls, spec: str, options: StoreOptions) -> "NfsStore":
        return await cls.open(spec, timeout=options.nfs_timeout, stable=options.nfs_stable, encrypt=options.encrypt)

    @property
    def local_fd(self) -> int:
        return -1   # no local fd: the fault engine forwards every fault to Python

    def slot_io(self, mode: str) -> SlotIO:
        return self

    async def write_batch(self, buf: AlignedBuffer, slots, count: int) -> None:
        """A reclaim batch (the slot I/O interface, uswap.store.base.SlotIO): buffer page i to
        slot ``slots[i]`` (-1: not written), one WRITE per run of contiguous slots."""
        i = 0
        while i < count:
            n = 1
            while slots[i] >= 0 and i + n < count and slots[i + n] == slots[i] + n:
                n += 1
            if slots[i] >= 0:
                await self.write(slots[i], n, buf, i)
                self.write_ios += 1
            i += n

    async def _write(self, offset: int, length: int, ptr) -> None:
        req = await self.conn.request(lambda ctx, fh, r: lib.uswap_nfs_pwrite(ctx, fh, offset, length, ptr, r),
                                      f"write {length} bytes at {offset}")
        if req.result != length:
            raise OSError(errno.EIO, f"short write at offset {offset}: {req.result} of {length} bytes", self.path)

    async def _commit(self, offset: int, length: int, ptr) -> None:
        """COMMIT; a COMMIT answered on another connection than the WRITE (the server
        may have restarted in between, losing the unstable data) sends the WRITE again."""
        while True:
            connection = self.conn.generation
            await self.conn.request(lambda ctx, fh, r: lib.uswap_nfs_fsync(ctx, fh, r), "commit")
            if self.conn.generation == connection:
                return
            self.conn.server.retries += 1
            await self._write(offset, length, ptr)

    async def read(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        offset, length = slot_span(self.header, first, count, buf, buf_page)
        self.codec.require_written(first, count)
        ptr = buf.ptr + buf_page * self.page_size
        await read_at(self.conn, offset, length, ptr)
        self.codec.decode(first, count, ptr)

    def status(self) -> dict:
        """Entries for `uswap status` (a daemon's, or a FUSE mount's .status)."""
        return {"encryption": self.codec.encryption,
                "nfs": {"stable": self.stable, "timeout_s": self.conn.timeout, **vars(self.conn.server)}}
