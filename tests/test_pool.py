"""Layer 1: the compressed pool (csrc/daemon/uswap_pool.c) through cffi, against a real O_DIRECT store.

The pool is driven as its C callers drive it: uswap_pool_store / _load / _drop / _shrink, and the run
helpers (uswap_pool_write_slots / _read_slots) over a store opened by SwapStore (its crc or AES-GCM codec).
Every page that comes back is compared byte for byte; counters are compared with what was done; the
memory the pool charges is compared with its own stats and with zero once it holds nothing.  The last
tests run the region engine (a real userfaultfd, memfd and engine threads, as tests/test_engine.py) with
a pool behind its codec.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import need, this_uswap_env
from test_engine import CLIENT_FEATURES, PAGES, EngineRig, joined, pattern, wait_until
from uswap import uffd
from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer, page_copy
from uswap.daemon.engine import FORWARD, Engine
from uswap.daemon.swapmap import BUSY, CLEAN, DIRTY, SWAPPED
from uswap.store.mkswap import mkswap
from uswap.store.swapfile import SwapStore
from uswap.uffd import Feature

pytestmark = pytest.mark.kernel

SLOTS = 256
COMPRESSORS = {"lz4": lib.USWAP_POOL_LZ4, "zstd": lib.USWAP_POOL_ZSTD}
WORDS = [w.encode() for w in ("swap", "page", "slot", "fault", "kernel", "memory", "the", "of", "a", "write",
                              "back", "compressed", "pool", "zswap", "budget", "reclaim", "region", "daemon")]


def text_page(seed: int) -> bytes:
    """Text-like: words from a small vocabulary (compresses about 3:1 with lz4)."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < PAGE_SIZE:
        out += rnd.choice(WORDS) + (b"\n" if rnd.random() < 0.1 else b" ")
    return bytes(out[:PAGE_SIZE])


def half_random_page(seed: int) -> bytes:
    """Half random, half zeros (the bench's fill 50 %)."""
    return random.Random(seed).randbytes(PAGE_SIZE // 2) + bytes(PAGE_SIZE // 2)


def random_page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def same_filled_page(word: int) -> bytes:
    return struct.pack("<Q", word) * (PAGE_SIZE // 8)


class Pool:
    """A struct uswap_pool over a store's fd and codec view, with its own charge counter."""

    def __init__(self, store: SwapStore, compressor: str = "lz4", max_bytes: int = 1 << 20, level: int = 0):
        self.charge = ffi.new("int64_t *")
        self.codec_c = store.codec.c_view()
        out = ffi.new("struct uswap_pool **")
        ret = lib.uswap_pool_new(store.slot_count, PAGE_SIZE, COMPRESSORS[compressor], level, max_bytes, store.fd,
                                 self.codec_c, self.charge, out)
        assert ret == 0, os.strerror(-ret)
        self.c = out[0]
        self.codec_c.pool = self.c
        self.fd = store.fd
        self._buf = AlignedBuffer(PAGE_SIZE)
        self._st = ffi.new("struct uswap_pool_stats *")

    def close(self) -> None:
        self.codec_c.pool = ffi.NULL
        lib.uswap_pool_free(self.c)

    def store(self, slot: int, page: bytes) -> int:
        buf = AlignedBuffer(PAGE_SIZE)
        buf.view[:] = page
        return lib.uswap_pool_store(self.c, slot, buf.ptr)

    def load(self, slot: int) -> tuple[int, bytes]:
        buf = AlignedBuffer(PAGE_SIZE)
        ret = lib.uswap_pool_load(self.c, slot, buf.ptr)
        return ret, bytes(buf.view)

    def stats(self):
        lib.uswap_pool_get_stats(self.c, self._st)
        return self._st

    def write_slots(self, first: int, pages: list[bytes]) -> int:
        """Through uswap_pool_write_slots; the pwrites it did."""
        buf = AlignedBuffer(len(pages) * PAGE_SIZE)
        for i, page in enumerate(pages):
            buf.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = page
        ios = ffi.new("uint64_t *")
        ret = lib.uswap_pool_write_slots(self.codec_c, self.fd, buf.ptr, first, len(pages), ios)
        assert ret == 0, os.strerror(-ret)
        return ios[0]

    def read_slots(self, first: int, count: int) -> tuple[int, list[bytes], int, int]:
        """Through uswap_pool_read_slots: (ret, pages, preads, bad index)."""
        buf = AlignedBuffer(count * PAGE_SIZE)
        ios, bad = ffi.new("uint64_t *"), ffi.new("int *")
        ret = lib.uswap_pool_read_slots(self.codec_c, self.fd, buf.ptr, first, count, ios, bad)
        return ret, [bytes(buf.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(count)], ios[0], bad[0]

    def check_charge(self) -> None:
        """The charge counter is what the stats say, and that is the pool's bytes in whole pages."""
        s = self.stats()
        assert self.charge[0] == s.charged_pages == -(-s.pool_bytes // PAGE_SIZE), \
            (self.charge[0], s.charged_pages, s.pool_bytes)


@pytest.fixture
def store_path(tmp_path):
    path = str(tmp_path / "store")
    mkswap(path, (SLOTS + 1) * PAGE_SIZE)
    return path


@contextlib.contextmanager
def opened(store_path, compressor="lz4", encrypt=False, max_bytes=1 << 20):
    with SwapStore.open(store_path, encrypt=encrypt) as store:
        pool = Pool(store, compressor, max_bytes)
        try:
            yield store, pool
        finally:
            pool.close()


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_pages_round_trip_and_incompressible_ones_are_rejected(store_path, compressor):
    """Text-like, half-random and same-filled pages come back byte for byte; random pages are refused (the
    caller writes them), counted as rejected, and take nothing."""
    kinds = {"text": [text_page(i) for i in range(6)], "half": [half_random_page(i) for i in range(6)],
             "same": [same_filled_page(w) for w in (1, 0xdeadbeefcafef00d, 2**64 - 1)]}
    with opened(store_path, compressor) as (store, pool):
        slot, where = 0, {}
        for kind, pages in kinds.items():
            for page in pages:
                assert pool.store(slot, page) == 1, (kind, slot)
                where[slot] = page
                slot += 1
        for i in range(4):
            assert pool.store(100 + i, random_page(i)) == 0
            assert pool.load(100 + i) == (0, bytes(PAGE_SIZE))   # not pooled: the caller reads the store
        for s, page in where.items():
            ret, back = pool.load(s)
            assert ret == 1 and back == page, s
        st = pool.stats()
        assert (st.stored_pages, st.same_filled_pages, st.stores, st.rejected, st.loads) == \
            (len(where), 3, len(where), 4, len(where))
        assert 0 < st.compressed_bytes < 12 * PAGE_SIZE * 3 // 4
        pool.check_charge()
        assert st.pool_bytes >= st.compressed_bytes
        # a pooled slot's store copy is stale: the codec does not trust it
        assert all(pool.codec_c.valid[s] == 0 for s in where)
        pool.check_charge()
        lib.uswap_pool_drop(pool.c, 0, SLOTS)
        st = pool.stats()
        assert (st.stored_pages, st.compressed_bytes, st.pool_bytes, st.charged_pages, pool.charge[0]) == \
            (0, 0, 0, 0, 0)
        assert pool.load(0)[0] == 0


def test_an_incompressible_run_skips_the_attempt_until_a_probe_compresses(store_path):
    """After USWAP_POOL_REJECT_RUN pages in a row that did not compress, only one store in
    USWAP_POOL_PROBE_EVERY tries: the others are rejected at once (counted as rejected and skipped), compressible
    pages among them too; the first probe that compresses ends the run, and every page is tried again."""
    run, every = lib.USWAP_POOL_REJECT_RUN, lib.USWAP_POOL_PROBE_EVERY
    with opened(store_path) as (store, pool):
        for i in range(run):
            assert pool.store(i, random_page(i)) == 0
        st = pool.stats()
        assert (st.rejected, st.skipped) == (run, 0)     # the run's own pages were all tried
        assert pool.store(run, random_page(run)) == 0    # the run's first probe: tried, and it fails
        base = run + 1
        taken = [pool.store(base + k, text_page(k)) for k in range(every)]
        assert taken == [0] * (every - 1) + [1], taken   # skipped until the next probe, which compresses
        st = pool.stats()
        assert (st.rejected, st.skipped) == (run + every, every - 1)
        for k in range(every - 1):                        # rejected at once: not pooled, nothing kept
            assert pool.load(base + k) == (0, bytes(PAGE_SIZE))
        assert pool.load(base + every - 1) == (1, text_page(every - 1))
        # the run has ended: every page is tried again
        assert all(pool.store(base + every + k, text_page(k)) == 1 for k in range(8))
        assert pool.stats().skipped == every - 1
        pool.check_charge()


def test_a_store_replaces_the_slots_entry_and_a_rejected_one_drops_it(store_path):
    with opened(store_path) as (store, pool):
        assert pool.store(7, text_page(1)) == 1
        assert pool.store(7, text_page(2)) == 1
        assert pool.load(7) == (1, text_page(2)) and pool.stats().stored_pages == 1
        assert pool.store(7, random_page(3)) == 0          # the caller writes it: the old entry must not shadow it
        assert pool.load(7)[0] == 0 and pool.stats().stored_pages == 0
        pool.check_charge()
        assert pool.charge[0] == 0


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_max_bytes_holds_and_the_charge_follows(store_path, compressor):
    """A pool of 64 KiB under a stream of stores: never over max_bytes between calls, its oldest pages
    written back to make room (and readable from the store), the charge always what the stats say."""
    # zstd's two cached contexts take about 190 KiB of what the pool may hold
    max_bytes = {"lz4": 64 << 10, "zstd": 256 << 10}[compressor]
    with opened(store_path, compressor, max_bytes=max_bytes) as (store, pool):
        for slot in range(SLOTS):
            assert pool.store(slot, text_page(slot)) == 1
            st = pool.stats()
            assert st.pool_bytes <= max_bytes, (slot, st.pool_bytes)
            pool.check_charge()
        st = pool.stats()
        assert st.written_back > 0 and st.stored_pages + st.written_back == SLOTS
        assert st.write_ios < st.written_back                   # batches of contiguous slots, one pwrite each
        for first in range(0, SLOTS, 32):
            ret, pages, _, _ = pool.read_slots(first, 32)
            assert ret == 0 and pages == [text_page(s) for s in range(first, first + 32)], first
        assert pool.stats().stored_pages > 0
        assert lib.uswap_pool_shrink(pool.c, 0) == st.stored_pages
        pool.check_charge()
        assert (pool.stats().pool_bytes, pool.charge[0]) == (0, 0)


@pytest.mark.parametrize("encrypt", [False, True], ids=["crc", "sealed"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_shrink_writes_entries_back_to_the_store(store_path, compressor, encrypt):
    """Shrink writes the oldest entries to the real O_DIRECT store, encoded by the store's codec; a store
    read gives the same bytes, and a bit flipped on disk is caught by the crc or the seal."""
    pages = {s: same_filled_page(s) for s in range(8)} | {s: text_page(s) for s in range(8, 48)}
    with opened(store_path, compressor, encrypt=encrypt) as (store, pool):
        for s, page in pages.items():
            assert pool.store(s, page) == 1
        assert pool.load(47) == (1, pages[47])                 # zstd: its decompression context exists from here
        st = pool.stats()
        target = st.pool_bytes - st.compressed_bytes // 2      # about half the entries
        written = lib.uswap_pool_shrink(pool.c, target)
        st = pool.stats()
        assert 0 < written == st.written_back < len(pages) and st.pool_bytes <= target
        assert lib.uswap_pool_shrink(pool.c, 0) == len(pages) - written
        st = pool.stats()
        assert (st.stored_pages, st.written_back, st.pool_bytes, pool.charge[0]) == (0, len(pages), 0, 0)
        assert st.write_ios == 2                                # contiguous slots: one pwrite per shrink
        assert all(pool.codec_c.valid[s] for s in pages)
        ret, back, ios, bad = pool.read_slots(0, len(pages))
        assert (ret, ios, bad) == (0, 1, -1) and back == list(pages.values())
        with open(store_path, "rb") as f:
            f.seek((10 + 1) * PAGE_SIZE)
            on_disk = f.read(PAGE_SIZE)
        assert (on_disk == pages[10]) == (not encrypt)           # sealed: ciphertext on disk
        flipped = bytearray(on_disk)
        flipped[100] ^= 0x04
        with open(store_path, "r+b") as f:
            f.seek((10 + 1) * PAGE_SIZE)
            f.write(flipped)
        ret, _, _, bad = pool.read_slots(8, 8)
        assert (ret, bad) == (-errno.EBADMSG, 2)


def test_the_run_helpers_pool_what_compresses_and_write_the_rest(store_path):
    """uswap_pool_write_slots: compressible pages to the pool, each run of rejected ones one pwrite;
    uswap_pool_read_slots: pooled pages from the pool, the rest one pread per run, every byte back."""
    layout = "ttrrtrrrtt"        # t: text (pooled), r: random (written)
    pages = [text_page(i) if k == "t" else random_page(i) for i, k in enumerate(layout)]
    with opened(store_path) as (store, pool):
        assert pool.write_slots(20, pages) == 2               # runs rr, rrr
        st = pool.stats()
        assert (st.stored_pages, st.rejected) == (5, 5)
        assert [pool.codec_c.valid[20 + i] for i in range(10)] == [int(k == "r") for k in layout]
        ret, back, ios, bad = pool.read_slots(20, 10)
        assert (ret, ios, bad) == (0, 2, -1) and back == pages
        assert pool.stats().loads == 5
        # without a pool the helpers are the store alone
        pool.codec_c.pool = ffi.NULL
        assert pool.write_slots(40, pages) == 1
        ret, back, ios, _ = pool.read_slots(40, 10)
        assert (ret, ios) == (0, 1) and back == pages
        ret, _, _, bad = pool.read_slots(20, 10)               # the pooled slots were never written to the store
        assert (ret, bad) == (-errno.ENODATA, 0)
        pool.codec_c.pool = pool.c
        assert lib.uswap_pool_read_slots(pool.codec_c, pool.fd, AlignedBuffer(PAGE_SIZE).ptr, SLOTS, 1, ffi.NULL,
                                         ffi.NULL) == -errno.ERANGE


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_a_damaged_entry_is_never_handed_back(store_path, compressor):
    """P2's negative control: one flipped bit in a pooled page's compressed data fails its load (EBADMSG,
    counted), through the read helper too, and at write-back the page is not written: its slot stays
    untrusted (ENODATA), never the damaged bytes.  Its neighbours are unaffected."""
    with opened(store_path, compressor) as (store, pool):
        for s in range(4):
            assert pool.store(s, text_page(s)) == 1
        assert pool.store(4, same_filled_page(9)) == 1
        assert lib.uswap_pool_damage(pool.c, 4) == -errno.ENOENT    # same-filled: no data to damage
        assert lib.uswap_pool_damage(pool.c, 99) == -errno.ENOENT
        assert lib.uswap_pool_damage(pool.c, 2) == 0
        assert pool.load(2)[0] == -errno.EBADMSG
        assert pool.stats().corrupted == 1
        ret, _, ios, bad = pool.read_slots(0, 4)
        assert (ret, ios, bad) == (-errno.EBADMSG, 0, 2)
        assert pool.stats().corrupted == 2
        for s in (0, 1, 3):
            assert pool.load(s) == (1, text_page(s))
        assert lib.uswap_pool_shrink(pool.c, 0) == 4              # all but the damaged one
        st = pool.stats()
        assert (st.corrupted, st.written_back, st.stored_pages, st.pool_bytes, pool.charge[0]) == (3, 4, 0, 0, 0)
        assert pool.codec_c.valid[2] == 0
        ret, back, _, bad = pool.read_slots(0, 4)
        assert (ret, bad) == (-errno.ENODATA, 2)
        for s in (0, 1, 3):
            assert pool.read_slots(s, 1)[:2] == (0, [text_page(s)])


def stamped(slot: int, version: int, compressible: bool) -> bytes:
    head = struct.pack("<QQ", slot, version)
    body = text_page(slot * 7 + version % 5) if compressible else random_page(slot * 100003 + version)
    return head + body[16:]


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_p1_a_slots_old_data_never_lands_over_its_new_data(store_path, compressor):
    """P1 under concurrency: four threads each own slots they rewrite (into the pool or, random pages, the
    store), read back, and free and reuse (drop, then the codec forgets them, as uswap_slots_release does),
    while a fifth shrinks the pool to random sizes all the time: every read returns the slot's last version,
    never an older one, and a freed slot is never read as data.  With zstd the threads also share the pool's
    cached contexts (each must be handed to one thread at a time)."""
    owners, per, rounds = 4, 16, 300
    failures, done = [], threading.Event()
    with opened(store_path, compressor, max_bytes=48 << 10) as (store, pool):
        def shrinker():
            rnd = random.Random(1)
            while not done.is_set():
                got = lib.uswap_pool_shrink(pool.c, rnd.choice([0, 8 << 10, 24 << 10]))
                if got < 0:
                    failures.append(("shrink", got))

        def owner(k: int):
            rnd = random.Random(k)
            slots = list(range(k * per, (k + 1) * per))
            version = {s: 0 for s in slots}
            expected = {}
            for _ in range(rounds):
                s = rnd.choice(slots)
                op = rnd.random()
                if op < 0.15 and version[s]:
                    lib.uswap_pool_drop(pool.c, s, 1)        # the slot is freed ...
                    pool.codec_c.valid[s] = 0                  # ... and forgotten (uswap_slots_release's order)
                    version[s] = 0
                    ret, _, _, _ = pool.read_slots(s, 1)
                    if ret != -errno.ENODATA:
                        failures.append(("freed slot read", s, ret))
                    continue
                version[s] += 1
                expected[s] = stamped(s, version[s], rnd.random() < 0.7)
                pool.write_slots(s, [expected[s]])
                for _ in range(2):
                    ret, pages, _, _ = pool.read_slots(s, 1)
                    if ret != 0 or pages[0] != expected[s]:
                        failures.append(("read", s, version[s], ret, pages[0][:16]))
                    time.sleep(0)
            for s in slots:
                if version[s]:
                    ret, pages, _, _ = pool.read_slots(s, 1)
                    if ret != 0 or pages[0] != expected[s]:
                        failures.append(("final", s, version[s], ret, pages[0][:16]))

        shrink = threading.Thread(target=shrinker, daemon=True)
        threads = [threading.Thread(target=owner, args=(k,), daemon=True) for k in range(owners)]
        shrink.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        shrink.join(30)
        assert not shrink.is_alive() and not any(t.is_alive() for t in threads)
        assert failures == []
        st = pool.stats()
        assert st.written_back > 0 and st.stores > 0 and st.rejected > 0   # all three paths were taken
        pool.check_charge()
        lib.uswap_pool_drop(pool.c, 0, SLOTS)
        pool.check_charge()
        assert pool.charge[0] == 0


# -- the region engine with a pool ------------------------------------------------------------------------


class PooledRig(EngineRig):
    """tests/test_engine.py's region, with a pool behind its codec and its slot allocator (set before the
    engine starts: it copies the codec)."""

    def __init__(self, workdir, pages: int = PAGES, slots: int = 16):
        super().__init__(workdir, pages=pages, slots=slots)
        self.charge = ffi.new("int64_t *")
        out = ffi.new("struct uswap_pool **")
        assert lib.uswap_pool_new(self.slot_count, PAGE_SIZE, lib.USWAP_POOL_LZ4, 0, 1 << 20, self.store_fd,
                                  self.codec_c, self.charge, out) == 0
        self.pool = out[0]
        self.codec_c.pool = self.pool
        self.slots.c.pool = self.pool
        self._st = ffi.new("struct uswap_pool_stats *")

    def pool_stats(self):
        lib.uswap_pool_get_stats(self.pool, self._st)
        return self._st

    def close(self) -> None:
        super().close()
        self.slots.c.pool = ffi.NULL
        self.codec_c.pool = ffi.NULL
        lib.uswap_pool_free(self.pool)


@pytest.fixture
def pooled_rig(tmp_path):
    need(os.path.exists("/dev/userfaultfd") or os.geteuid() == 0, "no /dev/userfaultfd and not root")
    need(Feature.WP_HUGETLBFS_SHMEM in uffd.supported_features(), "kernel lacks uffd-wp on shmem")
    r = PooledRig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def walk(rig: EngineRig, pages) -> list[bytes]:
    """One thread reads the pages in order (the engine's window is per faulting thread)."""
    bufs = {p: AlignedBuffer(PAGE_SIZE) for p in pages}
    walker = threading.Thread(target=lambda: [page_copy(bufs[p].address, rig.address(p), PAGE_SIZE) for p in pages],
                              daemon=True)
    walker.start()
    walker.join(10)
    assert not walker.is_alive(), "a read of a pooled page never finished"
    return [bytes(bufs[p].view) for p in pages]


@pytest.mark.parametrize("readahead", [1, 4])
def test_the_engine_swaps_pooled_pages_in_with_no_store_read(pooled_rig, readahead):
    """Writeback's C write puts the region's pages in the pool (nothing reaches the store); the engine's
    swap-ins (and, at readahead 4, its async windows) decompress them: the right data, no read I/O, every
    load counted.  A page that goes in writable frees its slot, and its pool entry with it."""
    rig = pooled_rig
    rig.swap_out_all()
    st = rig.pool_stats()
    assert (st.stored_pages, st.stores) == (PAGES, PAGES)
    assert all(rig.codec_c.valid[s] == 0 for s in range(PAGES))   # nothing in the store
    engine = rig.start_engine(readahead=readahead)
    assert walk(rig, range(PAGES)) == [pattern(p) for p in range(PAGES)]
    wait_until(lambda: engine.stats().pswpin == PAGES, "swapped every page in")
    s = engine.stats()
    assert (s.read_ios, s.forwarded) == (0, 0), s
    assert rig.pool_stats().loads == PAGES
    if readahead > 1:
        assert s.readahead > 0
    assert all(rig.map.state(p) == CLEAN and rig.memfd_page(p) == pattern(p) for p in range(PAGES))
    writer = rig.touch(3, b"new", offset=0)                   # a clean page written: its slot is freed ...
    assert joined(writer)
    wait_until(lambda: rig.map.state(3) == DIRTY and rig.slots.in_use == PAGES - 1, "freed the written slot")
    assert rig.pool_stats().stored_pages == PAGES - 1         # ... and its pool entry dropped (P1)


def test_the_engine_reads_the_store_only_for_pages_not_pooled(pooled_rig):
    """A window of pooled and store pages: the store pages are read (one read per run of them) and checked
    by the codec, the pooled ones come from the pool."""
    rig = pooled_rig
    data = {p: (random_page(p) if p in (3, 4, 6) else pattern(p)) for p in range(PAGES)}
    buf = AlignedBuffer(PAGES * PAGE_SIZE)
    for p, page in data.items():
        buf.view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = page
    assert rig.slots.allocate(PAGES) == (0, PAGES)
    slots = ffi.new("int64_t[]", list(range(PAGES)))
    ios = ffi.new("uint64_t *")
    assert lib.uswap_wb_write(rig.store_fd, rig.codec_c, buf.ptr, slots, PAGES, ios) == 0
    assert ios[0] == 2 and rig.pool_stats().stored_pages == PAGES - 3      # runs [3, 4] and [6]
    for page in range(PAGES):
        rig.set_state(page, SWAPPED, slot=page)
    engine = rig.start_engine(readahead=8)
    # The window doubles while one thread faults forward: [0], [1, 2], [3..6] (store runs [3, 4] and [6],
    # pooled 5: two reads in flight at once), [7].
    assert walk(rig, range(PAGES)) == [data[p] for p in range(PAGES)]
    wait_until(lambda: engine.stats().pswpin == PAGES, "swapped every page in")
    assert all(rig.memfd_page(p) == data[p] for p in range(PAGES))
    assert (engine.stats().read_ios, engine.stats().forwarded) == (2, 0)
    assert rig.pool_stats().loads == PAGES - 3


CHILD = """
import ctypes, hashlib, mmap, os, socket, sys
from uswap.core import PAGE_SIZE, AlignedBuffer, page_copy
from uswap.uffd import Feature, RegisterMode, Userfaultfd
sock = socket.socket(fileno=int(sys.argv[1]))
pages = int(sys.argv[2])
_, fds, _, _ = socket.recv_fds(sock, 16, 1)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
addr = libc.mmap(None, pages * PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fds[0], 0)
uffd = Userfaultfd.open(Feature(int(sys.argv[3])))
uffd.register(addr, pages * PAGE_SIZE, RegisterMode.MISSING | RegisterMode.WP)
socket.send_fds(sock, [str(addr).encode()], [uffd.fd])
buf = AlignedBuffer(PAGE_SIZE)
for line in sys.stdin:
    page_copy(buf.address, addr + int(line) * PAGE_SIZE, PAGE_SIZE)
    print(hashlib.sha256(buf.view).hexdigest(), flush=True)
"""


def test_a_damaged_pooled_page_gets_only_its_toucher_sigbus(tmp_path):
    """A client process whose region is swapped out into the pool, one pooled page damaged: the engine
    forwards that page's fault as EBADMSG (never installs it), Python's answer (here the test's) poisons
    it, and the client dies of SIGBUS at that page alone, after its other pages came back right; the
    pool still serves them."""
    import hashlib
    need(Feature.WP_HUGETLBFS_SHMEM in uffd.supported_features(), "kernel lacks uffd-wp on shmem")
    rig = PooledRig(tmp_path)
    bad = 5
    child = engine = client_uffd = server = None
    stop = threading.Event()
    ours, theirs = socket.socketpair()
    try:
        rig.swap_out_all()
        assert lib.uswap_pool_damage(rig.pool, bad) == 0
        # The client: its own mapping of the region's memfd, registered on its own uffd, handed to us.
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno()), str(rig.pages),
                                  str(int(CLIENT_FEATURES))], pass_fds=[theirs.fileno()], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=this_uswap_env())
        theirs.close()   # the child's now
        socket.send_fds(ours, [b"m"], [rig.memfd])
        msg, fds, _, _ = socket.recv_fds(ours, 64, 1)
        client_addr, client_uffd = int(msg), uffd.Userfaultfd.from_fd(fds[0])
        engine = Engine(rig.map, uffd=client_uffd.fd, memfd=rig.memfd, addr=client_addr, store_fd=rig.store_fd,
                        codec=rig.codec_c, slots=rig.slots, readahead=1)
        forwarded = []

        def serve():   # Python's policy for a slot that fails its check: poison (SIGBUS for the toucher)
            while not stop.is_set():
                time.sleep(0.005)
                for kind, _, _, _, why, address, _ in engine.drain():
                    if kind == FORWARD:
                        forwarded.append(((address - client_addr) // PAGE_SIZE, why))
                        if why == -errno.EBADMSG:
                            client_uffd.poison(address & ~(PAGE_SIZE - 1), PAGE_SIZE)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        for page in [p for p in range(rig.pages) if p != bad] + [bad]:
            child.stdin.write(f"{page}\n")
            child.stdin.flush()
            line = child.stdout.readline().strip()
            if page != bad:
                assert line == hashlib.sha256(pattern(page)).hexdigest(), page
        assert child.wait(10) == -signal.SIGBUS
        assert forwarded == [(bad, -errno.EBADMSG)]
        s = engine.stats()
        assert (s.pswpin, s.read_ios) == (rig.pages - 1, 0)
        assert rig.map.state(bad) == SWAPPED and not rig.map.entry(bad) & BUSY
        st = rig.pool_stats()
        assert st.corrupted >= 1 and st.loads == rig.pages - 1
        for page in range(rig.pages):
            if page != bad:
                buf = AlignedBuffer(PAGE_SIZE)
                assert lib.uswap_pool_load(rig.pool, page, buf.ptr) == 1 and bytes(buf.view) == pattern(page)
    finally:
        stop.set()
        if server is not None:
            server.join(5)
        if child is not None:
            if child.poll() is None:
                child.kill()
            child.communicate()   # waits, and closes its pipes
        ours.close()
        theirs.close()
        if engine is not None:
            engine.stop()
            engine.close()
        if client_uffd is not None:
            client_uffd.close()
        rig.close()
