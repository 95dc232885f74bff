"""A hostile `uswap run` client (csrc/preload/uswap_run.h), for tests/test_run_hostile.py.

Run as another uid through setpriv (``RunRogue`` in the test file): ``run_rogue.py SOCKET ATTACK [JSON]``
drops every capability, does one attack and prints one JSON line of what it saw.  Handshake attacks
speak the protocol by hand; agent attacks (``agent``) pass a real HELLO with this process's own userfaultfd and
a proof page (the daemon proves the uffd is this process's: uswap/daemon/procimage.py), but name every address
outside one filled window as the agent's own, so the daemon registers, write-protects and evicts that window
only; this process, free to run Python because the rest of its memory is not registered, never writes the
window again and answers the DROPs as told (lies of every kind, or never).  Trust attacks (``setuid_peer``,
``sibling_uffd``, ``exec_after_hello``, ``pid_reused``) try to make the daemon read a process the rogue may
not ptrace, or install pages through another process's uffd.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import json
import mmap
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rogue import drop_capabilities  # noqa: E402
from uswap._core import ffi, lib  # noqa: E402
from uswap.daemon.runproto import MSG_SIZE, message, parse  # noqa: E402
from uswap.protocol import ProtocolError  # noqa: E402

USERFAULTFD_IOC_NEW = 0xAA00
UFFDIO_API = 0xC018AA3F
PS = os.sysconf("SC_PAGE_SIZE")


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)         # blocking: waits while the daemon's backlog is full
    s.settimeout(10)
    return s


def receive(s: socket.socket) -> dict:
    """The next message: its op and status and the fds that came with it (closed), or eof/garbage."""
    try:
        data, anc, _, _ = s.recvmsg(MSG_SIZE + 1, socket.CMSG_SPACE(16))
    except socket.timeout:
        return {"got": "timeout"}
    except OSError as e:
        return {"got": "error", "errno": e.errno}
    fds = [fd for level, kind, payload in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", payload[:len(payload) - len(payload) % 4])]
    for fd in fds:
        os.close(fd)
    if not data:
        return {"got": "eof", "fds": len(fds)}
    if len(data) != MSG_SIZE:
        return {"got": "garbage", "size": len(data), "fds": len(fds), "text": data[24:].decode(errors="replace")}
    m = ffi.new("struct uswap_run_msg *")
    ffi.memmove(m, data, MSG_SIZE)
    return {"got": "msg", "op": m.op, "status": m.status, "fds": len(fds)}


def closed(s: socket.socket, wait: float = 5.0) -> bool:
    """Whether the daemon closed the connection (EOF) within ``wait``."""
    s.settimeout(wait)
    try:
        while True:
            data = s.recv(MSG_SIZE + 1)
            if not data:
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def send_fds(s: socket.socket, data: bytes, fds) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    s.sendmsg([data], anc)


def devfd(s: socket.socket, resident: int = 0) -> int:
    """CONNECT; the /dev/userfaultfd fd the daemon hands over (AssertionError if refused)."""
    s.send(message(lib.USWAP_RUN_CONNECT, resident=resident))
    data, anc, _, _ = s.recvmsg(MSG_SIZE, socket.CMSG_SPACE(4))
    parse(data, lib.USWAP_RUN_DEVFD)
    return array.array("i", anc[0][2])[0]


def new_uffd(dev: int) -> int:
    return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)


def hello(s: socket.socket, fds, **fields) -> dict:
    send_fds(s, message(lib.USWAP_RUN_HELLO, **{"pid": os.getpid(), **fields}), fds)
    return receive(s)


def address(area: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(area))


class Window:
    """``pages`` of anonymous memory (a VMA of its own: MADV_DONTFORK keeps it from merging) and an untouched
    proof page (another VMA: MADV_DONTDUMP); ``fields`` name everything but the window as the agent's, so
    HELLO registers the window only."""

    def __init__(self, pages: int, dontfork: bool = True):
        self.area = mmap.mmap(-1, max(pages, 1) * PS, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.area.madvise(mmap.MADV_DONTFORK if dontfork else mmap.MADV_HUGEPAGE)
        self.proof_area = mmap.mmap(-1, PS, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.proof_area.madvise(mmap.MADV_DONTDUMP)
        self.start, self.proof = address(self.area), address(self.proof_area)
        end = self.start + len(self.area)
        self.fields = {"staging": 0, "staging_len": self.start, "agent_stack": end,
                       "agent_stack_len": (1 << 64) - 1 - end, "proof": self.proof}


MARK = b"rogue-window-pg!"     # in every page of a filled window: the store shows whether it went out


def filled_window(pages: int) -> Window:
    w = Window(pages)
    for off in range(0, pages * PS, PS):
        w.area[off:off + 24] = off.to_bytes(8, "little") + MARK
    return w


def child_uffd(dev: int) -> tuple[int, int]:
    """A uffd made by a forked child (its mm, not ours), and the child's pid; the child blocks in read(2)."""
    to_parent, to_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gate_r, gate_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            send_fds(to_child, b"u", [new_uffd(dev)])
            os.read(gate_r, 1)            # blocked, touching nothing, until killed
        finally:
            os._exit(0)
    _, anc, _, _ = to_parent.recvmsg(1, socket.CMSG_SPACE(4))
    for fd in (gate_r, gate_w):
        os.close(fd)
    to_parent.close()
    to_child.close()
    return array.array("i", anc[0][2])[0], child


# -- handshake attacks: each returns what the daemon answered ------------------------------------------

def attack_connect_only(path: str) -> dict:
    """CONNECT and read the answer: DEVFD (allowed) or READY(-errno) with no fd (refused)."""
    with connect(path) as s:
        s.send(message(lib.USWAP_RUN_CONNECT))
        return receive(s)


def attack_bad_connect(path: str) -> dict:
    out = {}
    m = bytearray(message(lib.USWAP_RUN_CONNECT))
    cases = {"short": bytes(m[:20]), "long": bytes(m) + b"x" * 100, "version": m[:4] + b"\x09\x00" + m[6:],
             "op": m[:6] + lib.USWAP_RUN_DROPPED.to_bytes(2, "little") + m[8:]}
    for name, data in cases.items():
        with connect(path) as s:
            s.send(data)
            out[name] = receive(s)
            out[name]["closed"] = closed(s)
    return out


def attack_bad_hello(path: str) -> dict:
    """After DEVFD: garbage, wrong sizes and headers, 0 / 2 / foreign fds, an API'd uffd, absurd ranges."""
    out = {}
    hello_bytes = bytearray(message(lib.USWAP_RUN_HELLO, pid=os.getpid()))

    def case(name, data: bytes | None = None, make=None, **fields):
        with connect(path) as s:
            dev = devfd(s)
            fds = make(dev) if make else []
            try:
                if data is None:
                    out[name] = hello(s, fds, **fields)
                else:
                    send_fds(s, data, fds)
                    out[name] = receive(s)
            finally:
                for fd in [dev, *fds]:
                    os.close(fd)
            if out[name].get("status") != 0:
                out[name]["closed"] = closed(s)

    proof = Window(0)

    def accepted(name, **fields):
        """A HELLO the daemon accepts (this process's uffd, a fresh proof page), closed at once."""
        with connect(path) as s:
            dev = devfd(s)
            fd = new_uffd(dev)
            page = Window(0)
            try:
                out[name] = hello(s, [fd], proof=page.proof, **fields)
            finally:
                os.close(fd)
                os.close(dev)

    def apid(dev):
        fd = new_uffd(dev)
        api = bytearray(24)
        api[:8] = (0xAA).to_bytes(8, "little")
        fcntl.ioctl(fd, UFFDIO_API, api)
        return [fd]

    def pipe(dev):
        r, w = os.pipe()
        os.close(w)
        return [r]

    case("garbage", os.urandom(17))
    case("short", bytes(hello_bytes[:100]), make=lambda dev: [new_uffd(dev)])
    case("long", bytes(hello_bytes) + b"\0" * 64, make=lambda dev: [new_uffd(dev)])
    case("magic", b"XXXX" + bytes(hello_bytes[4:]), make=lambda dev: [new_uffd(dev)])
    case("op", bytes(message(lib.USWAP_RUN_DROPPED, pid=os.getpid())), make=lambda dev: [new_uffd(dev)])
    case("no_fd")
    case("two_fds", make=lambda dev: [new_uffd(dev), new_uffd(dev)])
    case("pipe", make=pipe)
    case("devfd_itself", make=lambda dev: [os.dup(dev)])
    case("api_done", make=apid)
    case("other_pid", make=lambda dev: [new_uffd(dev)], pid=1)
    case("no_proof", make=lambda dev: [new_uffd(dev)], **{**proof.fields, "proof": 0})
    case("proof_unaligned", make=lambda dev: [new_uffd(dev)], **{**proof.fields, "proof": proof.proof + 8})
    case("proof_unmapped", make=lambda dev: [new_uffd(dev)], **{**proof.fields, "proof": 1 << 46})
    # accepted: ranges that exclude everything (nothing is registered), or that overflow 64 bits
    accepted("exclude_all", staging=0, staging_len=(1 << 64) - 1, agent_stack=(1 << 64) - PS,
             agent_stack_len=(1 << 64) - 1)
    accepted("overflow", staging=(1 << 64) - PS, staging_len=1 << 63, agent_stack=1 << 63,
             agent_stack_len=(1 << 64) - 1)
    return out


def attack_hang_up(path: str) -> dict:
    """Close at every step of the handshake, and stay silent after CONNECT and after DEVFD."""
    out = {}
    with connect(path) as s:
        s.send(message(lib.USWAP_RUN_CONNECT))          # closed before reading DEVFD
    with connect(path) as s:
        os.close(devfd(s))                              # closed after DEVFD
    s1, s2 = connect(path), connect(path)
    s1.send(message(lib.USWAP_RUN_CONNECT))
    os.close(devfd(s2))
    receive(s1)
    t = time.monotonic()
    out["silent_after_devfd_closed"] = closed(s2, 10)   # --map-timeout
    out["waited"] = round(time.monotonic() - t, 1)
    s1.close()
    s2.close()
    return out


def attack_flood(path: str, n: int = 300) -> dict:
    """n connections at once, each CONNECTed: how many got DEVFD, how were the others refused."""
    socks, answers = [], {}
    for _ in range(n):
        try:
            s = connect(path)
            s.send(message(lib.USWAP_RUN_CONNECT))
        except OSError as e:
            answers[f"connect {e.errno}"] = answers.get(f"connect {e.errno}", 0) + 1
            continue
        socks.append(s)
    for s in socks:
        r = receive(s)
        key = ("devfd" if r.get("op") == lib.USWAP_RUN_DEVFD and r["fds"] == 1 else
               f"ready {r['status']}" if r.get("op") == lib.USWAP_RUN_READY and not r["fds"] else
               r["got"] + (" " + r.get("text", "") if r["got"] == "garbage" else ""))
        answers[key] = answers.get(key, 0) + 1
    for s in socks:
        s.close()
    return answers


# -- agent attacks ------------------------------------------------------------------------------------

def answer(drop, mode: str):
    """What this agent answers a DROP with: the truth about a move that never happened, or a lie."""
    m = ffi.new("struct uswap_run_msg *")
    ffi.memmove(m, drop, MSG_SIZE)
    m.op = lib.USWAP_RUN_DROPPED
    n = m.count
    if mode == "claims_all":          # plausible: every page moved (none did)
        pass
    elif mode == "more_bytes":
        m.len[0] += 64 * PS
    elif mode == "huge_bytes":
        m.len[0] = (1 << 63)
    elif mode == "count":
        m.count = 17 if n < 16 else 100
    elif mode == "addr":
        m.addr[0] += 1 << 30
    elif mode == "negative_errno":
        m.len[0] = 0
        m.err[0] = -5
    elif mode == "ebusy":             # honest refusal
        for k in range(n):
            m.len[k], m.err[k] = 0, 16
    elif mode == "short":
        return bytes(ffi.buffer(m))[:MSG_SIZE // 2]
    return bytes(ffi.buffer(m))


def answer_drops(s: socket.socket, mode: str, seconds: float, result: dict) -> None:
    """For ``seconds``, answer each DROP per ``mode`` ("silent": never); counted in ``result`` (drops,
    answered; eof when the daemon closed, not_a_drop when it sent something else)."""
    result["drops"] = result["answered"] = 0
    deadline = time.monotonic() + seconds
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = s.recv(MSG_SIZE + 1)
        except socket.timeout:
            continue
        if not data:
            result["eof"] = True
            return
        result["drops"] += 1
        try:
            parse(data, lib.USWAP_RUN_DROP)
        except ProtocolError:
            result["not_a_drop"] = True
            return
        if mode != "silent":
            s.send(answer(data, mode))
            result["answered"] += 1


def attack_agent(path: str, mode: str, seconds: float = 1.5) -> dict:
    """Fill 16 MiB, then HELLO with this process's uffd over a 256-page budget (only the window registered:
    it is never written again); answer DROPs per ``mode``."""
    s = connect(path)
    dev = devfd(s, resident=PS * 256)
    w = filled_window(4096)
    area = w.area
    uffd = new_uffd(dev)
    result = {"mode": mode}
    try:
        result["ready"] = hello(s, [uffd], **w.fields)
        os.close(uffd)
        os.close(dev)
        answer_drops(s, mode, seconds, result)
        result["own_data_intact"] = all(area[off:off + 8] == off.to_bytes(8, "little")
                                        for off in range(0, len(area), PS))
    finally:
        s.close()
    return result


# -- trust attacks: make the daemon read what this uid may not ptrace -------------------------------------
# The setuid holder (the test builds it) prints "ready" once its secret is in its memory, then sleeps; the
# test ends it (it is root's).

def wait_ready(fd: int) -> None:
    assert os.read(fd, 6) == b"ready\n"


def become(holder: list[str], ready_w: int) -> None:
    """This process execs the setuid holder, its stdout on ``ready_w``."""
    os.dup2(ready_w, 1)
    os.execv(holder[0], holder)


def attack_setuid_peer(path: str, holder: list[str]) -> dict:
    """Issue 18, finding 1: P connects (SO_PEERCRED names P) and execs a setuid-root program holding a secret;
    C, its fork, kept the connection and sends HELLO naming P with C's own uffd.  The daemon must refuse
    before it reads P.  (This process is P; C reports.)"""
    s = connect(path)
    p = os.getpid()
    r, w = os.pipe()
    if os.fork() != 0:
        become(holder, w)
    os.close(w)
    wait_ready(r)
    dev = devfd(s)
    window = Window(0)
    uffd = new_uffd(dev)
    return {"ready": hello(s, [uffd], pid=p, **window.fields), "holder": p,
            "holder_owner": os.stat(f"/proc/{p}").st_uid}


def attack_sibling_uffd(path: str, own: bool = False) -> dict:
    """HELLO for this process with the uffd of a forked sibling (own=True: this process's, the control)."""
    s = connect(path)
    dev = devfd(s)
    window = Window(0, dontfork=False)          # untouched here and in the child
    fd, child = (new_uffd(dev), None) if own else child_uffd(dev)
    try:
        return {"ready": hello(s, [fd], **window.fields)}
    finally:
        os.close(fd)
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        s.close()


def attack_exec_after_hello(path: str, holder: list[str], seconds: float = 3.0) -> dict:
    """A run (this process's own uffd, a 16 MiB window over a 256-page budget) whose process, after READY,
    forks C (which keeps the connection and answers every DROP "all moved") and execs a setuid-root program
    holding a secret: the daemon must read nothing of the new image.  (This process is P; C reports.)"""
    s = connect(path)
    dev = devfd(s, resident=PS * 256)
    w = filled_window(4096)                     # this image's own data: some goes out before the exec
    uffd = new_uffd(dev)
    result = {"ready": hello(s, [uffd], **w.fields), "holder": os.getpid()}
    os.close(dev)
    r, wr = os.pipe()
    if os.fork() != 0:                          # P: a moment for its window to go out, then the exec
        time.sleep(0.5)
        become(holder, wr)
    os.close(wr)
    wait_ready(r)
    answer_drops(s, "claims_all", seconds, result)
    return result


def attack_pid_reused(path: str) -> dict:
    """P connects and exits; this process keeps P's connection, prints P's pid and waits for a line (the test
    starts a root process with that pid meanwhile), then sends HELLO naming it with its own uffd."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = os.fork()
    if p == 0:
        try:
            conn = connect(path)
            send_fds(a, b"s", [conn.fileno()])
        finally:
            os._exit(0)
    _, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(4))
    os.waitpid(p, 0)
    s = socket.socket(fileno=array.array("i", anc[0][2])[0])
    s.settimeout(10)
    print(json.dumps({"pid": p}), flush=True)
    sys.stdin.readline()
    dev = devfd(s)
    window = Window(0)
    uffd = new_uffd(dev)
    return {"ready": hello(s, [uffd], pid=p, **window.fields)}


def main() -> int:
    drop_capabilities()
    path, attack = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    result = globals()[f"attack_{attack}"](path, **args)
    result["uid"] = os.getuid()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
