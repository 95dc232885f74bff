"""The daemon: a Unix socket, one connection per client region, one store.

Structure (trio): the daemon's nursery runs the accept loop and the
reclaimer; each connection gets its own nursery running its region's fault
loop, so a client's departure, however abrupt, cancels exactly its tasks and
releases exactly its region.  One client can never name another's region:
a region *is* its connection.

Shutdown (SIGTERM/SIGINT): stop accepting, stop reclaim, then for each region
read every swapped page back into its memfd ("swapoff"), tell the client it
is detached (it unregisters its userfaultfd range and keeps plain shared
memory, all data in place), and close.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import asdict, dataclass

import trio

from uswap._core import lib
from uswap.core import PAGE_SIZE, AlignedBuffer, check
from uswap.daemon.reclaim import Reclaimer
from uswap.daemon.region import SWAPPED, Region
from uswap.daemon.slot_io import slot_io
from uswap.daemon.slots import SlotAllocator
from uswap.protocol import (MAX_PACKET, OP_DETACH, OP_MAP, OP_STATUS, OP_UNMAP, ProtocolError, Reply,
                            Request)
from uswap.store.swapfile import SwapStore
from uswap.uffd import Userfaultfd

log = logging.getLogger("uswap.daemon")

_PEERCRED = struct.Struct("3i")


@dataclass
class DaemonStats:
    pswpin: int = 0
    pswpout: int = 0
    read_errors: int = 0
    write_errors: int = 0
    writeback_waits: int = 0


class SocketInUse(OSError):
    pass


class Daemon:
    def __init__(self, store: SwapStore, socket_path: str, *, budget: int, io_mode: str = "sync",
                 readahead: int = 8, batch: int = 32):
        if budget < PAGE_SIZE:
            raise ValueError(f"resident budget {budget} is smaller than one page")
        self.store = store
        self.socket_path = socket_path
        self.budget = budget
        self.readahead = max(1, readahead)
        self.io = slot_io(io_mode, store)
        self.slots = SlotAllocator(store.slot_count)
        self.reclaimer = Reclaimer(self, budget // PAGE_SIZE, batch=batch)
        self.stats = DaemonStats()
        self.regions: dict[int, Region] = {}
        self.mapped_pages = 0
        self.nursery: trio.Nursery | None = None
        self._next_id = 1
        self._log_times: dict[str, tuple[float, int]] = {}
        self._stopping = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._reclaim_scope = trio.CancelScope()
        self._reclaim_ended = trio.Event()
        self.started = time.time()

    # -- services for regions -----------------------------------------------

    def release_slot(self, slot: int) -> None:
        if slot >= 0:
            self.slots.free(slot)
            self.store.discard_slots(slot, 1)

    def note_read_error(self, region: Region, error: OSError, slot: int, attempt: int) -> None:
        self.stats.read_errors += 1
        self.log_limited("read", logging.ERROR, "region %d: read of slot %d (offset %d) failed, attempt %d: %s",
                         region.id, slot, (slot + 1) * PAGE_SIZE, attempt, error)

    def log_limited(self, key: str, level: int, msg: str, *args) -> None:
        """At most one line a second per kind, saying how many were held back."""
        now = time.monotonic()
        last, held = self._log_times.get(key, (0.0, 0))
        if now - last < 1.0:
            self._log_times[key] = (last, held + 1)
            return
        if held:
            msg += f" ({held} similar message(s) suppressed)"
        self._log_times[key] = (now, 0)
        log.log(level, msg, *args)

    # -- the socket ------------------------------------------------------------

    def bind(self) -> trio.socket.SocketType:
        """Bind the listening socket; refuse a path a live daemon answers on."""
        os.makedirs(os.path.dirname(self.socket_path) or ".", mode=0o755, exist_ok=True)
        if os.path.lexists(self.socket_path):
            if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                raise SocketInUse(errno.EEXIST, "exists and is not a socket", self.socket_path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(self.socket_path)
            except ConnectionRefusedError:
                os.unlink(self.socket_path)  # stale: its daemon is gone
            else:
                raise SocketInUse(errno.EADDRINUSE, "another uswap daemon is listening here", self.socket_path)
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock._sock.bind(self.socket_path)
        # Any local user may map regions: they bring their own memory.
        os.chmod(self.socket_path, 0o666)
        sock.listen(64)
        return sock

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`request_stop`, then detach every region and return."""
        listener = self.bind()
        log.info("serving %s on %s: budget %d pages, %s I/O, readahead %d", self.store.path, self.socket_path,
                 self.budget // PAGE_SIZE, self.io.mode, self.readahead)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._reclaim)
                nursery.start_soon(self._accept, listener)
                task_status.started()
                await self._stopping.wait()
                log.info("stopping: no new regions; reading %d region(s) back", len(self.regions))
                self._accept_scope.cancel()
                self._reclaim_scope.cancel()
                await self._reclaim_ended.wait()   # no writeback may end (and drop pages) during swapoff
                await self.detach_all()
                nursery.cancel_scope.cancel()
        finally:
            listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _accept(self, listener) -> None:
        with self._accept_scope:
            while True:
                conn, _ = await listener.accept()
                self.nursery.start_soon(self._connection, conn)

    async def _reclaim(self) -> None:
        try:
            with self._reclaim_scope:
                await self.reclaimer.run()
        finally:
            self._reclaim_ended.set()

    # -- one connection, one region ---------------------------------------------------

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        region = None
        with conn:
            try:
                async with trio.open_nursery() as nursery:
                    region = await self._converse(conn, nursery, pid, uid)
                    nursery.cancel_scope.cancel()
            finally:
                if region is not None and region.id in self.regions:
                    self._drop(region)

    async def _converse(self, conn, nursery, pid: int, uid: int) -> Region | None:
        """Answer requests until the peer hangs up or unmaps; returns its region."""
        region = None
        while True:
            try:
                packet, fds = await self._recv(conn)
            except OSError:
                return region
            if not packet and not fds:
                return region  # EOF: the client closed or died
            op = 0
            try:
                req = Request.unpack(packet)
                op = req.op
                if req.op == OP_MAP:
                    if region is not None:
                        raise ProtocolError("this connection already has a region", errno.EBUSY)
                    uffd_fd, memfd = self._take_fds(fds, 2)
                    fds = []
                    region = self._map(req, uffd_fd, memfd, pid, uid)
                    region.conn = conn
                    nursery.start_soon(self._serve_region, region, nursery.cancel_scope)
                    reply = Reply(op, 0, region.id)
                elif req.op == OP_UNMAP:
                    if region is None:
                        raise ProtocolError("no region on this connection", errno.EINVAL)
                    self._drop(region)
                    await conn.send(Reply(op, 0, region.id).pack())
                    return region
                elif req.op == OP_STATUS:
                    reply = Reply(op, 0, 0, json.dumps(self.status()))
                else:
                    raise ProtocolError(f"operation {req.op} is not a request", errno.EOPNOTSUPP)
            except ProtocolError as e:
                log.warning("client pid %d: %s", pid, e)
                reply = Reply(op, e.errno, 0, str(e))
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                await conn.send(reply.pack())
            except OSError:
                return region

    async def _recv(self, conn) -> tuple[bytes, list[int]]:
        cmsg_space = socket.CMSG_SPACE(4 * _INT.size)
        data, ancdata, flags, _ = await conn.recvmsg(MAX_PACKET, cmsg_space)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _INT.size
                fds.extend(array.array("i", payload[:usable]))
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("message or file descriptors truncated")
        return data, fds

    @staticmethod
    def _take_fds(fds: list[int], want: int) -> list[int]:
        if len(fds) != want:
            raise ProtocolError(f"MAP needs {want} file descriptors (userfaultfd, memfd), got {len(fds)}",
                                errno.EINVAL)
        return list(fds)

    def _map(self, req: Request, uffd_fd: int, memfd: int, pid: int, uid: int) -> Region:
        """Check every field of a MAP request; the fds are ours from here on."""
        try:
            addr, length = req.a, req.b
            if length == 0 or length % PAGE_SIZE:
                raise ProtocolError(f"length {length} is not a positive multiple of the page size {PAGE_SIZE}",
                                    errno.EINVAL)
            if addr == 0 or addr % PAGE_SIZE:
                raise ProtocolError(f"address {addr:#x} is not page-aligned", errno.EINVAL)
            if req.c != 0:
                raise ProtocolError(f"unknown MAP flags {req.c:#x}", errno.EINVAL)
            pages = length // PAGE_SIZE
            free = self.store.slot_count - self.mapped_pages
            if pages > free:
                raise ProtocolError(f"region of {length} bytes does not fit: the store has room for "
                                    f"{free * PAGE_SIZE} more bytes (uswap does not overcommit its store)",
                                    errno.ENOMEM)
            if os.readlink(f"/proc/self/fd/{uffd_fd}") != "anon_inode:[userfaultfd]":
                raise ProtocolError("the first descriptor is not a userfaultfd", errno.EBADF)
            target = os.readlink(f"/proc/self/fd/{memfd}")
            st = os.fstat(memfd)
            if not target.startswith("/memfd:") or not stat.S_ISREG(st.st_mode):
                raise ProtocolError("the second descriptor is not a memfd", errno.EBADF)
            if st.st_size != length:
                raise ProtocolError(f"the memfd has {st.st_size} bytes, the region {length}", errno.EINVAL)
            uffd = Userfaultfd.from_fd(uffd_fd)
            try:
                # Proves the range is registered for write-protect with *this*
                # uffd (ENOENT otherwise); lifting WP on fresh pages changes nothing.
                uffd.write_protect(addr, length, False)
            except OSError as e:
                raise ProtocolError(f"the userfaultfd does not cover {addr:#x}+{length} with MISSING|WP "
                                    f"registration ({e.strerror})", errno.EINVAL) from None
            os.set_blocking(uffd_fd, False)
        except BaseException:
            os.close(uffd_fd)
            os.close(memfd)
            raise
        region = Region(self._next_id, uffd, memfd, addr, length, pid=pid, uid=uid, daemon=self)
        self._next_id += 1
        self.regions[region.id] = region
        self.mapped_pages += pages
        log.info("region %d: pid %d uid %d, %d pages at %#x", region.id, pid, uid, pages, addr)
        return region

    async def _serve_region(self, region: Region, connection: trio.CancelScope) -> None:
        """Run the region's fault loop.  If it fails, end the whole connection:
        a region nobody serves would hang its client's faults forever, while a
        closed connection makes the client's watchdog answer them with SIGBUS."""
        with region.serve_scope:
            try:
                await region.serve()
            except Exception:
                log.exception("region %d (pid %d): fault loop failed; dropping the region", region.id, region.pid)
                connection.cancel()

    def _drop(self, region: Region) -> None:
        region.serve_scope.cancel()
        del self.regions[region.id]
        self.mapped_pages -= region.pages
        region.release()
        log.info("region %d released (pid %d)", region.id, region.pid)

    # -- shutdown: swapoff and detach -------------------------------------------------------

    async def detach_all(self) -> None:
        for region in list(self.regions.values()):
            region.serve_scope.cancel()
            lost = await self.swapoff(region)
            if lost:
                # No DETACH: the client's watchdog takes over when the connection
                # closes, and the pages not read back raise SIGBUS, never zeros.
                log.error("region %d: %d page(s) could not be read back; its client will get SIGBUS there",
                          region.id, lost)
            else:
                try:
                    await region.conn.send(Reply(OP_DETACH).pack())
                except OSError:
                    pass
            self._drop(region)

    async def swapoff(self, region: Region) -> int:
        """Put every swapped page back into the region's memfd (pwrite, not a mapping).

        Returns how many pages could not be read back.  Nothing else runs
        meanwhile: the region's fault loop has been cancelled.
        """
        buf = AlignedBuffer(PAGE_SIZE)
        swapped = [p for p in range(region.pages) if region.state[p] == SWAPPED]
        lost = 0
        for page in swapped:
            try:
                await self.io.read(region.swap_map[page], 1, buf)
                check(lib.uswap_pwrite_full(region.memfd, buf.ptr, PAGE_SIZE, page * PAGE_SIZE))
            except OSError as e:
                lost += 1
                self.log_limited("swapoff", logging.ERROR, "region %d: page %d not read back: %s", region.id, page, e)
        log.info("region %d: %d page(s) read back", region.id, len(swapped) - lost)
        return lost

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict:
        r = self.reclaimer
        health = "ok" if not r.pause_reason else r.pause_reason
        return {
            "daemon": {
                "pid": os.getpid(),
                "socket": self.socket_path,
                "store": self.store.path,
                "store_health": health,
                "io": self.io.mode,
                "readahead": self.readahead,
                "page_size": PAGE_SIZE,
                "budget_pages": r.budget,
                "resident_pages": r.resident,
                "writeback_pages": r.writeback,
                "slots_total": self.store.slot_count,
                "slots_used": self.slots.in_use,
                "mapped_pages": self.mapped_pages,
                **asdict(self.stats),
                "uptime_s": round(time.time() - self.started, 1),
            },
            **self.store.status(),
            "regions": [{
                "id": reg.id, "pid": reg.pid, "uid": reg.uid, "address": reg.addr, "size_pages": reg.pages,
                "resident_pages": reg.resident, "swapped_pages": reg.swapped_pages(), **asdict(reg.stats),
            } for reg in self.regions.values()],
        }


_INT = struct.Struct("i")
