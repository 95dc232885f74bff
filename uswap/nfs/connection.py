"""One NFS server connection: a libnfs context, the mounted export, one open file.

Requests are queued with libnfs's asynchronous calls, any number in flight.
Whichever task waits for one drives the socket: it waits for the context's
fd with trio, then lets ``nfs_service`` send and receive; the other waiting
tasks sleep until that pass ends.  Only one task drives at a time (the
``_driver`` lock; docs/DESIGN.md N1), so no two tasks ever wait on the fd, and the context is
replaced only by a task that holds the lock.

Failures.  libnfs's own reconnect and request timeouts are not used (in
4.0 a timed-out request can corrupt its queue, and a reconnect can resume a
half-read reply).  Instead a broken connection, or a request unanswered
for ``ATTEMPT_S``, ends the whole context: ``nfs_destroy_context`` fails every
request in flight, and the next request builds a new context (connect,
MOUNT, LOOKUP) and is sent again.  NFSv3 is stateless, so a restarted server
serves the same file handle and data.  A request that neither succeeds nor
fails for good within ``timeout`` seconds of its start raises ETIMEDOUT; an
error the server gave (EROFS, EACCES, ENOENT, ...) is raised at once.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from dataclasses import dataclass

import trio

from uswap._nfs import ffi, lib
from uswap.nfs import DEFAULT_TIMEOUT
from uswap.nfs.url import NfsUrl

log = logging.getLogger("uswap.nfs")

TICK = 0.1          # s: longest wait for the socket in one pass
ATTEMPT_S = 5.0     # s: one attempt of a request; then the connection is rebuilt and it is sent again
BACKOFF_MAX = 1.0   # s: between reconnect attempts to a server that is down

# What a broken or silent connection looks like from a libnfs callback (transport
# errors come back as -EFAULT, cancelled and timed-out requests as -EINTR) or from
# connecting: worth a new connection and another attempt.  Anything else is the
# server's answer.
RETRYABLE = {errno.EFAULT, errno.EINTR, errno.EAGAIN, errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
             errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}

UP, DOWN, CONNECTING = "up", "down", "connecting"


@dataclass
class ServerState:
    """What `uswap status` shows about the server."""
    server: str
    state: str = DOWN
    since: float = 0.0          # when ``state`` began (Unix time)
    connects: int = 0           # successful connects, the first one included
    retries: int = 0            # requests sent again after a failure
    most_in_flight: int = 0     # the most requests that were waiting for an answer at once
    last_error: str = ""

    def set(self, state: str, error: str = "") -> None:
        if state != self.state:
            self.state, self.since = state, time.time()
        if error:
            self.last_error = error


def _context_error(ctx) -> str:
    text = lib.nfs_get_error(ctx)
    return ffi.string(text).decode(errors="replace") if text != ffi.NULL else "connection failed"


def _error(req, what: str, url: str) -> OSError:
    code = -req.result
    return OSError(code, f"{what}: {ffi.string(req.error).decode(errors='replace') or os.strerror(code)}", url)


class NfsConnection:
    """Use :meth:`connect`; every method that talks to the server is async."""

    def __init__(self, url: NfsUrl, *, timeout: float, file_flags: int | None):
        self.url = url
        self.timeout = timeout
        self.file_flags = file_flags   # the store file is (re)opened with these on connect; None: do not open
        self.server = ServerState(url.server)
        self.address = url.resolve()   # once: libnfs would resolve again, blocking, on every connect
        self.ctx = ffi.NULL
        self.fh = ffi.NULL
        self._generation = 0           # which context: bumped whenever one ends
        self._inflight: set = set()    # requests the current context may still complete
        self._driver = trio.Lock()
        self._progress = trio.Event()

    @classmethod
    async def connect(cls, url: NfsUrl, *, timeout: float = DEFAULT_TIMEOUT, file_flags: int | None = os.O_RDWR):
        """Connect, mount, open the file: any failure is raised at once, in one line."""
        conn = cls(url, timeout=timeout, file_flags=file_flags)
        try:
            async with conn._driver:
                await conn._connect_once()
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Drop the context: requests still in flight complete with an error first."""
        ctx, self.ctx, self.fh = self.ctx, ffi.NULL, ffi.NULL
        self._generation += 1
        if ctx != ffi.NULL:
            lib.nfs_destroy_context(ctx)
        self._inflight.clear()
        self.server.set(DOWN)
        self._notify()

    async def close_handle(self, fh, opened: int) -> None:
        """Free a handle (not the store file's) opened under connection ``opened``;
        if that connection has ended, the handle went with it."""
        if self._generation != opened:
            return
        try:
            await self.request(lambda ctx, _, r: lib.uswap_nfs_close(ctx, fh, r), "close", retry=False)
        except OSError:
            pass

    @property
    def generation(self) -> int:
        """Changes whenever a context ends: requests answered under one value went over one connection."""
        return self._generation

    def _notify(self) -> None:
        """Wake the tasks waiting for their requests: some may be done."""
        self._progress.set()
        self._progress = trio.Event()

    # -- requests --------------------------------------------------------------

    async def request(self, submit, what: str, *, retry: bool = True):
        """Run ``submit(ctx, fh, req)`` (which queues one request) until it succeeds;
        retried across reconnects for up to ``timeout`` seconds.  Returns the request.
        ``retry=False`` for a request on a handle other than the store file's: a
        handle dies with its context, and only the store file is opened again."""
        deadline = trio.current_time() + self.timeout
        while True:
            if self.server.state != UP:
                await self._reconnect(deadline)
            generation = self._generation
            req = ffi.new("struct uswap_nfs_req *")
            rc = submit(self.ctx, self.fh, req)
            if rc == 0:
                self._send_now()
                await self._wait(req, generation, min(deadline, trio.current_time() + ATTEMPT_S))
            else:
                req.result = rc
            if req.result >= 0:
                return req
            error = _error(req, what, self.url.url)
            if error.errno not in RETRYABLE or not retry:
                raise error
            self._broken(generation, str(error))
            if trio.current_time() >= deadline:
                raise OSError(errno.ETIMEDOUT, f"{what}: NFS server {self.url.server} has not answered for "
                                               f"{self.timeout:g}s ({self.server.last_error})", self.url.url)
            self.server.retries += 1

    async def _wait(self, req, generation: int, give_up: float) -> None:
        """Until ``req`` is done; at ``give_up`` the context is ended, which completes it."""
        self._inflight.add(req)   # alive until done or the context is gone
        self.server.most_in_flight = max(self.server.most_in_flight, len(self._inflight))
        try:
            while not req.done:
                if self._generation != generation:
                    req.result = -errno.EINTR   # its context ended before it could answer
                    break
                if trio.current_time() >= give_up:
                    async with self._driver:
                        if self._generation == generation and not req.done:
                            self._reset(f"no answer for {ATTEMPT_S:g}s")
                    if not req.done:   # the context it was queued on is gone
                        req.result = -errno.ETIMEDOUT
                        break
                elif self._driver.locked():
                    with trio.move_on_at(give_up):
                        await self._progress.wait()
                else:
                    async with self._driver:
                        await self._service_pass()
        except BaseException:
            # Cancelled (its region went away): the reply may still come, and
            # must not be copied into a buffer that is no longer the caller's.
            req.buf = ffi.NULL
            raise
        self._inflight.discard(req)

    async def _wait_driving(self, req) -> None:
        """For the task that holds the driver lock (connecting)."""
        self._inflight.add(req)
        give_up = trio.current_time() + min(ATTEMPT_S, self.timeout)
        while not req.done and trio.current_time() < give_up:
            await self._service_pass()
        if not req.done:
            self._reset(f"no answer for {min(ATTEMPT_S, self.timeout):g}s")
            if not req.done:
                req.result = -errno.ETIMEDOUT
        self._inflight.discard(req)

    def _send_now(self) -> None:
        """Send what was just queued without waiting for a pass (whoever drives may be
        waiting for another reply).  Only writes: libnfs closes nothing here, and an
        error shows on the socket, where the next pass finds it."""
        if lib.nfs_which_events(self.ctx) & select.POLLOUT:
            lib.nfs_service(self.ctx, select.POLLOUT)

    async def _service_pass(self) -> None:
        """One wait for the socket (at most TICK) and one nfs_service."""
        ctx = self.ctx
        if ctx == ffi.NULL:
            return
        try:
            fd, events = lib.nfs_get_fd(ctx), lib.nfs_which_events(ctx)
            if fd < 0:
                await trio.sleep(TICK)
                return
            # What the wait returned for is the event to service (no poll() to ask
            # again): an error or hang-up wakes the waiter too, and libnfs finds
            # it when it reads or writes.  Timed out: nothing to service.
            revents = 0
            with trio.move_on_after(TICK):
                if events & select.POLLOUT:
                    await trio.lowlevel.wait_writable(fd)
                    revents = select.POLLOUT
                else:
                    await trio.lowlevel.wait_readable(fd)
                    revents = select.POLLIN
            if revents and lib.nfs_service(ctx, revents) < 0:
                self._reset(_context_error(ctx))
        finally:
            self._notify()

    # -- connection ------------------------------------------------------------

    def _broken(self, generation: int, error: str) -> None:
        """A request on context ``generation`` failed in a way a new connection may cure."""
        if generation == self._generation and self.server.state == UP:
            log.warning("NFS server %s: %s; reconnecting", self.url.server, error)
            self.server.set(DOWN, error)

    def _reset(self, error: str) -> None:
        """End the context now (the caller holds the driver lock): its requests fail, and are retried."""
        if self.server.state == UP:
            log.warning("NFS server %s: %s; reconnecting", self.url.server, error)
        self.close()
        self.server.set(DOWN, error)

    async def _reconnect(self, deadline: float) -> None:
        backoff = 0.05
        while self.server.state != UP:
            generation = self._generation
            async with self._driver:
                if self._generation != generation or self.server.state == UP:
                    continue  # another task connected, or tried, meanwhile
                try:
                    await self._connect_once()
                    log.info("NFS server %s: reconnected", self.url.server)
                    return
                except OSError as e:
                    if e.errno not in RETRYABLE:
                        raise
                    self.server.set(DOWN, e.strerror)
            if trio.current_time() >= deadline:
                raise OSError(errno.ETIMEDOUT, f"NFS server {self.url.server} unreachable for {self.timeout:g}s "
                                               f"({self.server.last_error})", self.url.url)
            await trio.sleep(min(backoff, max(0.0, deadline - trio.current_time())))
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _connect_once(self) -> None:
        """New context, MOUNT, open the file.  The caller holds the driver lock."""
        self.close()
        self.server.set(CONNECTING)
        self.ctx = lib.nfs_init_context()
        if self.ctx == ffi.NULL:
            raise MemoryError("nfs_init_context failed")
        url = lib.nfs_parse_url_full(self.ctx, self.url.libnfs_url(self.address).encode())
        if url == ffi.NULL:
            raise OSError(errno.EINVAL, _context_error(self.ctx), self.url.url)
        lib.nfs_destroy_url(url)      # only its side effects were wanted: version and ports applied
        lib.nfs_set_autoreconnect(self.ctx, 0)
        req = ffi.new("struct uswap_nfs_req *")
        await self._run_driving(lib.uswap_nfs_mount(self.ctx, self.address.encode(), self.url.export.encode(),
                                                    req), req, self._mount_error)
        if self.file_flags is not None:
            req = ffi.new("struct uswap_nfs_req *")
            await self._run_driving(lib.uswap_nfs_open(self.ctx, self.url.file.encode(), self.file_flags, req),
                                    req, self._open_error)
            self.fh = req.fh
        self.server.connects += 1
        self.server.set(UP)
        self._notify()

    async def _run_driving(self, rc: int, req, error) -> None:
        if rc == 0:
            await self._wait_driving(req)
        else:
            req.result = rc
        if req.result < 0:
            raise error(-req.result, ffi.string(req.error).decode(errors="replace"))

    def _mount_error(self, code: int, text: str) -> OSError:
        where = f"{self.url.server}:{self.url.export}"
        if code in (errno.EPERM, errno.ENOENT):   # libnfs maps MNT3ERR_NOENT to EPERM
            return OSError(code, f"export {self.url.export} not found on NFS server {self.url.server} "
                                 f"(or not exported to this client): {text}", self.url.url)
        if code == errno.EACCES:
            return OSError(code, f"NFS server {self.url.server} refused to mount {self.url.export} (no such "
                                 f"export, or not exported to this client): {text}", self.url.url)
        return OSError(code, f"cannot reach NFS server {self.url.server} to mount {where}: {text}", self.url.url)

    def _open_error(self, code: int, text: str) -> OSError:
        if code == errno.ENOENT:
            return OSError(code, f"no file {self.url.file} in export {self.url.export}", self.url.url)
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            if self.file_flags & (os.O_WRONLY | os.O_RDWR):
                return OSError(code, f"cannot open {self.url.file} for writing (read-only export, or "
                                     f"permission denied): {text}", self.url.url)
            return OSError(code, f"permission denied reading {self.url.file}: {text}", self.url.url)
        return OSError(code, f"open {self.url.file}: {text}", self.url.url)
