"""The daemon: a Unix socket, one connection per client region, one store.

Structure (trio): the daemon's nursery runs the accept loop and the
reclaimer; each connection gets its own nursery running its region's fault
loop, so a client's departure, however abrupt, cancels exactly its tasks and
releases exactly its region.  One client can never name another's region:
a region *is* its connection.

Fault isolation (docs/SECURITY.md): everything a client sends is hostile.
The receive path reads at most one request's bytes and two fds per packet;
every fd it did not ask for is closed; a connection's failure, whatever it
is, ends that connection (and its region) and nothing else; per-uid limits
bound what one user holds; a connection that has not mapped a region within
``map_timeout`` is closed.  Nothing a client does reaches the daemon's
nursery as an exception.

Shutdown (SIGTERM/SIGINT): stop accepting, stop reclaim, then for each region
read every swapped page back into its memfd ("swapoff"), tell the client it
is detached (it unregisters its userfaultfd range and keeps plain shared
memory, all data in place), and close.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import json
import logging
import math
import os
import socket
import stat
import struct
import time
from dataclasses import asdict, dataclass

import trio

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer, check
from uswap.backoff import Backoff
from uswap.config import DEFAULTS
from uswap.daemon import options
from uswap.daemon.budget import DaemonBudget
from uswap.daemon.limits import UserLedger, UserLimits
from uswap.daemon.mapcheck import check_mapping, check_memfd, check_uffd, close_received
from uswap.daemon.options import MAX_USER_ADDRESS
from uswap.daemon.pool import CompressedPool, PoolOptions
from uswap.daemon.reclaim import Reclaimer
from uswap.daemon.region import CORRUPT_ERRNOS, Region
from uswap.daemon.runpolicy import RunPolicy
from uswap.daemon.runaccept import accept_run
from uswap.daemon.runprocess import RunProcess
from uswap.daemon.runproto import is_run_connection
from uswap.daemon.runtree import Run
from uswap.daemon.swapmap import SWAPPED, slot_of, state_of
from uswap.daemon.slots import SlotAllocator
from uswap.paths import secure_directory
from uswap.protocol import (MAX_REQUEST_FDS, OP_DETACH, OP_FDS, OP_MAP, OP_STATUS, OP_UNMAP, OPS, REQUEST,
                            ProtocolError, Reply, Request)
from uswap.store.base import Store
from uswap.units import check_range
from uswap.uffd import RegisterMode, Userfaultfd

log = logging.getLogger("uswap.daemon")

_PEERCRED = struct.Struct("3i")
_INT = struct.Struct("i")
_CMSG_SPACE = socket.CMSG_SPACE(MAX_REQUEST_FDS * _INT.size)
ACCEPT_BACKOFF_FIRST = 0.01
ACCEPT_BACKOFF_MAX = 1.0
ASYNC_BATCHES_IN_FLIGHT = 4
# Pages per writeback batch (one cluster of slots, usually one write): twice the kernel's
# SWAP_CLUSTER_MAX; measured (docs/BENCHMARKS.md, "Writeback batch size"): with the bounded slot
# search, 64 cuts the hog's wall time and daemon CPU by a fifth and changes random and zipf little.
WRITEBACK_BATCH = 64
MAX_WRITEBACK_BATCH = 256           # `uswap daemon --writeback-batch` accepts 1..MAX_WRITEBACK_BATCH
# The one socket directory the daemon makes if missing (0755, like systemd's RuntimeDirectory=uswap): its
# default socket's.  Any other socket's directory must exist: a typo in --socket is refused, not created.
SYSTEM_SOCKET_DIR = os.path.dirname(os.fsdecode(ffi.string(lib.USWAP_SYSTEM_SOCKET)))
MAX_SOCKET_PATH = 107               # bytes: sockaddr_un.sun_path holds 108 with the NUL
RECLAIM_RESTART_FIRST = 0.1
RECLAIM_RESTART_MAX = 10.0
# The daemon's fault totals: a region's engine counts, and a run process's fault counts (its readahead_pages
# counts its synchronous windows too, unlike the region engines' async readahead: not added in).
REGION_FAULT_COUNTS = ("faults", "engine_faults", "slow_path_faults", "readahead_pages")
RUN_FAULT_COUNTS = ("faults", "engine_faults", "slow_path_faults")


@dataclass
class Client:
    """One connection: who is on the other end (SO_PEERCRED at connect) and its region, if any."""
    sock: trio.socket.SocketType
    pid: int
    uid: int
    gid: int
    region: Region | None = None


@dataclass
class DaemonStats:
    pswpin: int = 0
    pswpout: int = 0
    read_errors: int = 0
    write_errors: int = 0
    writeback_waits: int = 0
    throttled: int = 0


class SocketInUse(OSError):
    pass


def writeback_batch(pages: int | None) -> int:
    """Pages per writeback batch: ``--writeback-batch`` checked (None: WRITEBACK_BATCH); ValueError otherwise."""
    if pages is None:
        return WRITEBACK_BATCH
    return check_range("--writeback-batch", pages, 1, MAX_WRITEBACK_BATCH, unit=" pages")


def check_socket_path(path: str) -> None:
    """What :meth:`Daemon.bind` would refuse, found without making or removing anything (the command line
    asks first, before the store is made): a path too long for a socket, a missing directory (other than
    SYSTEM_SOCKET_DIR, which bind makes), an unsafe one (uswap.paths.secure_directory), something at the path
    that is not a socket, or a daemon answering there (SocketInUse).  A socket nobody answers on is stale:
    bind replaces it."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(errno.ENAMETOOLONG, f"too long for a socket path ({len(os.fsencode(path))} bytes, at most "
                                          f"{MAX_SOCKET_PATH})", path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(directory):
        if directory == SYSTEM_SOCKET_DIR:
            return
        raise OSError(errno.ENOENT, f"directory {directory} does not exist (the daemon makes only "
                                    f"{SYSTEM_SOCKET_DIR}, for its default socket)", path)
    secure_directory(directory, 0o755)      # it exists: only checked
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SocketInUse(errno.EEXIST, "exists and is not a socket", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return                          # stale: its daemon is gone
    raise SocketInUse(errno.EADDRINUSE, "another uswap daemon is listening here", path)


class Daemon:
    def __init__(self, store: Store, socket_path: str, *, budget: int, io_mode: str = DEFAULTS.io,
                 readahead: int = DEFAULTS.readahead, fault_threads: int = DEFAULTS.fault_threads, batch: int | None = None,
                 group: int | None = None,
                 limits: UserLimits | None = None, map_timeout: float = 10.0, run_policy: RunPolicy | None = None,
                 pool: PoolOptions | None = None):
        budget = options.resident(budget)     # the command line checked them first (uswap.daemon.options)
        readahead = options.readahead(readahead)
        fault_threads = options.fault_threads(fault_threads)
        batch = writeback_batch(batch)
        self.store = store
        self.socket_path = socket_path
        self.group = group               # the socket's group (0660), or None: 0600
        self.ledger = UserLedger(limits or default_limits(store.slot_count))
        self.map_timeout = map_timeout
        self.budget = budget
        self.readahead = readahead
        self.fault_threads = fault_threads   # per region's engine
        self.io = store.slot_io(io_mode)
        self.store_fd = store.local_fd     # the engines read slots here, or through the codec's remote store
        self.codec_c = store.codec_c
        self.slots = SlotAllocator(store.slot_count, store.codec, groups=store.slot_groups)
        # The compressed pool (uswap.daemon.pool), in front of the store for every path that reads or writes a
        # slot: they all look at the store's codec view (the engines, writeback, Python's slot I/O) or free
        # through the slot allocator (P1).  Freed by close_pool, after everything that used it stopped.
        self.pool: CompressedPool | None = None
        if pool is not None and pool.max_bytes:
            options.pool(pool.max_bytes, budget)
            self.pool = CompressedPool(pool, slot_count=store.slot_count, page_size=PAGE_SIZE,
                                       store_fd=self.store_fd, codec_c=self.codec_c)
            self.codec_c.pool = self.pool.c
            self.slots.c.pool = self.pool.c
        # One budget for regions and runs (uswap.daemon.budget): its clients are the regions together (the
        # reclaimer holds their share) while there are any, and each run; the pool's charge comes off the top.
        self.shares = DaemonBudget(budget // PAGE_SIZE, self._budget_clients,
                                   pool_pages=self._pool_pages)
        # Writeback batches in flight: one with sync I/O (each write completes before the
        # next batch is chosen); with async I/O, writes overlap the choice of the next ones.
        self.reclaimer = Reclaimer(self, budget // PAGE_SIZE, batch=batch,
                                   in_flight=ASYNC_BATCHES_IN_FLIGHT if self.io.overlapping else 1,
                                   shares=self.shares)
        self.stats = DaemonStats()
        self.regions: dict[int, Region] = {}
        self.runs: dict[int, RunProcess] = {}     # processes of `uswap run`, by id (uswap.daemon.runprocess)
        self.run_trees: dict[int, Run] = {}       # the runs themselves: process trees with one budget
        self.run_policy = run_policy or RunPolicy.default()   # who may start runs, how many (runpolicy.py)
        self.run_connections: collections.Counter[int] = collections.Counter()   # per uid, handshakes included
        self._ended_fault_counts = dict.fromkeys(REGION_FAULT_COUNTS, 0)   # of regions and run processes gone
        self.run_peers: collections.Counter[int] = collections.Counter()   # run connections per peer pid
        self.parked_forks: list = []              # uffds of refused fork children kept until they exit (runevents.py)
        self.mapped_pages = 0
        self.nursery: trio.Nursery | None = None
        self._next_id = 1
        self._log_times: dict[str, tuple[float, int]] = {}
        self._bad_slots = (-2, -2)     # the run of bad slots poisoned last (note_poisoned)
        self._stopping = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._reclaim_scope = trio.CancelScope()
        self._reclaim_ended = trio.Event()
        self.started = time.time()

    def _budget_clients(self) -> list:
        return ([self.reclaimer] if self.regions else []) + list(self.run_trees.values())

    def _pool_pages(self) -> int:
        return self.pool.charged_pages if self.pool is not None else 0

    def close_pool(self) -> None:
        """Free the pool once nothing can use it (after ``serve`` returned: every region's and run's engine
        stopped, every writeback ended); the C paths forget it first."""
        if self.pool is None:
            return
        self.codec_c.pool = ffi.NULL
        self.slots.c.pool = ffi.NULL
        self.pool.close()
        self.pool = None

    # -- services for regions -----------------------------------------------

    def run_slots_held(self, uid: int | None = None) -> int:
        """Slots held by processes of `uswap run` (all, or one uid's): the store room regions cannot reserve."""
        return sum(run.slots_held for run in self.run_trees.values() if uid is None or run.uid == uid)

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def release_slot(self, slot: int) -> None:
        if slot >= 0:
            self.slots.free(slot)   # and the codec forgets it

    def note_read_error(self, region: Region, error: OSError, slot: int, attempt: int) -> None:
        """A failed read of slots slot..; a slot that did not verify is logged only if its page is poisoned
        (note_poisoned: one line for a stretch of bad slots)."""
        self.stats.read_errors += 1
        if error.errno not in CORRUPT_ERRNOS:
            self.log_limited("read", logging.ERROR, "region %d: read of slot %d (offset %d) failed, attempt %d: %s",
                             region.id, slot, (slot + 1) * PAGE_SIZE, attempt, error)

    def note_poisoned(self, owner: str, address: int, slot: int, error: OSError) -> None:
        """A page poisoned for its unreadable slot.  One line (rate-limited) per run of bad slots, i.e.
        consecutive slots (either way) poisoned one after another: a damaged stretch of the store is one
        line, not one per page; the count is each region's and run's ``poisoned``."""
        first, last = self._bad_slots
        if first - 1 <= slot <= last + 1:
            self._bad_slots = (min(first, slot), max(last, slot))
            return
        self._bad_slots = (slot, slot)
        self.log_limited("poisoned", logging.ERROR, "%s: page %#x poisoned: slot %d unreadable (%s); poisoned "
                         "pages of the slots next to it are not logged one by one", owner, address, slot, error)

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
        """Bind the listening socket (0600, or 0660 for ``group``); refuse a path a live daemon answers on."""
        check_socket_path(self.socket_path)     # again: the command line asked before the store was made
        secure_directory(os.path.dirname(os.path.abspath(self.socket_path)), 0o755)   # makes SYSTEM_SOCKET_DIR only
        if os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)         # stale: check_socket_path found no daemon answering
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)   # born 0600: no window in which others can connect
        try:
            sock._sock.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        if self.group is not None:
            os.chown(self.socket_path, -1, self.group)
            os.chmod(self.socket_path, 0o660)
        sock.listen(64)
        return sock

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`request_stop`, then detach every region and return."""
        listener = self.bind()
        who = f"uid {os.geteuid()} and group {self.group}" if self.group is not None else f"uid {os.geteuid()} only"
        pool = (f"a {self.pool.options.compressor} pool of {self.pool.options.max_bytes // PAGE_SIZE} pages"
                if self.pool is not None else "no pool")
        log.info("serving %s on %s (%s): budget %d pages, %s I/O, readahead %d, %d fault threads per region, "
                 "writeback batch %d, %s",
                 self.store.path, self.socket_path, who, self.budget // PAGE_SIZE, self.io.mode, self.readahead,
                 self.fault_threads, self.reclaimer.batch, pool)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._reclaim)
                nursery.start_soon(self.store.maintain)
                nursery.start_soon(self._accept, listener, nursery)
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

    async def _accept(self, listener, nursery: trio.Nursery) -> None:
        """Accept forever; out of fds (or any other accept error) means wait and retry, never stop."""
        backoff = Backoff(ACCEPT_BACKOFF_FIRST, ACCEPT_BACKOFF_MAX)
        with self._accept_scope:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as e:
                    delay = backoff.next()
                    self.log_limited("accept", logging.ERROR, "accept failed: %s; retrying in %.2fs", e, delay)
                    await trio.sleep(delay)
                    continue
                backoff.reset()
                nursery.start_soon(self._connection, conn)

    async def _reclaim(self) -> None:
        """Run the reclaimer; if it fails (a bug: a region's errors end only that region),
        log it and start it again after a pause, rather than take every client down."""
        backoff = Backoff(RECLAIM_RESTART_FIRST, RECLAIM_RESTART_MAX)
        try:
            with self._reclaim_scope:
                while True:
                    try:
                        await self.reclaimer.run()
                    except Exception:
                        delay = backoff.next()
                        log.exception("reclaim failed; restarting it in %.1fs", delay)
                        await trio.sleep(delay)
        finally:
            self._reclaim_ended.set()

    # -- one connection, one region ---------------------------------------------------

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               _PEERCRED.size))
            except OSError:
                return
            try:
                self.ledger.open_connection(uid)
            except ProtocolError as e:
                self.log_limited(f"connections {uid}", logging.WARNING, "pid %d: %s", pid, e)
                with trio.move_on_after(1), contextlib.suppress(OSError):
                    await sock.send(Reply(0, e.errno, 0, str(e)).pack())
                return
            client = Client(sock, pid, uid, gid)
            try:
                # The first packet says what the connection is: a region's request, or a run's CONNECT.
                head = None
                with trio.move_on_after(self.map_timeout):
                    try:
                        head = await sock.recv(4, socket.MSG_PEEK)
                    except OSError:
                        return  # reset before a word
                if head is None:
                    log.info("pid %d uid %d: no region mapped within %gs; closing the connection", pid, uid,
                             self.map_timeout)
                    return
                if not head:
                    return      # closed at once (a liveness probe)
                if is_run_connection(head):
                    await self._serve_run(client)
                    return
                async with trio.open_nursery() as nursery:
                    await self._converse(client, nursery)
                    nursery.cancel_scope.cancel()
            except Exception:
                # A bug, not a client's doing (those are ProtocolErrors); still, it
                # ends this connection only.
                log.exception("connection of pid %d uid %d failed; closing it", pid, uid)
            finally:
                if client.region is not None and client.region.id in self.regions:
                    self._drop(client.region)
                self.ledger.close_connection(uid)

    async def _serve_run(self, client: "Client") -> None:
        """A process of `uswap run` (csrc/preload/uswap_run.h): accepted, served until it exits or execs, released.
        A fork child is served from its FORK event on (serve_run_process); its connection only pairs."""
        self.run_connections[client.uid] += 1
        self.run_peers[client.pid] += 1
        try:
            await self._run_accepted(client)
        finally:
            self.run_connections[client.uid] -= 1
            if not self.run_connections[client.uid]:
                del self.run_connections[client.uid]
            self.run_peers[client.pid] -= 1
            if not self.run_peers[client.pid]:
                del self.run_peers[client.pid]

    async def _run_accepted(self, client: "Client") -> None:
        accepted = None
        # The handshake has the region's deadline: a client that stops talking holds nothing for long.
        with trio.move_on_after(self.map_timeout):
            try:
                accepted = await accept_run(self, client)
            except ProtocolError as e:
                self.log_limited(f"run {client.uid}", logging.WARNING, "pid %d uid %d: run refused: %s", client.pid,
                                 client.uid, e)
                return
            except OSError as e:
                log.info("pid %d: run connection lost before READY: %s", client.pid, e)
                return
        if accepted is None:
            log.info("pid %d uid %d: no run handshake within %gs; closing the connection", client.pid, client.uid,
                     self.map_timeout)
            return
        run, new = accepted
        if new:
            await self.serve_run_process(run)
        else:
            log.info("run %d: pid %d (forked from pid %s) has its agent", run.tree.id, run.pid, run.parent)
            await run.done.wait()

    async def serve_run_process(self, run: RunProcess) -> None:
        """Serve one process image of a run until it is gone, then drop its slot references."""
        self.runs[run.id] = run
        log.info("run %d: pid %s uid %d, budget %d pages, %d range(s) registered%s", run.tree.id, run.pid,
                 run.uid, run.tree.budget_pages, len(run.ranges),
                 f", forked from pid {run.parent}" if run.parent else "")
        try:
            await run.serve()
        finally:
            del self.runs[run.id]
            self._count_ended(run.counts(), RUN_FAULT_COUNTS)
            ended = run.leave()
            run.done.set()
            log.info("run %d released (pid %s): %s", run.id, run.pid,
                     " ".join(f"{k}={v}" for k, v in run.counts().items()))
            if ended:   # the whole tree is gone: its peak (a process's own is in its line above)
                log.info("run %d ended: max_resident_pages=%d", run.tree.id, run.tree.max_resident_pages)

    async def _converse(self, client: "Client", nursery: trio.Nursery) -> None:
        """Answer requests until the peer hangs up, unmaps, or sends what cannot be a request."""
        deadline = trio.current_time() + self.map_timeout
        while True:
            try:
                with trio.move_on_at(deadline if client.region is None else math.inf) as waiting:
                    packet, fds, truncated = await self._recv(client.sock)
            except OSError:
                return   # ECONNRESET and the like: the client hung up (with a reply unread)
            if waiting.cancelled_caught:
                log.info("pid %d uid %d: no region mapped within %gs; closing the connection", client.pid,
                         client.uid, self.map_timeout)
                return
            if not packet and not fds and not truncated:
                return  # EOF: the client closed or died
            op, break_off = 0, False
            try:
                if truncated:
                    break_off = True
                    raise ProtocolError(f"packet larger than a request ({REQUEST.size} bytes) or with more than "
                                        f"{MAX_REQUEST_FDS} file descriptors", errno.EPROTO)
                try:
                    req = Request.unpack(packet)
                except ProtocolError:
                    break_off = True   # not framed as a request: nothing after it can be trusted
                    raise
                op = req.op
                want = OP_FDS.get(op, 0)
                if len(fds) != want:
                    break_off = len(fds) > want   # fds it was not asked for: a hostile peer
                    raise ProtocolError(f"{OPS[op]} takes {want} file descriptors, got {len(fds)}"
                                        + (" (userfaultfd, memfd)" if op == OP_MAP else ""), errno.EINVAL)
                if op == OP_MAP:
                    if client.region is not None:
                        raise ProtocolError("this connection already has a region", errno.EBUSY)
                    uffd_fd, memfd = fds
                    fds = []   # _map owns them now
                    client.region = self._map(req, uffd_fd, memfd, client, nursery)
                    nursery.start_soon(self._serve_region, client.region)
                    reply = Reply(op, 0, client.region.id)
                elif op == OP_UNMAP:
                    if client.region is None:
                        raise ProtocolError("no region on this connection", errno.EINVAL)
                    self._drop(client.region)
                    with contextlib.suppress(OSError):
                        await client.sock.send(Reply(op, 0, client.region.id).pack())
                    return
                elif op == OP_STATUS:
                    reply = Reply(op, 0, 0, json.dumps(self.status(for_uid=client.uid)))
                else:
                    raise ProtocolError(f"operation {op} is not a request", errno.EOPNOTSUPP)
            except ProtocolError as e:
                self.log_limited(f"protocol {client.uid}", logging.WARNING, "pid %d uid %d: %s", client.pid,
                                 client.uid, e)
                reply = Reply(op, e.errno, 0, str(e))
            finally:
                await close_received(fds)
            try:
                await client.sock.send(reply.pack())
            except OSError:
                return
            if break_off:
                return

    async def _recv(self, sock) -> tuple[bytes, list[int], bool]:
        """One packet: at most a request's bytes and MAX_REQUEST_FDS fds; ``truncated`` if it held more.

        The kernel installs only the fds that fit the control buffer (and
        releases the rest itself); those are returned, to be closed.
        """
        data, ancdata, flags, _ = await sock.recvmsg(REQUEST.size + 1, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _INT.size
                fds.extend(array.array("i", payload[:usable]))
        truncated = bool(flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)) or len(data) > REQUEST.size
        return data, fds, truncated

    def _map(self, req: Request, uffd_fd: int, memfd: int, client: "Client", nursery: trio.Nursery) -> Region:
        """Check every field and fd of a MAP request (uswap.daemon.mapcheck); the fds are ours from here on."""
        pages = 0
        try:
            addr, length = req.a, req.b
            if length == 0 or length % PAGE_SIZE:
                raise ProtocolError(f"length {length} is not a positive multiple of the page size {PAGE_SIZE}",
                                    errno.EINVAL)
            if addr == 0 or addr % PAGE_SIZE or addr + length > MAX_USER_ADDRESS:
                raise ProtocolError(f"address {addr:#x} is not page-aligned or not a user address", errno.EINVAL)
            if req.c != 0:
                raise ProtocolError(f"unknown MAP flags {req.c:#x}", errno.EINVAL)
            pages = length // PAGE_SIZE
            free = self.store.slot_count - self.mapped_pages - self.run_slots_held()
            if pages > free:
                raise ProtocolError(f"region of {length} bytes does not fit: the store has room for "
                                    f"{free * PAGE_SIZE} more bytes (uswap does not overcommit its store)",
                                    errno.ENOMEM)
            check_uffd(uffd_fd, [r.uffd.fd for r in self.regions.values()])
            memfd_id = check_memfd(memfd, length)
            if any(r.memfd_id == memfd_id for r in self.regions.values()):
                raise ProtocolError("this memfd already backs another region", errno.EBUSY)
            check_mapping(client.pid, addr, length, memfd_id)
            uffd = Userfaultfd.from_fd(uffd_fd)
            try:
                # Registering again, MISSING|WP, proves the range is this uffd's in that
                # mode (EBUSY if another uffd of the client holds it: WRITEPROTECT alone
                # would not tell, the kernel accepts it from any uffd of the mm).
                uffd.register(addr, length, RegisterMode.MISSING | RegisterMode.WP)
            except OSError as e:
                raise ProtocolError(f"the userfaultfd does not cover {addr:#x}+{length} with MISSING|WP "
                                    f"registration ({e.strerror})", errno.EINVAL) from None
            os.set_blocking(uffd_fd, False)
            self.ledger.add_region(client.uid, pages)   # the last check: nothing after it can fail
        except BaseException:
            os.close(uffd_fd)
            os.close(memfd)
            raise
        try:
            region = Region(self.next_id(), uffd, memfd, addr, length, pid=client.pid, uid=client.uid,
                            memfd_id=memfd_id, conn=client.sock, connection=nursery.cancel_scope, nursery=nursery,
                            daemon=self)
        except BaseException:
            self.ledger.remove_region(client.uid, pages)
            uffd.close()
            os.close(memfd)
            raise
        self.regions[region.id] = region
        self.mapped_pages += pages
        self.shares.update()      # before its first fault: the regions' lines count the runs' pages
        log.info("region %d: pid %d uid %d, %d pages at %#x", region.id, client.pid, client.uid, pages, addr)
        return region

    async def _serve_region(self, region: Region) -> None:
        """Run the region's fault loop.  If it ends other than by a release, end the
        whole connection: a region nobody serves would hang its client's faults
        forever, while a closed connection makes the client's watchdog answer
        them with SIGBUS."""
        with region.serve_scope:
            try:
                await region.serve()
            except Exception:
                log.exception("region %d (pid %d): fault loop failed; dropping the region", region.id, region.pid)
                self.end_region(region, "its fault loop failed")
            else:
                self.end_region(region, "its client's memory is gone", level=logging.INFO)

    def end_region(self, region: Region, reason: str, *, level: int = logging.WARNING) -> None:
        """End one region for something its client did (or its memory vanishing): drop it now,
        and close its connection.  Called by the fault loop and the reclaimer; a no-op for a
        region already released."""
        if region.id in self.regions:
            log.log(level, "region %d (pid %d uid %d): %s; ending the region", region.id, region.pid, region.uid,
                    reason)
            self._drop(region)
        region.connection.cancel()

    def _drop(self, region: Region) -> None:
        region.serve_scope.cancel()
        self._count_ended(region.engine_stats(), REGION_FAULT_COUNTS)
        del self.regions[region.id]
        self.mapped_pages -= region.pages
        self.ledger.remove_region(region.uid, region.pages)
        region.release()
        self.shares.update()          # its pages left the budget: the others' lines and hard lines rise
        self.reclaimer.progressed()   # and faults throttled elsewhere look again
        log.info("region %d released (pid %d)", region.id, region.pid)

    # -- shutdown: swapoff and detach -------------------------------------------------------

    async def detach_all(self) -> None:
        for run in list(self.runs.values()):
            run.detach = True       # its task reads every page back and unregisters at its next tick
        for run in list(self.runs.values()):
            with trio.move_on_after(30):
                await run.done.wait()
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
        meanwhile: the region's fault loop has been cancelled and its engine
        stopped.
        """
        region.quiesce()
        buf = AlignedBuffer(PAGE_SIZE)
        swapped = [(p, slot_of(e)) for p in range(region.pages) if state_of(e := region.map.entry(p)) == SWAPPED]
        lost = 0
        for page, slot in swapped:
            try:
                await self.io.read(slot, 1, buf)
                check(lib.uswap_pwrite_full(region.memfd, buf.ptr, PAGE_SIZE, page * PAGE_SIZE))
            except OSError as e:
                lost += 1
                self.log_limited("swapoff", logging.ERROR, "region %d: page %d not read back: %s", region.id, page, e)
        log.info("region %d: %d page(s) read back", region.id, len(swapped) - lost)
        return lost

    # -- status ----------------------------------------------------------------------------

    def _count_ended(self, counts: dict, keys: tuple[str, ...]) -> None:
        for key in keys:
            self._ended_fault_counts[key] += counts[key]

    def fault_counts(self) -> dict:
        """Every fault of every region and run process, those gone included: faults = engine_faults (served in
        C) + slow_path_faults (handed to Python); readahead_pages: the region engines' async readahead."""
        counts = dict(self._ended_fault_counts)
        for source, keys in [(region.engine_stats(), REGION_FAULT_COUNTS) for region in self.regions.values()] + \
                            [(run.counts(), RUN_FAULT_COUNTS) for run in self.runs.values()]:
            for key in keys:
                counts[key] += source[key]
        return counts

    def status(self, for_uid: int | None = None) -> dict:
        """Everything, for root and the daemon's uid; for any other uid, only its own regions."""
        r = self.reclaimer
        everything = for_uid is None or for_uid in (0, os.geteuid())
        self.shares.update()
        health = "ok" if not r.pause_reason else r.pause_reason
        return {
            "daemon": {
                "pid": os.getpid(),
                "socket": self.socket_path,
                "store": self.store.path,
                "store_health": health,
                "io": self.io.mode,
                "readahead": self.readahead,
                "fault_threads": self.fault_threads,
                "page_size": PAGE_SIZE,
                "budget_pages": r.budget_pages,
                "resident_pages": r.resident,
                "writeback_pages": r.writeback,
                "slots_total": self.store.slot_count,
                "slots_used": self.slots.in_use,
                "mapped_pages": self.mapped_pages,
                "run_resident_pages": sum(run.resident for run in self.run_trees.values()),
                **self.shares.status(),
                "run_slots": self.run_slots_held(),
                **asdict(self.stats),
                **self.fault_counts(),
                "write_ios": self.io.write_ios,
                "punches": r.punches,
                "uptime_s": round(time.time() - self.started, 1),
            },
            **self.store.status(slots=self.slots),
            "pool": self.pool.stats() if self.pool is not None else None,
            "regions": [{
                "id": reg.id, "pid": reg.pid, "uid": reg.uid, "address": reg.addr, "size_pages": reg.pages,
                "resident_pages": reg.resident, "swapped_pages": reg.swapped_pages(), **asdict(reg.stats),
                **reg.engine_stats(),
            } for reg in self.regions.values() if everything or reg.uid == for_uid],
            "runs": [run.status() for run in self.runs.values() if everything or run.uid == for_uid],
        }


def default_limits(slot_count: int) -> UserLimits:
    """The per-uid limits with no flags: half the store, 64 regions, 64 connections."""
    return UserLimits(max_pages=slot_count // 2, max_regions=64, max_connections=64, exempt_uid=os.geteuid())
