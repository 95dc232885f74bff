"""Layer 1: the fault engine (csrc/daemon/uswap_engine.c) against a real userfaultfd, in this process.

Each test builds what the daemon builds for a region (a memfd mapped shared,
a userfaultfd registered MISSING|WP with the client's features, a swap map,
a store file read with O_DIRECT and its crc codec), sets page states through
the swap map's transitions and the reclaimer's C calls, installs pages with
the real ioctls, and starts the engine thread, the only reader of the uffd.
A thread of the test then writes or reads a page (C memcpy, GIL released), and
the test looks at what the engine did: the page's data in the memfd, its
entry, the engine's counters and messages, and the uffd-wp bits of the page
table (/proc/self/pagemap).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import select
import struct
import threading
import time

import pytest

from conftest import need
from uswap import uffd
from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer, check, page_copy
from uswap.daemon.engine import FORWARD, Engine
from uswap.daemon.slots import SlotAllocator
from uswap.daemon.swapmap import (ABSENT, BUSY, CLEAN, DIRTY, REFERENCED, STATE_MASK, SWAPPED, WRITEBACK, Budget,
                                  SwapMap, slot_of, state_of)
from uswap.store.checksums import SlotChecksums
from uswap.uffd import CopyMode, FaultFlag, Feature, RegisterMode, Userfaultfd

pytestmark = pytest.mark.kernel

PAGES = 8
SLOTS = 16
# The features the client library asks for (csrc/client/uswap_client.c, UFFD_CLIENT_FEATURES).
CLIENT_FEATURES = Feature.MISSING_SHMEM | Feature.WP_HUGETLBFS_SHMEM | Feature.THREAD_ID | Feature.POISON
PM_UFFD_WP = 1 << 57          # /proc/PID/pagemap: the PTE (or its marker) is uffd write-protected
SETTLE = 0.2                  # how long a blocked thread is given to prove it stays blocked

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def pattern(page: int) -> bytes:
    return (f"page {page:4d} ".encode() * (PAGE_SIZE // 10 + 1))[:PAGE_SIZE]


class Toucher(threading.Thread):
    """Writes ``data`` at ``address`` (or reads a page there when ``data`` is None) with a C
    memcpy, so it blocks in the kernel while its fault is not served, without the GIL."""

    def __init__(self, address: int, data: bytes | None = None):
        super().__init__(daemon=True)
        self.address = address
        self.length = PAGE_SIZE if data is None else len(data)
        self.buf = AlignedBuffer(PAGE_SIZE)
        self.write = data is not None
        if data is not None:
            self.buf.view[:len(data)] = data
        self.done = threading.Event()

    def run(self):
        if self.write:
            page_copy(self.address, self.buf.address, self.length)
        else:
            page_copy(self.buf.address, self.address, self.length)
        self.done.set()


class EngineRig:
    """One region as the daemon sees it, torn down in the daemon's order (engine first)."""

    def __init__(self, workdir, pages: int = PAGES, slots: int = SLOTS):
        self.pages, self.slot_count = pages, slots
        self.memfd = os.memfd_create("uswap-engine-test", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, self.pages * PAGE_SIZE)
        self.addr = _libc.mmap(None, self.pages * PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                               self.memfd, 0)
        assert self.addr not in (None, ctypes.c_void_p(-1).value)
        self.uffd = Userfaultfd.open(CLIENT_FEATURES)
        self.uffd.register(self.addr, self.pages * PAGE_SIZE, RegisterMode.MISSING | RegisterMode.WP)
        store = os.path.join(workdir, "store")
        with open(store, "wb") as f:
            f.truncate((self.slot_count + 1) * PAGE_SIZE)      # slot N at (N + 1) * PAGE_SIZE, as in a store
        self.store_fd = os.open(store, os.O_RDWR | os.O_DIRECT)
        self.codec = SlotChecksums(store, self.slot_count, PAGE_SIZE)
        self.codec_c = self.codec.c_view()
        self.slots = SlotAllocator(self.slot_count, self.codec)
        self.budget = Budget(1 << 20, soft=1 << 20)  # no budget line in the way
        self.map = SwapMap(self.pages, self.budget)
        self.engine: Engine | None = None
        self.touchers: list[Toucher] = []

    def start_engine(self, readahead: int = 1, threads: int = 1) -> Engine:
        self.engine = Engine(self.map, uffd=self.uffd.fd, memfd=self.memfd, addr=self.addr,
                             store_fd=self.store_fd, codec=self.codec_c, slots=self.slots, readahead=readahead,
                             threads=threads)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.uffd.close()                  # wakes a thread still blocked on a fault (the test failed)
        for t in self.touchers:
            t.join(5)
        if self.engine is not None:
            self.engine.close()
        self.map.close()
        _libc.munmap(self.addr, self.pages * PAGE_SIZE)
        os.close(self.memfd)
        os.close(self.store_fd)

    # -- the page, as the test sets it up ---------------------------------------------

    def address(self, page: int) -> int:
        return self.addr + page * PAGE_SIZE

    def set_state(self, page: int, state: int, slot: int = -1) -> None:
        """Through the map's transition (claim, publish), as Python does."""
        assert self.map.claim(page) is not None
        self.map.publish(page, state, slot)

    def install(self, page: int, data: bytes, *, wp: bool) -> None:
        src = AlignedBuffer(PAGE_SIZE)
        src.view[:] = data
        assert self.uffd.copy(self.address(page), src.address, PAGE_SIZE, CopyMode.WP if wp else CopyMode.NONE) \
            == PAGE_SIZE

    def touch(self, page: int, data: bytes | None = None, offset: int = 0) -> Toucher:
        t = Toucher(self.address(page) + offset, data)
        self.touchers.append(t)
        t.start()
        return t

    def end_writeback(self, page: int, slots, keep) -> None:
        """uswap_wb_finish of one page after a successful write (the reclaimer's call)."""
        check(lib.uswap_wb_finish(self.map.c, self.uffd.fd, self.memfd, self.addr, PAGE_SIZE, page, 1, slots, keep,
                                  1, ffi.NULL, ffi.NULL))

    def swap_out_all(self) -> None:
        """Every page SWAPPED, page p in slot p holding pattern(p), written and recorded by the
        reclaimer's C write (so the codec checks them on the way back)."""
        buf = AlignedBuffer(self.pages * PAGE_SIZE)
        for page in range(self.pages):
            buf.view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = pattern(page)
        assert self.slots.allocate(self.pages) == (0, self.pages)
        slots = ffi.new("int64_t[]", list(range(self.pages)))
        check(lib.uswap_wb_write(self.store_fd, self.codec_c, buf.ptr, slots, self.pages, ffi.NULL))
        for page in range(self.pages):
            self.set_state(page, SWAPPED, slot=page)

    def corrupt_slot(self, slot: int) -> None:
        """Flip one bit of a slot on disk, behind the codec's back."""
        buf = AlignedBuffer(PAGE_SIZE)
        offset = (slot + 1) * PAGE_SIZE
        assert lib.uswap_pread_full(self.store_fd, buf.ptr, PAGE_SIZE, offset) == PAGE_SIZE
        buf.view[123] ^= 0x10
        assert lib.uswap_pwrite_full(self.store_fd, buf.ptr, PAGE_SIZE, offset) == PAGE_SIZE

    # -- what the test looks at ----------------------------------------------------------

    def memfd_page(self, page: int) -> bytes:
        return os.pread(self.memfd, PAGE_SIZE, page * PAGE_SIZE)

    def wp_bit(self, page: int) -> bool:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((self.address(page) // PAGE_SIZE) * 8)
            return bool(struct.unpack("<Q", f.read(8))[0] & PM_UFFD_WP)

    def wait_message(self, kind: int, timeout: float = 5.0) -> tuple:
        """The first message of that kind from the engine (the others are returned in order too)."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            select.select([self.engine.notify_fd], [], [], 0.05)
            with contextlib.suppress(BlockingIOError):
                os.read(self.engine.notify_fd, 8)
            for msg in self.engine.drain():
                seen.append(msg)
                if msg[0] == kind:
                    return msg, seen
        raise AssertionError(f"no message of kind {kind} from the engine in {timeout}s; saw {seen}")

    def wait_uffd_readable(self, timeout: float = 5.0) -> None:
        """A fault is queued (nobody reads it yet: the engine is not started)."""
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        assert poller.poll(timeout * 1000), "the toucher's fault never reached the userfaultfd"


@pytest.fixture
def rig(tmp_path):
    need(os.path.exists("/dev/userfaultfd") or os.geteuid() == 0, "no /dev/userfaultfd and not root")
    need(Feature.WP_HUGETLBFS_SHMEM in uffd.supported_features(), "kernel lacks uffd-wp on shmem")
    r = EngineRig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def joined(t: Toucher, timeout: float = 5.0) -> bool:
    return t.done.wait(timeout)


def wait_until(condition, what: str, timeout: float = 5.0) -> None:
    """The engine wakes the faulting thread with its ioctl, then publishes and counts: a test
    that saw the thread go on waits for the rest before it looks."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"the engine never {what}"
        time.sleep(0.001)


def test_stale_wp_fault_on_a_dirty_page_is_resolved_by_the_engine(rig):
    """A WP bit left on a page the map calls DIRTY (writable by definition): the engine lifts it
    for that page only; the write lands, the page stays DIRTY, Python hears nothing."""
    rig.install(0, pattern(0), wp=True)
    rig.install(1, pattern(1), wp=True)
    rig.set_state(0, DIRTY)
    rig.set_state(1, CLEAN, slot=5)                     # a neighbour that must keep its protection
    assert rig.wp_bit(0) and rig.wp_bit(1)              # the pagemap probe sees protection at all
    engine = rig.start_engine()
    writer = rig.touch(0, b"written by the test", offset=100)
    assert joined(writer), "the writer stayed blocked on a DIRTY page"
    wait_until(lambda: engine.stats().engine_faults + engine.stats().forwarded, "finished with the fault")
    assert rig.memfd_page(0) == pattern(0)[:100] + b"written by the test" + pattern(0)[119:]
    assert rig.map.entry(0) & ~REFERENCED == DIRTY      # DIRTY, not BUSY, no slot
    assert (rig.map.state(1), slot_of(rig.map.entry(1))) == (CLEAN, 5)
    assert not rig.wp_bit(0) and rig.wp_bit(1)
    stats = engine.stats()
    assert (stats.engine_faults, stats.forwarded, stats.wp_faults) == (1, 0, 0)
    assert [m for m in engine.drain() if m[0] == FORWARD] == []


@pytest.mark.parametrize("held", [True, False], ids=["writer-holds-busy", "state-only"])
def test_wp_fault_on_a_page_under_writeback_is_forwarded(rig, held):
    """wait_on_page_writeback: the engine forwards the write to Python and never resolves it; the
    writer stays blocked until the test (as Python) ends the writeback, while other faults go on."""
    rig.install(0, pattern(0), wp=not held)
    if held:   # the reclaimer's way: claim, then uswap_wb_prepare write-protects and marks WRITEBACK
        rig.set_state(0, DIRTY)
        assert rig.map.claim(0) is not None
        buf, zero = AlignedBuffer(PAGE_SIZE), ffi.new("uint8_t[]", 1)
        check(lib.uswap_wb_prepare(rig.map.c, rig.uffd.fd, rig.memfd, rig.addr, PAGE_SIZE, 0, 1, buf.ptr, zero))
        assert bytes(buf.view) == pattern(0) and not zero[0]
    else:
        rig.set_state(0, WRITEBACK)
    assert rig.map.state(0) == WRITEBACK and bool(rig.map.entry(0) & BUSY) == held and rig.wp_bit(0)
    engine = rig.start_engine()
    writer = rig.touch(0, b"after writeback", offset=8)
    msg, seen = rig.wait_message(FORWARD)
    assert msg[5] & ~(PAGE_SIZE - 1) == rig.address(0) and msg[6] & FaultFlag.WP, msg
    # Other faults are served meanwhile: a first touch of another page.
    reader = rig.touch(3)
    assert joined(reader), "a fault on another page waited for the writeback"
    wait_until(lambda: engine.stats().engine_faults == 1, "counted the zero fill")
    assert bytes(reader.buf.view) == bytes(PAGE_SIZE) and rig.map.state(3) == DIRTY
    assert not joined(writer, SETTLE), "the engine let a write through to a page under writeback"
    assert rig.memfd_page(0) == pattern(0) and rig.map.state(0) == WRITEBACK and rig.wp_bit(0)
    # End the writeback as Python does: the page is kept (a writer waits), then made writable.
    if held:
        slots, keep = ffi.new("int64_t[]", [7]), ffi.new("uint8_t[]", [1])
        rig.end_writeback(0, slots, keep)
        assert (rig.map.state(0), slot_of(rig.map.entry(0))) == (CLEAN, 7) and rig.wp_bit(0)
        assert not joined(writer, SETTLE)               # still Python's to answer
    assert rig.map.claim(0) is not None
    rig.uffd.write_protect(rig.address(0), PAGE_SIZE, protect=False)   # wakes the writer
    rig.map.publish(0, DIRTY)
    assert joined(writer)
    assert rig.memfd_page(0) == pattern(0)[:8] + b"after writeback" + pattern(0)[23:]
    stats = engine.stats()
    assert (stats.forwarded, stats.engine_faults, stats.zero_fills) == (1, 1, 1)   # the forward; the reader
    assert [m[0] for m in seen + engine.drain()].count(FORWARD) == 1


@pytest.mark.parametrize("evicted_as", [SWAPPED, ABSENT], ids=["swapped", "absent"])
def test_stale_wp_fault_on_an_evicted_page_only_wakes(rig, evicted_as):
    """A WP fault queued on a page that writeback then evicted (punched, SWAPPED or ABSENT) before
    the engine read it: the engine only wakes the writer, whose retry is a MISSING fault the engine
    serves (a swap-in from the slot, or a zero page); no other page loses its protection."""
    data = pattern(0) if evicted_as == SWAPPED else bytes(PAGE_SIZE)   # an all-zero page gets no slot
    rig.install(0, data, wp=False)
    rig.set_state(0, DIRTY)
    rig.install(1, pattern(1), wp=True)
    rig.set_state(1, CLEAN, slot=9)                     # a neighbour that must keep its protection
    # Writeback of page 0, as the reclaimer does it: claim, prepare (write-protect, WRITEBACK) ...
    assert rig.map.claim(0) is not None
    buf, zero = AlignedBuffer(PAGE_SIZE), ffi.new("uint8_t[]", 1)
    check(lib.uswap_wb_prepare(rig.map.c, rig.uffd.fd, rig.memfd, rig.addr, PAGE_SIZE, 0, 1, buf.ptr, zero))
    writer = rig.touch(0, b"late write", offset=40)    # ... a write faults on it (WP), queued unread ...
    rig.wait_uffd_readable()
    slot = -1 if zero[0] else rig.slots.allocate(1)[0]
    slots, keep = ffi.new("int64_t[]", [slot]), ffi.new("uint8_t[]", [0])
    check(lib.uswap_wb_write(rig.store_fd, rig.codec_c, buf.ptr, slots, 1, ffi.NULL))
    rig.end_writeback(0, slots, keep)                   # ... and the write ends: punched, then evicted
    assert rig.map.state(0) == evicted_as and rig.map.state(1) == CLEAN
    assert rig.slots.in_use == (evicted_as == SWAPPED)
    assert not joined(writer, SETTLE)
    engine = rig.start_engine()                         # it reads the stale WP fault first
    assert joined(writer), "the writer was never woken"
    wait_until(lambda: rig.map.entry(0) & (BUSY | STATE_MASK) == DIRTY and engine.stats().engine_faults >= 2,
               "served the retry")
    assert rig.memfd_page(0) == data[:40] + b"late write" + data[50:]
    assert state_of(rig.map.entry(0)) == DIRTY and not rig.map.entry(0) & BUSY
    assert (rig.map.state(1), slot_of(rig.map.entry(1))) == (CLEAN, 9) and rig.wp_bit(1)
    stats = engine.stats()
    assert stats.forwarded == 0 and stats.wp_faults == 0   # nothing forwarded, no CLEAN page made dirty
    assert (stats.pswpin, stats.zero_fills) == ((1, 0) if evicted_as == SWAPPED else (0, 1))
    assert stats.engine_faults >= 2                     # the wake, then the retry's MISSING fault
    assert rig.slots.in_use == 0                        # a page that went in writable has no slot
    assert [m for m in engine.drain() if m[0] == FORWARD] == []


@pytest.mark.parametrize("corrupt", [False, True], ids=["clean", "corrupted-slot"])
def test_a_forward_stream_is_read_ahead_and_a_bad_window_never_goes_in(rig, corrupt):
    """Async readahead: two faults walking forward through full windows start a stream, and the
    engine reads and installs the pages after them before anyone touches them.  Negative control:
    a window whose slot does not verify is given back SWAPPED, never installed; the fault on that
    page then reads it itself and forwards the checksum failure (Python's to retry and poison)."""
    rig.swap_out_all()
    if corrupt:
        rig.corrupt_slot(5)
    engine = rig.start_engine(readahead=2)
    # One thread faults twice, the second near the first (the window is per faulting thread):
    # a full window, entered at its front.
    bufs = [AlignedBuffer(PAGE_SIZE) for _ in range(2)]
    walker = threading.Thread(target=lambda: [page_copy(bufs[p].address, rig.address(p), PAGE_SIZE) for p in (0, 1)],
                              daemon=True)
    walker.start()
    walker.join(5)
    assert not walker.is_alive() and [bytes(b.view) for b in bufs] == [pattern(0), pattern(1)]
    bad = {5, 6} if corrupt else set()   # windows of 2 from page 3: [3, 4], [5, 6], [7]
    wait_until(lambda: engine.stats().readahead == PAGES - 3 - len(bad), "read the stream ahead")
    faults = engine.stats().engine_faults
    for page in range(3, PAGES):
        if page in bad:
            assert rig.map.state(page) == SWAPPED and not rig.map.entry(page) & BUSY   # given back, not in
        else:   # in place before any fault: clean, write-protected, the data of its slot
            assert rig.map.state(page) == CLEAN and rig.memfd_page(page) == pattern(page) and rig.wp_bit(page)
            reader = rig.touch(page)
            assert joined(reader) and bytes(reader.buf.view) == pattern(page)
    assert engine.stats().engine_faults == faults   # none of those reads faulted
    if corrupt:
        reader = rig.touch(5)
        msg, _ = rig.wait_message(FORWARD)
        assert msg[5] & ~(PAGE_SIZE - 1) == rig.address(5) and msg[4] == -errno.EBADMSG, msg
        assert not joined(reader, SETTLE)   # never handed wrong data (or zeros): Python decides
        assert rig.map.state(5) == SWAPPED
        good = rig.touch(6)                 # its neighbour verifies: served as usual
        assert joined(good) and bytes(good.buf.view) == pattern(6)


def engine_threads() -> int:
    """This process's threads named by uswap_start_thread for a region engine."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/self/task/{task}/comm") as f:
            count += f.read().strip() == "uswap-engine"
    return count


class ForwardServer(threading.Thread):
    """What Python does with the faults the engine forwards, as far as this test needs: a fault
    on a page someone holds (EBUSY, EAGAIN) is woken once the page is free (the thread faults
    again, the engine serves it); any other reason is recorded and left blocked (Python would
    read again and poison)."""

    def __init__(self, rig: EngineRig):
        super().__init__(daemon=True)
        self.rig = rig
        self.forwarded: list[tuple[int, int]] = []   # (page, -errno)
        self.messages = 0
        self.stop = threading.Event()

    def run(self):
        rig = self.rig
        while not self.stop.is_set():
            select.select([rig.engine.notify_fd], [], [], 0.01)
            with contextlib.suppress(BlockingIOError):
                os.read(rig.engine.notify_fd, 8)
            for kind, first, count, faulting, slot, address, flags in rig.engine.drain():
                self.messages += 1
                if kind != FORWARD:
                    continue
                page = (address - rig.addr) // PAGE_SIZE
                self.forwarded.append((page, slot))
                if slot in (-errno.EBUSY, -errno.EAGAIN):
                    while rig.map.entry(page) & BUSY:
                        time.sleep(0.0001)
                    rig.uffd.wake(rig.address(page), PAGE_SIZE)


@pytest.mark.parametrize("corrupt", [False, True], ids=["clean", "corrupted-slot"])
def test_fault_threads_serve_eight_threads_on_one_region(tmp_path, corrupt):
    """Four fault threads, eight threads of the client reading and writing every page of one
    swapped-out region at once, each in its own order: every page comes back with its slot's
    data, each is swapped in exactly once (no two threads install one page), the counters add
    up (every page's slot freed by its first write, the rest still held by clean pages), and
    a fault the engine did not serve is one Python would.  Negative control: a slot with a
    flipped bit is still caught with four threads reading: never installed, its fault forwarded
    as a checksum failure."""
    need(Feature.WP_HUGETLBFS_SHMEM in uffd.supported_features(), "kernel lacks uffd-wp on shmem")
    pages, touchers, bad = 256, 8, 77
    rig = EngineRig(tmp_path, pages=pages, slots=2 * pages)
    server = None
    try:
        rig.swap_out_all()
        if corrupt:
            rig.corrupt_slot(bad)
        # readahead 1 with the corrupted slot: a window holding it would send its neighbours' faults to Python
        engine = rig.start_engine(readahead=1 if corrupt else 8, threads=4)
        assert engine_threads() == 4
        server = ForwardServer(rig)
        server.start()
        wanted = [p for p in range(pages) if not (corrupt and p == bad)]
        written = set()
        errors = []

        def client(seed: int) -> None:
            import random
            order = random.Random(seed).sample(wanted, len(wanted))
            buf = AlignedBuffer(PAGE_SIZE)
            for k, page in enumerate(order):
                if (k + seed) % 3 == 0:      # write the page's own pattern back: a WP fault on a clean page
                    buf.view[:] = pattern(page)
                    page_copy(rig.address(page), buf.address, PAGE_SIZE)
                    written.add(page)
                else:
                    page_copy(buf.address, rig.address(page), PAGE_SIZE)
                    if bytes(buf.view) != pattern(page):
                        errors.append(page)

        threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(touchers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client thread never got its page"
        assert errors == []
        for page in wanted:
            assert rig.memfd_page(page) == pattern(page), page
            assert rig.map.state(page) in (CLEAN, DIRTY) and not rig.map.entry(page) & BUSY
            assert (rig.map.state(page) == DIRTY) == (page in written), page
        s = engine.stats()
        assert s.pswpin == len(wanted)                    # each page installed once
        assert s.engine_faults >= len(wanted)
        wait_until(lambda: len(server.forwarded) == engine.stats().forwarded, "reported every fault it forwarded")
        assert all(why in (-errno.EBUSY, -errno.EAGAIN) for _, why in server.forwarded), server.forwarded
        clean = sum(rig.map.state(p) == CLEAN for p in range(pages))
        assert rig.slots.in_use == clean + (1 if corrupt else 0)   # written pages' slots freed, once each
        if corrupt:
            assert rig.map.state(bad) == SWAPPED and rig.memfd_page(bad) == bytes(PAGE_SIZE)
            reader = rig.touch(bad)
            wait_until(lambda: (bad, -errno.EBADMSG) in server.forwarded, "forwarded the bad slot's fault")
            assert not joined(reader, SETTLE)             # never handed the flipped bit (or zeros)
            assert rig.map.state(bad) == SWAPPED and not rig.map.entry(bad) & BUSY
        engine.stop()
        assert engine_threads() == 0                      # every fault thread joined
    finally:
        if server is not None:
            server.stop.set()
            server.join(5)
        rig.close()


def test_the_window_is_per_faulting_thread(rig):
    """Neighbouring faults of two different threads are not a stream: each thread's window starts at one page,
    so nothing is read ahead (the same two faults from one thread are: the test above)."""
    rig.swap_out_all()
    engine = rig.start_engine(readahead=2)
    for page in (0, 1):
        reader = rig.touch(page)
        assert joined(reader) and bytes(reader.buf.view) == pattern(page)
    wait_until(lambda: engine.stats().pswpin == 2, "swapped in both pages")
    time.sleep(SETTLE)
    s = engine.stats()
    assert (s.pswpin, s.readahead) == (2, 0), s
    assert [rig.map.state(p) for p in range(2, PAGES)] == [SWAPPED] * (PAGES - 2)
