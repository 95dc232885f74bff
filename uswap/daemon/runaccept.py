"""The handshake of a run's process (csrc/preload/uswap_run.h): CONNECT, DEVFD, HELLO, READY.

A connection is a run's process when its first packet is CONNECT (``runproto.is_run_connection``): the daemon
checks the bounds (uswap.daemon.runpolicy), hands over a /dev/userfaultfd fd, the preload (libuswaprun.so)
makes its uffd from it and sends it back with HELLO, the daemon negotiates the events (it holds
CAP_SYS_PTRACE, needed for EVENT_FORK), verifies the peer's image (uswap.daemon.procimage), finds or makes its
run (uswap.daemon.runtree), registers the process's anonymous private writable ranges and answers READY
before the program's main() runs.  A fork child is served from its parent's FORK event on
(uswap.daemon.runevents); its CONNECT|CHILD only pairs the child's agent with it, which gets the child's
uffd back with READY.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import signal
import socket

import trio

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE
from uswap.daemon.mapcheck import check_uffd
from uswap.daemon.procimage import ProcessImage
from uswap.daemon.runprocess import RunProcess
from uswap.daemon.runproto import MSG_SIZE, message, parse
from uswap.daemon.runtree import Run, find_run, parent_pid, run_count
from uswap.protocol import ProtocolError
from uswap.uffd import Userfaultfd

PS = PAGE_SIZE
FEATURES = (lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP | lib.UFFD_FEATURE_EVENT_FORK | lib.UFFD_FEATURE_EVENT_REMAP
            | lib.UFFD_FEATURE_EVENT_REMOVE | lib.UFFD_FEATURE_EVENT_UNMAP | lib.UFFD_FEATURE_THREAD_ID
            | lib.UFFD_FEATURE_POISON | lib.UFFD_FEATURE_MOVE)
CHILD_WAIT = 2.0               # s: a child's HELLO waits this long for the doorbell fault that names it
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


def peer_alive(sock) -> bool:
    """Whether the process that connected ``sock`` (SO_PEERCRED's pid) is still alive: its pidfd (SO_PEERPIDFD,
    Linux 6.5) takes signal 0.  A pidfd names the process, so a pid reused since connect cannot pass."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        return e.errno not in (errno.ESRCH, errno.ENOENT)   # an older kernel (ENOPROTOOPT): not checkable here
    try:
        signal.pidfd_send_signal(fd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                                      # alive, another uid's (a daemon without CAP_KILL)
    finally:
        os.close(fd)
    return True


def refused_fork(daemon, pid: int, uid: int) -> ProtocolError | None:
    """A child's CONNECT whose fork was refused (refuse_fork: its uffd is closed, so its doorbell fault named it
    to nobody), told at once rather than after CHILD_WAIT; None if it is served (or unknown: fork_child_of)."""
    trees = [t for t in daemon.run_trees.values() if t.uid == uid]
    if any(t.member(pid) is not None for t in trees):
        return None
    ppid = parent_pid(pid)
    parent = next((p for t in trees for p in t.members if p.pid == ppid), None) if ppid else None
    if parent is None or not parent.stats.forks_refused:
        return None
    return ProtocolError(f"pid {pid}: its fork was not served ({parent.fork_refusal})", errno.EAGAIN)


async def fork_child_of(daemon, pid: int, uid: int) -> RunProcess:
    """The fork child ``pid`` whose HELLO this is, once its doorbell fault has named it."""
    with trio.move_on_after(CHILD_WAIT):
        while True:
            for t in daemon.run_trees.values():
                p = t.member(pid) if t.uid == uid else None
                if p is not None and p.sock is None:     # only fork children are without a connection
                    return p
            await trio.sleep(0.002)
    raise ProtocolError(f"pid {pid}: no fork of a run names it (no doorbell fault within {CHILD_WAIT:g}s)",
                        errno.ESRCH)


def bind_image(client, sock, uffd: Userfaultfd, proof: int) -> ProcessImage:
    """The peer's image, verified (uswap.daemon.procimage, rules 1-3): opened, readable for the connecting uid,
    still the peer, and the mm ``uffd`` serves.  ProtocolError (``uffd`` closed) if not."""
    try:
        image = ProcessImage(client.pid, client.uid, client.gid)
    except OSError as e:
        uffd.close()
        raise ProtocolError(f"pid {client.pid}: /proc/PID: {e.strerror}", e.errno) from None
    except ProtocolError:
        uffd.close()
        raise
    try:
        # /proc/PID/* name a pid, not a process: opened after the peer died, they may be another process's
        # (pid reuse).  Alive now (its pidfd) means alive since connect, so they are the peer's.
        if not peer_alive(sock):
            raise ProtocolError(f"pid {client.pid} exited during the handshake", errno.ESRCH)
        image.prove(uffd, proof)
    except ProtocolError:
        image.close()
        uffd.close()
        raise
    return image


async def accept_run(daemon, client) -> tuple[RunProcess, bool]:
    """CONNECT, DEVFD, HELLO: negotiate on the process's uffd, register, READY.  A fork child's uffd is the
    one its parent's FORK event gave; it goes back to the child with READY.  Returns the process and
    whether it is new (a child is served already).  ProtocolError if refused."""
    sock = client.sock
    try:
        connect = parse(await sock.recv(MSG_SIZE + 1), lib.USWAP_RUN_CONNECT)
        child = bool(connect.flags & lib.USWAP_RUN_CHILD)
        # Policy first: the fd below gives kernel-mode userfaultfds (uswap.daemon.runpolicy).  A fork child is
        # counted since its fork, or was refused there.
        if child:
            refused = daemon.run_policy.refusal(client.uid) or refused_fork(daemon, client.pid, client.uid)
        else:
            refused = daemon.run_policy.refusal(client.uid, run_count(daemon, client.uid, asking=True))
        if refused:
            raise refused
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:      # e.g. a service with PrivateDevices=yes: no /dev/userfaultfd in its /dev
            raise ProtocolError(f"the daemon cannot open /dev/userfaultfd: {e.strerror}", e.errno) from None
    except ProtocolError as e:
        with contextlib.suppress(OSError):
            await sock.send(message(lib.USWAP_RUN_READY, status=-e.errno))
        raise
    try:
        await sock.sendmsg([message(lib.USWAP_RUN_DEVFD)],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dev]))])
    finally:
        os.close(dev)
    data, ancdata, flags, _ = await sock.recvmsg(MSG_SIZE + 1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
    fds = [fd for level, kind, payload in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", payload[:len(payload) - len(payload) % 4])]
    try:
        hello = parse(data, lib.USWAP_RUN_HELLO)
        if len(fds) != (0 if child else 1) or flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"HELLO takes {0 if child else 1} userfaultfd, got {len(fds)} fds", errno.EINVAL)
        if hello.pid != client.pid:
            raise ProtocolError(f"HELLO names pid {hello.pid}, the connection is pid {client.pid}", errno.EPERM)
        excluded = ((hello.staging, hello.staging_len), (hello.agent_stack, hello.agent_stack_len))
        if child:
            proc = await fork_child_of(daemon, client.pid, client.uid)
            await sock.sendmsg([message(lib.USWAP_RUN_READY, status=0)],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [proc.uffd.fd]))])
            proc.excluded, proc.sock = excluded + ((proc.proof, PS),), sock    # now it rescans and evicts
            return proc, False
        # The bounds again, exactly: other handshakes may have made processes since the CONNECT.  No await from
        # here to RunProcess(), which makes it a member: the count stays true.
        refused = daemon.run_policy.process_refusal(client.uid, run_count(daemon, client.uid, asking=True))
        if refused:
            raise refused
        check_uffd(fds[0], [])
        got, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        ret = lib.uswap_uffd_api(fds[0], FEATURES, got, ioctls)
        if ret < 0:
            raise ProtocolError(f"UFFDIO_API with fork/remap/remove/unmap/move events: {os.strerror(-ret)}", -ret)
        uffd = Userfaultfd.from_fd(fds[0])
        fds = []
        os.set_blocking(uffd.fd, False)
        image = bind_image(client, sock, uffd, hello.proof)
        tree = find_run(daemon, client.pid, client.uid)
        if tree is None:
            asked = connect.resident // PS
            tree = Run(daemon.next_id(), client.uid, client.gid, min(asked, daemon.budget // PS) if asked
                       else daemon.budget // PS, daemon)
        try:
            run = RunProcess(daemon.next_id(), image, sock, uffd, tree=tree, excluded=excluded + ((hello.proof, PS),),
                             doorbell=hello.doorbell, proof=hello.proof, nonce=image.nonce)
        except OSError as e:
            image.close()
            uffd.close()
            if not tree.members:              # a new run whose first process could not be opened
                del daemon.run_trees[tree.id]
            raise ProtocolError(f"pid {client.pid}: /proc/PID/statm: {e.strerror}", e.errno) from None
    except ProtocolError as e:
        for fd in fds:
            os.close(fd)
        try:
            await sock.send(message(lib.USWAP_RUN_READY, status=-e.errno))
        except OSError:
            pass
        raise
    try:
        run.rescan()
        await sock.send(message(lib.USWAP_RUN_READY, status=0))
    except BaseException:          # gone, or the handshake's deadline: nothing opened here outlives it
        run.leave()
        raise
    return run, True
