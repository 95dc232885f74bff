"""Run in the NFS test server's network namespace by test_nfs_io: drives csrc/nfs/uswap_nfs_io.c (the
daemon's C data path to an NFS store) through uswap._nfs, and prints what it saw as one JSON line
(progress lines before it for the tests that act on the server meanwhile).

    nfs_io_client.py MODE URL [ARGS...]

Every page written carries its page number and a round number in every 16 bytes, so a page read back
from the wrong place, or a stale one, is caught."""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time

from uswap._nfs import ffi, lib
from uswap.nfs.url import NfsUrl

PAGE = 4096


class NfsIO:
    """uswap_nfs_io_open/pread/pwrite/stats/close, raising OSError for -errno."""

    def __init__(self, url: str, *, commit: bool = False, timeout_ms: int = 60000):
        u = NfsUrl.parse(url)
        address = u.resolve()
        out = ffi.new("struct uswap_nfs_io **")
        err = ffi.new("char[256]")
        rc = lib.uswap_nfs_io_open(u.libnfs_url(address).encode(), address.encode(), u.export.encode(),
                                   u.file.encode(), int(commit), timeout_ms, out, err, len(err))
        if rc < 0:
            raise OSError(-rc, ffi.string(err).decode())
        self.io = out[0]

    def pread(self, buf: bytearray, off: int) -> None:
        rc = lib.uswap_nfs_io_pread(self.io, ffi.from_buffer(buf), len(buf), off)
        if rc != len(buf):
            raise OSError(-rc, os.strerror(-rc)) if rc < 0 else AssertionError(f"read returned {rc}")

    def pwrite(self, buf: bytes, off: int) -> None:
        rc = lib.uswap_nfs_io_pwrite(self.io, ffi.from_buffer(buf), len(buf), off)
        if rc != len(buf):
            raise OSError(-rc, os.strerror(-rc)) if rc < 0 else AssertionError(f"write returned {rc}")

    def stats(self) -> dict:
        st = ffi.new("struct uswap_nfs_io_stats *")
        lib.uswap_nfs_io_stats(self.io, st)
        return {"state": st.state, "since": st.since, "connects": st.connects, "retries": st.retries,
                "most_in_flight": st.most_in_flight, "reads": st.reads, "writes": st.writes,
                "commits": st.commits, "read_bytes": st.read_bytes, "write_bytes": st.write_bytes,
                "last_error": ffi.string(st.last_error).decode(errors="replace")}

    def close(self) -> None:
        lib.uswap_nfs_io_close(self.io)


def pages(first: int, count: int, round_: int) -> bytes:
    return b"".join(struct.pack("<QQ", first + i, round_) * (PAGE // 16) for i in range(count))


def check(buf: bytes, first: int, count: int, round_: int) -> None:
    if buf != pages(first, count, round_):
        for i in range(count):
            got = buf[i * PAGE:i * PAGE + 16]
            if got != struct.pack("<QQ", first + i, round_):
                raise AssertionError(f"page {first + i}: found (page, round) {struct.unpack('<QQ', got)}, "
                                     f"wanted ({first + i}, {round_})")
        raise AssertionError(f"pages {first}..{first + count - 1}: wrong bytes inside a page")


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def round_trip(url: str, commit: str) -> None:
    """1, 8, 32, 256 and 512 pages (more than one READ/WRITE at ganesha's 1 MiB) at several offsets."""
    io = NfsIO(url, commit=commit == "1")
    try:
        done = []
        for count, first in ((1, 0), (1, 3), (8, 17), (32, 100), (256, 1000), (512, 2000), (33, 3000)):
            io.pwrite(pages(first, count, 1), first * PAGE)
            buf = bytearray(count * PAGE)
            io.pread(buf, first * PAGE)
            check(buf, first, count, 1)
            done.append(count)
        # unaligned: 100 bytes at an odd offset, read back inside its page
        io.pwrite(b"x" * 100, 5 * PAGE + 7)
        buf = bytearray(PAGE)
        io.pread(buf, 5 * PAGE)
        assert buf[7:107] == b"x" * 100 and buf[:7] == bytes(7), bytes(buf[:120])
        say(done=done, **io.stats())
    finally:
        io.close()


def server_errors(url: str) -> None:
    """Requests the server refuses, or answers short: what each returned, how long it took."""
    io = NfsIO(url, timeout_ms=3000)
    buf = ffi.from_buffer(bytearray(2 * PAGE))
    try:
        out = {}
        for name, call in (("read_past_eof", lambda: lib.uswap_nfs_io_pread(io.io, buf, 2 * PAGE, 1 << 40)),
                           ("write_too_far", lambda: lib.uswap_nfs_io_pwrite(io.io, buf, PAGE, 1 << 62))):
            t0 = time.monotonic()
            rc = call()
            out[name] = {"rc": rc, "s": time.monotonic() - t0, "last_error": io.stats()["last_error"]}
        say(**out, **io.stats())
    finally:
        io.close()


def concurrent(url: str, threads: str, rounds: str, commit: str) -> None:
    """Threads on disjoint ranges, each writing then reading back 8-page runs, round after round."""
    io = NfsIO(url, commit=commit == "1")
    errors = []

    def worker(t: int) -> None:
        try:
            base = 64 * t
            for r in range(int(rounds)):
                for first in range(base, base + 64, 8):
                    io.pwrite(pages(first, 8, r), first * PAGE)
                for first in range(base, base + 64, 8):
                    buf = bytearray(8 * PAGE)
                    io.pread(buf, first * PAGE)
                    check(buf, first, 8, r)
        except BaseException as e:   # reported, and the test fails on it
            errors.append(f"thread {t}: {e!r}")

    try:
        workers = [threading.Thread(target=worker, args=(t,)) for t in range(int(threads))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        say(errors=errors, **io.stats())
    finally:
        io.close()


def stream(url: str, commit: str, threads: str) -> None:
    """Threads on disjoint ranges writing and reading back 4-page runs, round after round, until a line
    "stop" on stdin (the test kills and restarts the server meanwhile); progress printed every 0.1 s."""
    io = NfsIO(url, commit=commit == "1", timeout_ms=60000)
    errors = []
    ops = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def worker(t: int) -> None:
        try:
            base = 64 * t
            r = 0
            while not stop.is_set():
                for first in range(base, base + 64, 4):
                    io.pwrite(pages(first, 4, r), first * PAGE)
                    buf = bytearray(4 * PAGE)
                    io.pread(buf, first * PAGE)
                    check(buf, first, 4, r)
                    with lock:
                        ops[0] += 1
                for first in range(base, base + 64, 16):   # all of this round's pages, after the fact
                    buf = bytearray(16 * PAGE)
                    io.pread(buf, first * PAGE)
                    check(buf, first, 16, r)
                r += 1
        except BaseException as e:
            errors.append(f"thread {t}: {e!r}")

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    try:
        threading.Thread(target=wait_for_stop, daemon=True).start()
        workers = [threading.Thread(target=worker, args=(t,)) for t in range(int(threads))]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            say(progress=ops[0])
            time.sleep(0.1)
        say(errors=errors, ops=ops[0], **io.stats())
    finally:
        io.close()


def wait_for_go() -> None:
    say(ready=True)
    assert sys.stdin.readline().strip() == "go"


def timeout(url: str, timeout_ms: str) -> None:
    """One read after the test has stopped the server: how long, and what it returned."""
    io = NfsIO(url, timeout_ms=int(timeout_ms))
    try:
        wait_for_go()
        t0 = time.monotonic()
        rc = lib.uswap_nfs_io_pread(io.io, ffi.from_buffer(bytearray(PAGE)), PAGE, 0)
        first = time.monotonic() - t0
        say(rc=rc, waited=first, **io.stats())
        wait_for_go()       # the server is back
        buf = bytearray(PAGE)
        io.pwrite(pages(9, 1, 5), 9 * PAGE)
        io.pread(buf, 9 * PAGE)
        check(buf, 9, 1, 5)
        say(recovered=True, **io.stats())
    finally:
        io.close()


def close_while_waiting(url: str) -> None:
    """A thread waits on a dead server; close from another thread must end its wait with -ESHUTDOWN."""
    io = NfsIO(url, timeout_ms=60000)
    wait_for_go()
    result = {}

    def reader() -> None:
        result["rc"] = lib.uswap_nfs_io_pread(io.io, ffi.from_buffer(bytearray(PAGE)), PAGE, 0)
        result["returned"] = time.monotonic()

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(1.0)
    alive = t.is_alive()
    closing = time.monotonic()
    io.close()
    closed = time.monotonic()
    t.join(10)
    say(waiting_before_close=alive, rc=result.get("rc"), close_s=closed - closing,
        returned_s=result["returned"] - closing if "returned" in result else None)


def open_error(url: str) -> None:
    try:
        NfsIO(url, timeout_ms=5000).close()
        say(rc=0)
    except OSError as e:
        say(rc=-e.errno, message=e.strerror)


def bench(url: str, n: str) -> None:
    """p50/p90 of a 4 KiB read: uswap_nfs_io_pread vs uswap.nfs.store.read_at (NfsConnection, trio),
    interleaved in blocks, same server, same file."""
    import trio
    from uswap.core import AlignedBuffer
    from uswap.nfs.connection import NfsConnection
    from uswap.nfs.store import read_at

    n = int(n)
    io = NfsIO(url)
    c_times, py_times = [], []
    buf = bytearray(PAGE)
    cbuf = ffi.from_buffer(buf)

    async def python_block(conn, count: int) -> None:
        abuf = AlignedBuffer(PAGE)
        for i in range(count):
            t0 = time.perf_counter_ns()
            await read_at(conn, ((i % 256) + 1) * PAGE, PAGE, abuf.ptr)
            py_times.append(time.perf_counter_ns() - t0)

    async def main() -> None:
        conn = await NfsConnection.connect(NfsUrl.parse(url), file_flags=os.O_RDWR)
        try:
            for _ in range(4):
                for i in range(n // 4):
                    t0 = time.perf_counter_ns()
                    rc = lib.uswap_nfs_io_pread(io.io, cbuf, PAGE, ((i % 256) + 1) * PAGE)
                    c_times.append(time.perf_counter_ns() - t0)
                    assert rc == PAGE, rc
                await python_block(conn, n // 4)
        finally:
            conn.close()

    try:
        trio.run(main)
    finally:
        io.close()

    def pct(times, p):
        return sorted(times)[int(len(times) * p)] / 1000

    say(n=len(c_times), c_p50_us=pct(c_times, 0.5), c_p90_us=pct(c_times, 0.9),
        python_p50_us=pct(py_times, 0.5), python_p90_us=pct(py_times, 0.9))


MODES = {"round_trip": round_trip, "server_errors": server_errors, "concurrent": concurrent, "stream": stream, "timeout": timeout,
         "close_while_waiting": close_while_waiting, "open_error": open_error, "bench": bench}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
