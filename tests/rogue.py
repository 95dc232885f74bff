"""A hostile uswap client for the tests: raw packets, arbitrary fds, MAPs done wrong (or right), a fuzzer.

Importable: :class:`Rogue` does the work in this process; :class:`RogueProcess` runs this file as a
separate process (as another uid, under a prefix such as ``unshare -m``) and drives it.  Runnable:

    python3 tests/rogue.py --socket SOCK                     # JSON commands on stdin, one JSON result line each
    python3 tests/rogue.py --socket SOCK --do '{"cmd": "fuzz", "count": 3000, "seconds": 40, "seed": 1}'
    setpriv --reuid 65534 --regid 65534 --groups 64000 python3 tests/rogue.py --socket SOCK ...

Where the interpreter lives under a directory other uids cannot search (root's pyenv under /root, 0700),
:class:`RogueProcess` runs it under setpriv with CAP_DAC_READ_SEARCH as the only (ambient) capability and
``--drop-caps``: every module is imported first, then every capability is dropped and that is checked in
/proc/self/status, so the daemon deals with a plain unprivileged uid.

Commands (``{"cmd": NAME, ...}``; every result is a dict, ``{"error": ...}`` if the command itself failed):
  packet    data_hex | op a b c [extra] [size], fds [kinds]: a fresh connection, one packet, the reply and
            whether the daemon then closed the connection
  map       name, length, memfd (rw ro other other_sealed noseal fake), features, dontfork, send_uffd_of:
            the client's MAP dance (csrc/client/uswap_client.c) on a connection of its own, kept under ``name``
  touch     name, length, value: memset the region's first bytes (each page faults through the daemon)
  ftruncate name, size;  seals name;  munmap name;  close name
  fork      n: fork n children that exit at once (uffd EVENT_FORK hands the daemon a new uffd each time)
  connect   n, seconds: n idle connections;  idle_results seconds;  close_idle
  status    the daemon's STATUS as this uid sees it
  fuzz      count, seconds, seed [max_size max_fds]: the protocol fuzzer (:class:`Fuzzer`)
  exit
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from uswap.core import PAGE_SIZE
from uswap.protocol import MAGIC, OP_DETACH, OP_MAP, OP_STATUS, OP_UNMAP, REQUEST, VERSION, Reply, Request
from uswap.uffd import Feature, RegisterMode, Userfaultfd

HERE = os.path.dirname(os.path.abspath(__file__))
ROGUE = os.path.abspath(__file__)

# What uswap_map negotiates (csrc/client/uswap_client.c, UFFD_CLIENT_FEATURES).
CLIENT_FEATURES = Feature.MISSING_SHMEM | Feature.WP_HUGETLBFS_SHMEM | Feature.THREAD_ID | Feature.POISON

FD_KINDS = ("memfd", "memfd_ro", "memfd_sealed", "memfd_noseal", "tmpfs", "file", "pipe", "socket", "devnull",
            "eventfd", "uffd", "uffd_fork", "uffd_registered", "epoll", "dir", "daemon_conn")

SNDBUF = 4 << 20   # net.core.wmem_max here: packets up to ~8 MiB can be sent by any uid

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
PROT_RW = 0x1 | 0x2
MAP_SHARED = 0x01
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTFORK = 10
MNT_DETACH = 2


def _libc_check(ret: int, what: str) -> int:
    if ret == -1 or ret is None:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


# -- privileges --------------------------------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Drop every capability (ambient ones go with the inheritable set); check that none is left."""
    header = _CapHeader(0x20080522, 0)   # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _libc_check(_libc.capset(ctypes.byref(header), data), "capset")
    with open("/proc/self/status") as f:
        caps = {k: int(v, 16) for k, v in (line.split(":\t") for line in f if line.startswith("Cap"))
                if k in ("CapInh", "CapPrm", "CapEff", "CapAmb")}
    if any(caps.values()):
        raise SystemExit(f"rogue: capabilities left after dropping them: {caps}")


# -- file descriptors of every kind ----------------------------------------------------------

def open_uffd(features: Feature = CLIENT_FEATURES) -> Userfaultfd:
    """A non-blocking userfaultfd; UFFD_USER_MODE_ONLY unless root (what an unprivileged uid may open
    with vm.unprivileged_userfaultfd=0)."""
    return Userfaultfd.open(features, user_mode_only=os.geteuid() != 0)


def new_memfd(length: int, *, sealing: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
    fd = os.memfd_create("uswap", flags)
    os.ftruncate(fd, length)
    return fd


def reopen(fd: int, flags: int) -> int:
    """Another open file description of the same file (e.g. read-only), through /proc."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def in_private_mount_namespace() -> bool:
    """In a mount namespace other than our parent's (``unshare -m`` execs: the parent is whoever ran it)."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError:
        return False


def fake_memfd(length: int) -> int:
    """A tmpfs file whose /proc/self/fd link reads "/memfd:x": created on a tmpfs of our own and the mount
    then detached (a detached mount's files are named from its root).  Only in a private mount namespace."""
    if not in_private_mount_namespace():
        raise OSError(errno.EPERM, "fake_memfd mounts a tmpfs: run me under `unshare -m`")
    mnt = tempfile.mkdtemp(prefix="rogue-fake-")
    try:
        _libc_check(_libc.mount(b"tmpfs", mnt.encode(), b"tmpfs", 0, None), "mount tmpfs")
        try:
            fd = os.open(os.path.join(mnt, "memfd:x"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, length)
        finally:
            _libc_check(_libc.umount2(mnt.encode(), MNT_DETACH), "umount2")
    finally:
        os.rmdir(mnt)
    return fd


def make_fd(kind: str, length: int = PAGE_SIZE, *, socket_path: str | None = None) -> int:
    """One fd of ``kind`` (FD_KINDS), ours to send and close; OSError if this uid cannot make it."""
    if kind == "memfd":
        return new_memfd(length)
    if kind == "memfd_noseal":
        return new_memfd(length, sealing=False)
    if kind in ("memfd_ro", "memfd_sealed"):
        fd = new_memfd(length)
        if kind == "memfd_sealed":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            return fd
        try:
            return reopen(fd, os.O_RDONLY)
        finally:
            os.close(fd)
    if kind == "tmpfs":
        fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, length)
        return fd
    if kind == "file":
        fd = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, length)
        return fd
    if kind == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r
    if kind == "socket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.close()
        return a.detach()
    if kind == "devnull":
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "uffd":
        return open_uffd().fd
    if kind == "uffd_fork":     # CAP_SYS_PTRACE: root only
        return open_uffd(CLIENT_FEATURES | Feature.EVENT_FORK).fd
    if kind == "uffd_registered":
        # Registered on a private mapping of its own that we then drop: a uffd
        # that looks set up but covers nothing the request names.
        with Mapping(length) as m:
            return os.dup(m.uffd.fd)
    if kind == "epoll":
        ep = select.epoll()
        try:
            return os.dup(ep.fileno())
        finally:
            ep.close()
    if kind == "dir":
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if kind == "daemon_conn":   # the daemon handed a connection to itself
        s = connect(socket_path)
        return s.detach()
    raise ValueError(f"unknown fd kind {kind!r}")


# -- the wire ---------------------------------------------------------------------------------

def connect(path: str, *, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        s.settimeout(timeout)
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


def send_packet(s: socket.socket, data: bytes, fds=()) -> None:
    if fds:
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    else:
        s.sendmsg([data])


def receive(s: socket.socket, timeout: float) -> tuple[str, Reply | None]:
    """("reply", Reply) | ("eof", None) | ("timeout", None) | ("garbage", None); closes fds sent to us."""
    ready, _, _ = select.select([s], [], [], timeout)
    if not ready:
        return "timeout", None
    try:
        data, anc, _, _ = s.recvmsg(1 << 18, socket.CMSG_SPACE(16 * 4))
    except (ConnectionResetError, BrokenPipeError):
        return "eof", None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            for fd in array.array("i", payload[:len(payload) - len(payload) % 4]):
                os.close(fd)
    if not data:
        return "eof", None
    try:
        return "reply", Reply.unpack(data)
    except Exception:
        return "garbage", None


def reply_dict(reply: Reply | None) -> dict | None:
    if reply is None:
        return None
    return {"op": reply.op, "status": reply.status, "errno": errno.errorcode.get(reply.status, str(reply.status)),
            "value": reply.value, "text": reply.text}


def request_bytes(op: int, a: int = 0, b: int = 0, c: int = 0, *, magic: bytes = MAGIC, version: int = VERSION,
                  extra: bytes = b"") -> bytes:
    return REQUEST.pack(magic, version, op & 0xFFFF, a & (2**64 - 1), b & (2**64 - 1), c & (2**64 - 1)) + extra


# -- a client region, set up like uswap_map does it --------------------------------------------

class Mapping:
    """memfd (MFD_ALLOW_SEALING) mapped MAP_SHARED, MADV_DONTFORK, a userfaultfd registered MISSING|WP
    over it: csrc/client/uswap_client.c's dance.  ``backing`` replaces the memfd (it is mapped instead)."""

    def __init__(self, length: int, *, backing: int | None = None, features: Feature = CLIENT_FEATURES,
                 dontfork: bool = True, register: bool = True):
        self.length = length
        self.memfd = new_memfd(length) if backing is None else backing
        self.addr = 0
        self.uffd: Userfaultfd | None = None
        try:
            addr = _libc.mmap(None, length, PROT_RW, MAP_SHARED, self.memfd, 0)
            if addr in (None, MAP_FAILED):
                _libc_check(-1, "mmap")
            self.addr = addr
            if dontfork:
                _libc_check(_libc.madvise(addr, length, MADV_DONTFORK), "madvise")
            self.uffd = open_uffd(features)
            if register:
                self.uffd.register(addr, length, RegisterMode.MISSING | RegisterMode.WP)
        except BaseException:
            self.close()
            raise

    def munmap(self) -> None:
        if self.addr:
            _libc.munmap(self.addr, self.length)
            self.addr = 0

    def drop_uffd(self) -> None:
        """Our copy of the uffd: once the daemon holds its own, closing ours means a daemon that dies or
        lets go leaves plain shared memory behind (no fault can hang this process)."""
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None

    def close(self) -> None:
        # The uffd first: with EVENT_UNMAP negotiated, munmap waits until someone reads the event, and
        # nobody would (a refused MAP leaves our copy the only one).
        self.drop_uffd()
        self.munmap()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RogueRegion:
    def __init__(self, conn: socket.socket, mapping: Mapping, sent_memfd: int):
        self.conn = conn
        self.mapping = mapping
        self.sent_memfd = sent_memfd    # what the daemon got (may differ from the mapped one)

    def close(self) -> None:
        own = self.sent_memfd >= 0 and self.sent_memfd != self.mapping.memfd
        self.conn.close()
        self.mapping.close()
        if own:
            os.close(self.sent_memfd)
        self.sent_memfd = -1


# -- the rogue ----------------------------------------------------------------------------------

class Rogue:
    """Commands against the daemon at ``socket_path``, as whoever runs this process."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.regions: dict[str, RogueRegion] = {}
        self.idle: list[socket.socket] = []

    def dispatch(self, cmd: dict) -> dict:
        args = dict(cmd)
        name = args.pop("cmd")
        return getattr(self, f"cmd_{name}")(**args)

    def close(self) -> None:
        for region in self.regions.values():
            region.close()
        self.regions.clear()
        self.cmd_close_idle()

    # -- raw packets ----------------------------------------------------------------------

    def cmd_packet(self, *, data_hex: str | None = None, op: int = OP_STATUS, a: int = 0, b: int = 0, c: int = 0,
                   size: int | None = None, fds=(), wait: float = 5.0, unread: bool = False) -> dict:
        """One packet on a fresh connection: the reply, then whether the daemon closed the connection.
        ``unread``: wait for the reply to arrive, then close without reading it (the daemon's next
        receive on that connection then fails with ECONNRESET, not EOF)."""
        if data_hex is not None:
            data = bytes.fromhex(data_hex)
        else:
            data = request_bytes(op, a, b, c)
            if size is not None:
                data = (data + b"\xa5" * max(0, size - len(data)))[:size]
        sent = [make_fd(kind, socket_path=self.socket_path) for kind in fds]
        result: dict = {"sent_bytes": len(data), "sent_fds": len(sent)}
        try:
            with connect(self.socket_path) as s:
                try:
                    send_packet(s, data, sent)
                except OSError as e:
                    result["send_error"] = errno.errorcode.get(e.errno, str(e.errno))
                    return result
                finally:
                    for fd in sent:
                        os.close(fd)
                    sent = []
                if unread:
                    result["reply_arrived"] = bool(select.select([s], [], [], wait)[0])
                    return result
                what, reply = receive(s, wait)
                result["reply"] = reply_dict(reply)
                result["first"] = what
                if what == "reply":
                    what, _ = receive(s, wait)
                result["closed"] = what == "eof"
        finally:
            for fd in sent:
                os.close(fd)
        return result

    # -- regions ----------------------------------------------------------------------------

    def cmd_map(self, *, name: str = "r", length: int = 1 << 20, memfd: str = "rw", features=(),
                dontfork: bool = True, send_uffd_of: str | None = None, backing_of: str | None = None,
                keep_uffd: bool = False, wait: float = 10.0) -> dict:
        """The MAP dance with what ``memfd`` says is sent as the memfd:
        rw (the mapped memfd), ro (a read-only fd of it), other / other_sealed (another memfd of the same
        length, plain / sealed against writes), noseal (a memfd made without MFD_ALLOW_SEALING, mapped),
        fake (a tmpfs file named memfd:x, mapped; needs a private mount namespace).
        Reuse: ``send_uffd_of`` sends the uffd of an existing region (kept with ``keep_uffd``) instead of
        the new one; ``backing_of`` maps (and sends) the memfd of an existing region a second time."""
        feats = CLIENT_FEATURES
        for f in features:
            feats |= Feature[f]
        backing = None
        if backing_of is not None:
            backing = os.dup(self.regions[backing_of].mapping.memfd)
        elif memfd == "noseal":
            backing = new_memfd(length, sealing=False)
        elif memfd == "fake":
            backing = fake_memfd(length)
        mapping = Mapping(length, backing=backing, features=feats, dontfork=dontfork)
        result: dict = {"address": mapping.addr, "memfd_link": os.readlink(f"/proc/self/fd/{mapping.memfd}")}
        sent_memfd = mapping.memfd
        try:
            if memfd == "ro":
                sent_memfd = reopen(mapping.memfd, os.O_RDONLY)
            elif memfd in ("other", "other_sealed"):
                sent_memfd = make_fd("memfd_sealed" if memfd == "other_sealed" else "memfd", length)
            uffd_fd = mapping.uffd.fd if send_uffd_of is None else self.regions[send_uffd_of].mapping.uffd.fd
            conn = connect(self.socket_path)
        except BaseException:
            if sent_memfd != mapping.memfd:
                os.close(sent_memfd)
            mapping.close()
            raise
        region = RogueRegion(conn, mapping, sent_memfd)
        try:
            send_packet(conn, Request(OP_MAP, mapping.addr, length).pack(), [uffd_fd, sent_memfd])
            what, reply = receive(conn, wait)
        except OSError as e:
            what, reply = f"error {errno.errorcode.get(e.errno, e.errno)}", None
        result.update(first=what, reply=reply_dict(reply))
        if reply is not None and reply.status == 0:
            if send_uffd_of is None and not keep_uffd:
                mapping.drop_uffd()
            self.regions[name] = region
        else:
            region.close()
        return result

    def _region(self, name: str) -> RogueRegion:
        return self.regions[name]

    def cmd_touch(self, *, name: str = "r", length: int | None = None, value: int = 0x5A) -> dict:
        m = self._region(name).mapping
        n = m.length if length is None else length
        start = time.monotonic()
        ctypes.memset(m.addr, value, n)
        return {"touched": n, "seconds": round(time.monotonic() - start, 3)}

    def cmd_ftruncate(self, *, name: str = "r", size: int = 0) -> dict:
        try:
            os.ftruncate(self._region(name).mapping.memfd, size)
            return {"errno": None}
        except OSError as e:
            return {"errno": errno.errorcode.get(e.errno, str(e.errno))}

    def cmd_seals(self, *, name: str = "r") -> dict:
        seals = fcntl.fcntl(self._region(name).mapping.memfd, fcntl.F_GET_SEALS)
        return {"seals": seals, "shrink": bool(seals & fcntl.F_SEAL_SHRINK), "grow": bool(seals & fcntl.F_SEAL_GROW),
                "seal": bool(seals & fcntl.F_SEAL_SEAL)}

    def cmd_munmap(self, *, name: str = "r") -> dict:
        self._region(name).mapping.munmap()
        return {"munmapped": name}

    def cmd_close(self, *, name: str = "r") -> dict:
        self.regions.pop(name).close()
        return {"closed": name}

    def cmd_conn_state(self, *, name: str = "r", wait: float = 0.0) -> dict:
        """Whether the daemon closed this region's connection (EOF), after waiting up to ``wait``."""
        what, reply = receive(self._region(name).conn, wait)
        return {"state": what, "reply": reply_dict(reply)}

    def cmd_fork(self, *, n: int = 10) -> dict:
        start = time.monotonic()
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        return {"forked": n, "seconds": round(time.monotonic() - start, 3)}

    # -- idle connections -------------------------------------------------------------------------

    def cmd_connect(self, *, n: int = 1, seconds: float = 10.0) -> dict:
        """``n`` connections that never send; connect() is retried while the daemon's backlog is full."""
        deadline = time.monotonic() + seconds
        errors: dict[str, int] = {}
        made = 0
        while made < n and time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            s.setblocking(False)
            try:
                s.connect(self.socket_path)
            except BlockingIOError:       # backlog full (EAGAIN): the daemon has not accepted yet
                s.close()
                time.sleep(0.005)
                continue
            except OSError as e:
                s.close()
                key = errno.errorcode.get(e.errno, str(e.errno))
                errors[key] = errors.get(key, 0) + 1
                time.sleep(0.01)
                continue
            self.idle.append(s)
            made += 1
        return {"connected": made, "errors": errors}

    def cmd_idle_results(self, *, seconds: float = 5.0) -> dict:
        """Wait up to ``seconds`` for the daemon to answer or close the idle connections."""
        start = time.monotonic()
        deadline = start + seconds
        state = {s: {"reply": None, "closed": False} for s in self.idle}
        poller = select.poll()
        by_fd = {s.fileno(): s for s in self.idle}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        pending = set(by_fd)
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0, deadline - time.monotonic()) * 1000):
                what, reply = receive(by_fd[fd], 0)
                if what == "reply":
                    state[by_fd[fd]]["reply"] = reply
                elif what != "timeout":
                    state[by_fd[fd]]["closed"] = True
                    poller.unregister(fd)
                    pending.discard(fd)
        replies: dict[str, int] = {}
        texts: set[str] = set()
        for st in state.values():
            if st["reply"] is not None:
                key = errno.errorcode.get(st["reply"].status, str(st["reply"].status))
                replies[key] = replies.get(key, 0) + 1
                texts.add(st["reply"].text)
        return {"connections": len(state), "closed": sum(st["closed"] for st in state.values()),
                "open": sum(not st["closed"] for st in state.values()), "replies": replies,
                "texts": sorted(texts)[:5], "seconds": round(time.monotonic() - start, 3)}

    def cmd_close_idle(self) -> dict:
        n = len(self.idle)
        for s in self.idle:
            s.close()
        self.idle.clear()
        return {"closed": n}

    # -- the rest ----------------------------------------------------------------------------

    def cmd_status(self, *, wait: float = 10.0) -> dict:
        with connect(self.socket_path) as s:
            send_packet(s, Request(OP_STATUS).pack())
            what, reply = receive(s, wait)
        if reply is None:
            return {"first": what}
        if reply.status:
            return {"reply": reply_dict(reply)}
        return {"status": json.loads(reply.text)}

    def cmd_fuzz(self, *, count: int = 3000, seconds: float = 40.0, seed: int = 0, max_size: int = 2 << 20,
                 max_fds: int = 8) -> dict:
        return Fuzzer(self.socket_path, seed, max_size=max_size, max_fds=max_fds).run(count=count, seconds=seconds)

    def cmd_whoami(self) -> dict:
        return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
                "pid": os.getpid(), "private_mount_ns": in_private_mount_namespace()}

    def cmd_exit(self) -> dict:
        self.close()
        return {"bye": True}


# -- the protocol fuzzer -------------------------------------------------------------------------

class Fuzzer:
    """Thousands of packets: sizes 0..2 MiB (mostly small), 0..8 fds of every kind, headers valid-looking
    or garbage, every op and random ones, MAPs with mismatched fds and some correct MAPs followed by
    garbage on the same connection.  Connections are kept in a small pool, so packets also arrive on
    connections the daemon has answered before (or closed).  Bounded by ``count`` and ``seconds``."""

    POOL = 6
    MAP_LENGTH_PAGES = (1, 2, 16, 64)

    def __init__(self, socket_path: str, seed: int, *, max_size: int = 2 << 20, max_fds: int = 8):
        self.path = socket_path
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_size = max_size        # narrowing a failure down: smaller packets,
        self.max_fds = max_fds          # fewer fds
        # EVENT_FORK needs CAP_SYS_PTRACE: as another uid that kind could only fail
        self.kinds = [k for k in FD_KINDS if k != "uffd_fork" or os.geteuid() == 0]
        self.pool: list[tuple[socket.socket, Mapping | None]] = []
        self.noise = self.rng.randbytes(2 << 20)
        self.hung: list[tuple[socket.socket, Mapping]] = []
        self.failures_in_a_row = 0      # connect() failing 100 times in a row: the daemon is gone
        self.stats: dict = {"seed": seed, "packets": 0, "sent": 0, "maps_ok": 0, "connects": 0, "eofs": 0,
                            "touch_hung": 0, "replies": {}, "send_errors": {}, "connect_errors": {},
                            "fd_errors": {}, "bad_maps_accepted": {}}

    def _count(self, key: str, what: str) -> None:
        self.stats[key][what] = self.stats[key].get(what, 0) + 1

    # -- packet contents ----------------------------------------------------------------------

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.45:
            size = REQUEST.size
        elif r < 0.70:
            size = self.rng.randrange(0, 64)
        elif r < 0.88:
            size = self.rng.randrange(64, 4097)
        elif r < 0.97:
            size = self.rng.randrange(4097, 256 << 10)
        else:
            size = self.rng.randrange(256 << 10, (2 << 20) + 1)
        return min(size, self.max_size)

    def number(self) -> int:
        rng = self.rng
        return rng.choice([0, 1, PAGE_SIZE, PAGE_SIZE - 1, PAGE_SIZE * rng.randrange(1, 1 << 12), 0x10000,
                           1 << 40, 1 << 47, (1 << 57) - PAGE_SIZE, 2**63, 2**64 - PAGE_SIZE, 2**64 - 1,
                           rng.getrandbits(64), rng.getrandbits(32)])

    def header(self) -> bytes:
        rng = self.rng
        magic = MAGIC if rng.random() < 0.85 else rng.choice([b"USWp", b"\0\0\0\0", rng.randbytes(4)])
        version = VERSION if rng.random() < 0.85 else rng.choice([0, 2, 0xFFFF, rng.getrandbits(16)])
        op = rng.choice([OP_MAP, OP_UNMAP, OP_STATUS, OP_STATUS, OP_DETACH, 0, 5, 0xFFFF, rng.getrandbits(16)])
        return request_bytes(op, self.number(), self.number(), self.number() if rng.random() < 0.3 else 0,
                             magic=magic, version=version)

    def payload(self) -> bytes:
        size = self.size()
        start = self.rng.randrange(0, len(self.noise) - size + 1)
        body = self.noise[start:start + size]
        if size >= REQUEST.size and self.rng.random() < 0.8:
            return self.header() + body[REQUEST.size:]
        return body

    def fd_kinds(self) -> list[str]:
        n = min(self.max_fds, self.rng.choices(range(9), weights=[40, 12, 14, 8, 6, 6, 5, 4, 5])[0])
        return [self.rng.choice(self.kinds) for _ in range(n)]

    def make_fds(self, kinds, length: int = PAGE_SIZE) -> list[int]:
        fds = []
        for kind in kinds:
            try:
                fds.append(make_fd(kind, length, socket_path=self.path))
            except OSError as e:
                self._count("fd_errors", f"{kind}:{errno.errorcode.get(e.errno, e.errno)}")
        return fds

    # -- connections ----------------------------------------------------------------------------

    def connect_failed(self, e: OSError) -> None:
        self._count("connect_errors", errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__)
        self.failures_in_a_row += 1

    def connection(self) -> socket.socket | None:
        if self.pool and (len(self.pool) >= self.POOL or self.rng.random() < 0.6):
            return self.rng.choice(self.pool)[0]
        try:
            s = connect(self.path, timeout=2.0)
        except OSError as e:
            self.connect_failed(e)
            time.sleep(0.01)
            return None
        self.stats["connects"] += 1
        self.failures_in_a_row = 0
        self.pool.append((s, None))
        return s

    def drop(self, s: socket.socket) -> None:
        for i, (conn, mapping) in enumerate(self.pool):
            if conn is s:
                del self.pool[i]
                conn.close()
                if mapping is not None:
                    mapping.close()
                return

    def collect(self, s: socket.socket, wait: float) -> None:
        """Read what the daemon said on ``s`` (within ``wait``); drop the connection if it closed."""
        while True:
            what, reply = receive(s, wait)
            if what == "reply":
                self._count("replies", errno.errorcode.get(reply.status, str(reply.status)))
                wait = 0
                continue
            if what in ("eof", "garbage"):
                self.stats["eofs"] += 1
                self.drop(s)
            return

    def send(self, s: socket.socket, data: bytes, fds: list[int]) -> None:
        try:
            send_packet(s, data, fds)
            self.stats["sent"] += 1
        except OSError as e:
            self._count("send_errors", errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "timeout")
            if e.errno != errno.EMSGSIZE:
                self.drop(s)
        finally:
            for fd in fds:
                os.close(fd)

    # -- one step ---------------------------------------------------------------------------------

    def step(self) -> None:
        self.stats["packets"] += 1
        if self.rng.random() < 0.08:
            self.map_attempt()
            return
        s = self.connection()
        if s is None:
            return
        data = self.payload()
        fds = self.make_fds(self.fd_kinds())
        self.send(s, data, fds)
        if any(conn is s for conn, _ in self.pool):
            self.collect(s, self.rng.choice([0, 0, 0.002, 0.02]))

    def map_attempt(self) -> None:
        """A MAP with a real mapping behind it and fds that are right, swapped, or wrong."""
        rng = self.rng
        length = rng.choice(self.MAP_LENGTH_PAGES) * PAGE_SIZE
        try:
            mapping = Mapping(length, dontfork=rng.random() < 0.8)
        except OSError as e:
            self._count("fd_errors", f"mapping:{errno.errorcode.get(e.errno, e.errno)}")
            return
        variant = rng.choice(["right", "right", "swapped", "other_memfd", "short_memfd", "pipe", "three", "one",
                              "header_off", "uffd_unregistered"])
        owned: list[int] = []
        fds = [mapping.uffd.fd, mapping.memfd]
        addr, size = mapping.addr, length
        if variant == "swapped":
            fds.reverse()
        elif variant in ("other_memfd", "short_memfd"):
            owned = self.make_fds(["memfd"], length if variant == "other_memfd" else PAGE_SIZE * 3)
            fds[1:] = owned
        elif variant == "pipe":
            owned = self.make_fds(["pipe"])
            fds[1:] = owned
        elif variant == "three":
            owned = self.make_fds([rng.choice(self.kinds)]) or self.make_fds(["pipe"])
            fds += owned
        elif variant == "one":
            fds = fds[:1]
        elif variant == "header_off":
            addr, size = rng.choice([(addr + PAGE_SIZE, size), (addr, size + PAGE_SIZE), (addr - PAGE_SIZE, size),
                                     (addr + 1, size)])
        elif variant == "uffd_unregistered":
            owned = self.make_fds(["uffd"])
            fds[:1] = owned
        try:
            s = connect(self.path, timeout=2.0)
        except OSError as e:
            self.connect_failed(e)
            mapping.close()
            for fd in owned:
                os.close(fd)
            return
        self.stats["connects"] += 1
        self.failures_in_a_row = 0
        try:
            send_packet(s, Request(OP_MAP, addr, size).pack(), fds)
            self.stats["sent"] += 1
        except OSError as e:
            self._count("send_errors", errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "timeout")
        finally:
            for fd in owned:
                os.close(fd)
        what, reply = receive(s, 2.0)
        if reply is not None:
            self._count("replies", errno.errorcode.get(reply.status, str(reply.status)))
        if reply is not None and reply.status == 0 and variant != "right":
            self._count("bad_maps_accepted", variant)   # a finding: do not touch it (its faults may hang)
            s.close()
            mapping.close()
        elif reply is not None and reply.status == 0:
            self.stats["maps_ok"] += 1
            mapping.drop_uffd()
            if not self.touch(mapping, min(length, 16 * PAGE_SIZE)):   # make the daemon work for it
                self.stats["touch_hung"] += 1
                self.hung.append((s, mapping))   # a thread is stuck in its fault: leave it be
                return
            self.pool.append((s, mapping))
            if len(self.pool) > self.POOL:
                self.drop(self.pool[0][0])
        else:
            if what == "eof":
                self.stats["eofs"] += 1
            s.close()
            mapping.close()

    @staticmethod
    def touch(mapping: Mapping, length: int, timeout: float = 5.0) -> bool:
        """Write the first ``length`` bytes from a thread; False if a fault is not served in time
        (the thread stays blocked until the process exits)."""
        t = threading.Thread(target=ctypes.memset, args=(mapping.addr, 0x77, length), daemon=True)
        t.start()
        t.join(timeout)
        return not t.is_alive()

    def run(self, *, count: int, seconds: float) -> dict:
        start = time.monotonic()
        deadline = start + seconds
        try:
            while self.stats["packets"] < count and time.monotonic() < deadline:
                if self.failures_in_a_row >= 100:
                    self.stats["stopped"] = "the daemon does not accept connections any more"
                    break
                self.step()
        finally:
            while self.pool:
                self.drop(self.pool[0][0])
        self.stats["seconds"] = round(time.monotonic() - start, 2)
        return self.stats


# -- running it as another process ---------------------------------------------------------------

class RogueProcess:
    """This file as a process of its own (``uid``/``gid``/``groups`` through setpriv, after ``prefix``),
    driven with :meth:`call`.  Always :meth:`close` it (a context manager does)."""

    def __init__(self, socket_path: str, *, uid: int | None = None, gid: int | None = None, groups=(),
                 prefix=(), log_path: str | None = None):
        argv = [sys.executable, ROGUE, "--socket", socket_path]
        if uid is not None:
            who = [f"--reuid={uid}", f"--regid={gid if gid is not None else uid}",
                   f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
            # The interpreter may sit where this uid cannot search (/root): CAP_DAC_READ_SEARCH gets it
            # started; the rogue drops it (and every other capability) before doing anything.
            argv = ["setpriv", *who, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *argv,
                    "--drop-caps"]
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([*prefix, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self.pid = self.proc.pid

    def stderr(self) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path) as f:
            return f.read()

    def call(self, cmd: str, *, timeout: float = 60.0, **args) -> dict:
        """Run one command; AssertionError if it fails, times out, or the rogue is gone."""
        if self.proc.poll() is not None:
            raise AssertionError(f"rogue exited with {self.proc.returncode}: {self.stderr()}")
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"rogue command {cmd} {args} took more than {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise AssertionError(f"rogue exited with {self.proc.returncode} during {cmd}: {self.stderr()}")
        result = json.loads(line)
        if "error" in result:
            raise AssertionError(f"rogue command {cmd} {args} failed: {result['error']}")
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, AssertionError):
                self.call("exit", timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()     # by its pid: Popen knows no other
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "RogueProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="a hostile uswap client (tests)")
    p.add_argument("--socket", required=True)
    p.add_argument("--drop-caps", action="store_true", help="drop every capability before anything else")
    p.add_argument("--do", action="append", default=[], metavar="JSON", help="run these commands, then exit")
    args = p.parse_args(argv)
    if args.drop_caps:
        drop_capabilities()
    rogue = Rogue(args.socket)
    commands = (json.loads(c) for c in args.do) if args.do else (json.loads(line) for line in sys.stdin)
    try:
        for cmd in commands:
            try:
                result = rogue.dispatch(cmd)
            except Exception as e:   # reported to the driver, which fails the test with it
                result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(json.dumps(result), flush=True)
            if cmd.get("cmd") == "exit":
                break
    finally:
        rogue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
