"""Layer 1: our userfaultfd binding against the real kernel.

Faults are taken by the main thread inside C calls (``page_copy`` releases the
GIL) and served by a Python thread, as the daemon will serve them.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import need
from uswap import uffd
from uswap.core import PAGE_SIZE, AlignedBuffer, page_copy
from uswap.uffd import CopyMode, Feature, Pagefault, RegisterMode, Userfaultfd

pytestmark = pytest.mark.kernel

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def map_memory(length: int, fd: int = -1) -> int:
    flags = mmap.MAP_SHARED if fd >= 0 else mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return addr


@pytest.fixture
def mapping():
    made = []

    def make(length: int, fd: int = -1) -> int:
        addr = map_memory(length, fd)
        made.append((addr, length))
        return addr
    yield make
    for addr, length in made:
        _libc.munmap(addr, length)


def need_uffd() -> None:
    need(os.path.exists("/dev/userfaultfd") or os.geteuid() == 0, "no /dev/userfaultfd and not root")


class FaultServer(threading.Thread):
    """Serves every event with ``resolve(uffd, event)`` until stopped."""

    def __init__(self, fd: Userfaultfd, resolve):
        super().__init__(daemon=True)
        self.uffd = fd
        self.resolve = resolve
        self.events = []
        self.errors = []
        self._stopping = threading.Event()

    def run(self):
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(20):
                continue
            for event in self.uffd.read_events():
                self.events.append(event)
                try:
                    self.resolve(self.uffd, event)
                except Exception as e:  # reported by the test, not lost in a thread
                    self.errors.append(e)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self._stopping.set()
        self.join(5)
        assert not self.errors, self.errors


def pattern_page(index: int) -> bytes:
    return (index.to_bytes(4, "little") + b"uswap-page") * (PAGE_SIZE // 14) + bytes(PAGE_SIZE % 14)


def test_kernel_offers_every_feature_uswap_uses():
    need_uffd()
    have = uffd.supported_features()
    wanted = (Feature.MISSING_SHMEM | Feature.WP_HUGETLBFS_SHMEM | Feature.PAGEFAULT_FLAG_WP | Feature.THREAD_ID
              | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP | Feature.POISON | Feature.MOVE | Feature.WP_ASYNC
              | Feature.MINOR_SHMEM)
    need(wanted in have, f"kernel lacks userfaultfd features {Feature(wanted & ~have)!r}")


def test_missing_features_are_named():
    err = uffd.FeatureMissing(Feature.POISON | Feature.MOVE)
    assert err.errno == errno.EOPNOTSUPP
    assert "POISON" in str(err) and "MOVE" in str(err)


def test_missing_faults_served_with_copy_and_zeropage(mapping):
    need_uffd()
    pages = 16
    region = mapping(pages * PAGE_SIZE)
    src = AlignedBuffer(PAGE_SIZE)

    def resolve(fd, event):
        assert isinstance(event, Pagefault) and not event.is_wp
        index = (event.address - region) // PAGE_SIZE
        page = region + index * PAGE_SIZE
        if index % 2:
            assert fd.zeropage(page, PAGE_SIZE) == PAGE_SIZE
        else:
            src.view[:] = pattern_page(index)
            assert fd.copy(page, src.address, PAGE_SIZE) == PAGE_SIZE

    with Userfaultfd.open(Feature.THREAD_ID) as fd:
        fd.register(region, pages * PAGE_SIZE, RegisterMode.MISSING)
        with FaultServer(fd, resolve) as server:
            out = AlignedBuffer(PAGE_SIZE)
            for index in range(pages):
                page_copy(out.address, region + index * PAGE_SIZE, PAGE_SIZE)
                want = bytes(PAGE_SIZE) if index % 2 else pattern_page(index)
                assert bytes(out.view) == want, f"page {index}"
        assert len(server.events) == pages  # exactly one fault per page, none after the fill
        assert all(e.thread_id == threading.get_native_id() for e in server.events)


def test_multi_page_copy_and_eexist(mapping):
    need_uffd()
    pages = 8
    region = mapping(pages * PAGE_SIZE)
    src = AlignedBuffer(pages * PAGE_SIZE)
    for i in range(pages):
        src.page(i)[:] = pattern_page(i)
    with Userfaultfd.open() as fd:
        fd.register(region, pages * PAGE_SIZE, RegisterMode.MISSING)
        assert fd.copy(region, src.address, pages * PAGE_SIZE) == pages * PAGE_SIZE
        with pytest.raises(FileExistsError):
            fd.copy(region, src.address, PAGE_SIZE)
        assert fd.read_events() == []  # nothing faulted: the pages were there first
    out = AlignedBuffer(pages * PAGE_SIZE)
    page_copy(out.address, region, pages * PAGE_SIZE)
    assert bytes(out.view) == bytes(src.view)


def test_register_rejects_unaligned_range(mapping):
    need_uffd()
    region = mapping(2 * PAGE_SIZE)
    with Userfaultfd.open() as fd:
        with pytest.raises(OSError) as info:
            fd.register(region + 100, PAGE_SIZE, RegisterMode.MISSING)
        assert info.value.errno == errno.EINVAL


def test_write_protect_round_trip_on_shmem(mapping):
    """The daemon's clean-page cycle: install WP, first write arrives as a WP fault."""
    need_uffd()
    pages = 4
    memfd = os.memfd_create("uswap-test", os.MFD_CLOEXEC)
    os.ftruncate(memfd, pages * PAGE_SIZE)
    try:
        region = mapping(pages * PAGE_SIZE, memfd)
        src = AlignedBuffer(PAGE_SIZE)

        def resolve(fd, event):
            page = event.address & ~(PAGE_SIZE - 1)
            if event.is_wp:
                fd.write_protect(page, PAGE_SIZE, protect=False)  # wakes the writer
            else:
                src.view[:] = pattern_page((page - region) // PAGE_SIZE)
                fd.copy(page, src.address, PAGE_SIZE, CopyMode.WP)

        with Userfaultfd.open(Feature.MISSING_SHMEM | Feature.WP_HUGETLBFS_SHMEM | Feature.PAGEFAULT_FLAG_WP) as fd:
            fd.register(region, pages * PAGE_SIZE, RegisterMode.MISSING | RegisterMode.WP)
            with FaultServer(fd, resolve) as server:
                out = AlignedBuffer(PAGE_SIZE)
                page_copy(out.address, region, PAGE_SIZE)             # read: MISSING, installed WP
                assert bytes(out.view) == pattern_page(0)
                new = AlignedBuffer(PAGE_SIZE)
                new.view[:5] = b"hello"
                page_copy(region, new.address, PAGE_SIZE)             # write: WP fault, unprotect, retry
                page_copy(out.address, region, PAGE_SIZE)             # read again: no fault
            kinds = [(e.is_wp, e.is_write) for e in server.events]
            assert kinds == [(False, False), (True, True)]
        # The data went to the memfd (read through the fd, not the mapping).
        assert os.pread(memfd, 5, 0) == b"hello"
    finally:
        os.close(memfd)


def test_minor_fault_resolved_with_continue(mapping):
    need_uffd()
    memfd = os.memfd_create("uswap-minor", os.MFD_CLOEXEC)
    os.ftruncate(memfd, PAGE_SIZE)
    try:
        registered = mapping(PAGE_SIZE, memfd)
        os.pwrite(memfd, b"in the page cache", 0)  # populate the page cache, not the mapping
        with Userfaultfd.open(Feature.MINOR_SHMEM) as fd:
            fd.register(registered, PAGE_SIZE, RegisterMode.MINOR)
            with FaultServer(fd, lambda f, e: f.continue_(e.address & ~(PAGE_SIZE - 1), PAGE_SIZE)) as server:
                out = AlignedBuffer(PAGE_SIZE)
                page_copy(out.address, registered, PAGE_SIZE)
            assert bytes(out.view[:17]) == b"in the page cache"
            assert [e.is_minor for e in server.events] == [True]
    finally:
        os.close(memfd)


def test_move_transfers_a_page(mapping):
    need_uffd()
    dst = mapping(PAGE_SIZE)
    src = mapping(PAGE_SIZE)
    ctypes.memmove(src, pattern_page(7), PAGE_SIZE)  # src is not registered: safe under the GIL
    with Userfaultfd.open(Feature.MOVE) as fd:
        fd.register(dst, PAGE_SIZE, RegisterMode.MISSING)
        assert fd.move(dst, src, PAGE_SIZE) == PAGE_SIZE
    out = AlignedBuffer(PAGE_SIZE)
    page_copy(out.address, dst, PAGE_SIZE)
    assert bytes(out.view) == pattern_page(7)
    assert ctypes.string_at(src, PAGE_SIZE) == bytes(PAGE_SIZE)  # the source is now a fresh zero page


POISON_CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    sys.path.insert(0, {tests!r})
    from test_uffd import map_memory
    from uswap.core import PAGE_SIZE, AlignedBuffer, page_copy
    from uswap.uffd import Feature, RegisterMode, Userfaultfd

    region = map_memory(2 * PAGE_SIZE)
    fd = Userfaultfd.open(Feature.POISON)
    fd.register(region, 2 * PAGE_SIZE, RegisterMode.MISSING)
    src = AlignedBuffer(PAGE_SIZE)
    fd.copy(region + PAGE_SIZE, src.address, PAGE_SIZE)
    fd.poison(region, PAGE_SIZE)
    out = AlignedBuffer(PAGE_SIZE)
    page_copy(out.address, region + PAGE_SIZE, PAGE_SIZE)
    print("healthy page read", flush=True)
    page_copy(out.address, region, PAGE_SIZE)
    print("survived the poisoned page", flush=True)
""")


def test_poison_delivers_sigbus_to_the_toucher():
    need_uffd()
    need(Feature.POISON in uffd.supported_features(), "kernel lacks UFFD_FEATURE_POISON")
    script = POISON_CHILD.format(tests=os.path.dirname(__file__))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGBUS, child.stderr
    assert child.stdout == "healthy page read\n"


def test_read_events_empty_and_closed():
    need_uffd()
    fd = Userfaultfd.open()
    assert fd.read_events() == []
    fd.close()
    assert fd.fd == -1
    fd.close()  # idempotent
