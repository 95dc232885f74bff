"""A store file on an NFS server, reached through libnfs: no kernel NFS client needed.

The same layout as a local store (uswap.store.header): header page, then
slot N at offset (N + 1) * page_size, each slot through the store's slot codec
(uswap.store.checksums: sealed with AES-256-GCM by default, or crc32c only), so
the server holds only ciphertext and never hands back wrong data.

Stable writes.  A slot counts as written only once the server has it on
stable storage, as the kernel's swap-over-NFS writes do.  ``file_sync``
(the default) sends every WRITE as FILE_SYNC; ``commit`` sends an UNSTABLE
WRITE and a COMMIT for each run of slots.  libnfs 4.0 does not compare write
verifiers, so with ``commit`` a failure anywhere in write + commit sends the
write again, never only the commit (csrc/nfs/uswap_nfs_io.h).  docs/BENCHMARKS.md has both measured.

One user at a time: a lock file next to the store (uswap.nfs.lock).
"""

from __future__ import annotations

import errno
import os

import trio

from uswap._core import ffi as core_ffi, lib as core_lib
from uswap.core import PAGE_SIZE, AlignedBuffer, check
from uswap.nfs import DEFAULT_TIMEOUT, STABLE_MODES
from uswap.nfs.connection import NfsConnection
from uswap.nfs.lock import drop_lock, read_lock, take_lock
from uswap.nfs.url import NfsUrl
from uswap.store.checks import CheckReport, check_header_page, check_nfs_allocation
from uswap.store.header import StoreHeader
from uswap.store.base import SlotIO, Store, StoreOptions
from uswap.store.lock import StoreUnusable
from uswap.store.sealing import slot_codec
from uswap.store.swapfile import read_slots_through_c, slot_span
from uswap._nfs import ffi, lib


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

STATES = {lib.USWAP_NFS_DOWN: "down", lib.USWAP_NFS_UP: "up", lib.USWAP_NFS_CONNECTING: "connecting"}
_PREAD = "int64_t (*)(void *, void *, uint64_t, uint64_t)"
_PWRITE = "int64_t (*)(void *, const void *, uint64_t, uint64_t)"
_UP = "int (*)(void *)"


def _for_core(ctype: str, pointer):
    """A pointer of uswap._nfs as the core's ffi types it (two cffi modules: one address, two types)."""
    return core_ffi.cast(ctype, int(ffi.cast("uintptr_t", pointer)))


class NfsStore(Store):
    """A checked, locked store on an NFS server.  Use :meth:`open`, then ``await aclose()``.

    Two connections to the server, one per side:
      - Python's (uswap.nfs.connection, trio): the lock file, the activation checks, and the unlock at close.
      - C's (csrc/nfs/uswap_nfs_io.h, a service thread of its own): every slot read and write.  The store's
        codec view (``codec_c``) names it as its remote store, so the fault engines, writeback, the pool and
        the slot I/O here (uswap.store.slot_io.RemoteSlotIO: worker threads) all read and write through it,
        with the same codec, error policy and reconnects.
    The store file is opened on both; NFSv3 is stateless, so which connection wrote a slot does not matter
    to a read on the other (no client cache: libnfs has none)."""

    fd = -1   # no local fd (uswap.store.swapfile.read_slots_through_c: the codec's remote store instead)

    def __init__(self, conn: NfsConnection, url: NfsUrl, header: StoreHeader, report: CheckReport, stable: str,
                 io, *, encrypt: bool = True, own_codec: bool = True):
        self.conn = conn
        self.url = url
        self.path = url.url
        self.header = header
        self.report = report
        self.stable = stable
        self.page_size = header.page_size
        self.slot_count = header.slot_count
        self.codec = slot_codec(self.path, self.slot_count if own_codec else 0, self.page_size, encrypt=encrypt)
        self.io = io                    # struct uswap_nfs_io *: closed by aclose, after everything using it
        self.codec_c = self.codec.c_view()
        self.codec_c.remote = _for_core("void *", io)
        self.codec_c.remote_pread = _for_core(_PREAD, ffi.addressof(lib, "uswap_nfs_io_pread"))
        self.codec_c.remote_pwrite = _for_core(_PWRITE, ffi.addressof(lib, "uswap_nfs_io_pwrite"))
        self.remote_up = _for_core(_UP, ffi.addressof(lib, "uswap_nfs_io_up"))
        self._stats = ffi.new("struct uswap_nfs_io_stats *")

    @classmethod
    async def open(cls, url: str, *, timeout: float = DEFAULT_TIMEOUT, stable: str = "file_sync",
                   encrypt: bool = True, own_codec: bool = True) -> "NfsStore":
        if stable not in STABLE_MODES:
            raise ValueError(f"unknown stable-write mode {stable!r} ({' or '.join(STABLE_MODES)})")
        nfs_url = NfsUrl.parse(url)
        flags = os.O_RDWR | (os.O_SYNC if stable == "file_sync" else 0)   # what the C side opens: its errors here
        conn = await NfsConnection.connect(nfs_url, timeout=timeout, file_flags=flags)
        try:
            await take_lock(conn, nfs_url)
            try:
                report = await check_store_file(conn, nfs_url)
                if not report.usable:
                    raise StoreUnusable(report)
                io = await trio.to_thread.run_sync(open_io, nfs_url, conn.address, stable, timeout)
                return cls(conn, nfs_url, report.header, report, stable, io, encrypt=encrypt, own_codec=own_codec)
            except BaseException:
                await drop_lock(conn, nfs_url)
                raise
        except BaseException:
            conn.close()
            raise

    async def aclose(self) -> None:
        io, self.io = self.io, None
        if io is not None:
            lib.uswap_nfs_io_close(io)
        self.codec.close()
        try:
            await drop_lock(self.conn, self.url)
        finally:
            self.conn.close()

    @classmethod
    async def open_for_use(cls, spec: str, options: StoreOptions) -> "NfsStore":
        return await cls.open(spec, timeout=options.nfs_timeout, stable=options.nfs_stable, encrypt=options.encrypt,
                              own_codec=options.own_codec)

    @property
    def local_fd(self) -> int:
        return -1   # the engines read through the codec view's remote store

    def slot_io(self, mode: str) -> SlotIO:
        """Worker threads whatever the mode: every transfer waits on the network."""
        from uswap.store.slot_io import RemoteSlotIO
        return RemoteSlotIO(self)

    def write_slots(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """As uswap.store.swapfile.SwapStore.write_slots, through the C connection (blocking: a worker thread's)."""
        slot_span(self.header, first, count, buf, buf_page)
        check(core_lib.uswap_pool_write_slots(self.codec_c, -1, buf.ptr + buf_page * self.page_size, first, count,
                                              core_ffi.NULL), self.path)

    def read_slots(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """As uswap.store.swapfile.SwapStore.read_slots, through the C connection (blocking: a worker thread's)."""
        slot_span(self.header, first, count, buf, buf_page)
        read_slots_through_c(self, first, count, buf.ptr + buf_page * self.page_size)

    def nfs_status(self) -> dict:
        """The data connection's state and counters (uswap_nfs_io_stats)."""
        s = self._stats
        lib.uswap_nfs_io_stats(self.io, s)
        return {"server": self.url.server, "state": STATES.get(s.state, "down"), "since": s.since,
                "connects": s.connects, "retries": s.retries, "most_in_flight": s.most_in_flight,
                "reads": s.reads, "writes": s.writes, "commits": s.commits, "read_bytes": s.read_bytes,
                "write_bytes": s.write_bytes, "last_error": ffi.string(s.last_error).decode(errors="replace")}

    def status(self, slots=None) -> dict:
        """Entries for `uswap status` (a daemon's, or a FUSE mount's .status)."""
        return {"encryption": self.codec.encryption,
                "nfs": {"stable": self.stable, "timeout_s": self.conn.timeout, **self.nfs_status()}}


def open_io(url: NfsUrl, address: str, stable: str, timeout: float):
    """The C data connection (blocking: connect, MOUNT, open).  OSError in one line if it cannot be made."""
    out = ffi.new("struct uswap_nfs_io **")
    err = ffi.new("char[200]")
    ret = lib.uswap_nfs_io_open(url.libnfs_url(address).encode(), address.encode(), url.export.encode(),
                                url.file.encode(), int(stable == "commit"), int(timeout * 1000), out, err,
                                len(err))
    if ret < 0:
        raise OSError(-ret, ffi.string(err).decode(errors="replace") or os.strerror(-ret), url.url)
    return out[0]
