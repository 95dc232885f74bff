"""Store sets: several stores behind one daemon, like swapon -p (uswap.store.storeset, csrc/daemon/uswap_storeset.c).

Layer 2 (the set's layout and transfers in C, on real store files, and the allocator's priority groups), then
layer 4: real daemons on two or three real stores, real userfaultfd clients, every word verified.
"""

from __future__ import annotations

import errno
import os
import signal
import time
import subprocess

import pytest

from conftest import uswap
from test_install import parse_exposition, sample
from test_nfs import mkswap as nfs_mkswap, nfs  # noqa: F401 (nfs: the fixture)
from test_region_daemon import corrupt_slots, finish_holder, run_hog, start_holder
from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.daemon.slots import NoSlots, SlotAllocator
from uswap.store.mkswap import mkswap

MiB = 1 << 20
CLUSTER = lib.USWAP_SET_CLUSTER


# -- layer 2: the set in C, the allocator's groups ----------------------------------------------------------

class CSet:
    """A uswap_storeset over real store files, by fd (O_DIRECT, as the daemon opens them)."""

    def __init__(self, paths_prios: list[tuple[str, int]], copies: int = 1):
        self.fds = [os.open(p, os.O_RDWR | os.O_DIRECT) for p, _ in paths_prios]
        members = ffi.new("struct uswap_set_member[]", len(self.fds))
        for m, fd, (path, prio) in zip(members, self.fds, paths_prios):
            m.prio, m.fd, m.slots = prio, fd, os.path.getsize(path) // PAGE_SIZE - 1
        out = ffi.new("struct uswap_storeset **")
        assert lib.uswap_storeset_new(PAGE_SIZE, members, len(self.fds), copies, out) == 0
        self.c = out[0]

    def locate(self, v: int, copy: int = 0) -> tuple[int, int, int]:
        m, slot, run = ffi.new("uint32_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        assert lib.uswap_storeset_locate(self.c, v, copy, m, slot, run) == 0
        return m[0], slot[0], run[0]

    def write(self, first: int, buf: AlignedBuffer) -> int:
        return lib.uswap_storeset_pwrite(self.c, buf.ptr, buf.size, (first + 1) * PAGE_SIZE)

    def read(self, first: int, count: int) -> tuple[int, bytes]:
        back = AlignedBuffer(count * PAGE_SIZE)
        return lib.uswap_storeset_pread(self.c, back.ptr, back.size, (first + 1) * PAGE_SIZE), bytes(back.view)

    def stats(self, member: int):
        s = ffi.new("struct uswap_set_member_stats *")
        lib.uswap_storeset_stats(self.c, member, s)
        return s

    def close(self):
        lib.uswap_storeset_free(self.c)
        for fd in self.fds:
            os.close(fd)


def pattern(first_slot: int, count: int) -> AlignedBuffer:
    buf = AlignedBuffer(count * PAGE_SIZE)
    for i in range(count):
        buf.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = (first_slot + i).to_bytes(8, "little") * (PAGE_SIZE // 8)
    return buf


def member_page(path: str, slot: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = AlignedBuffer(PAGE_SIZE)
        assert lib.uswap_pread_full(fd, buf.ptr, PAGE_SIZE, (slot + 1) * PAGE_SIZE) == PAGE_SIZE
        return bytes(buf.view)
    finally:
        os.close(fd)


def test_a_transfer_across_cluster_boundaries_lands_in_each_member_and_reads_back(tmp_path):
    """Three members, two of one priority (one of them smaller) and one higher: the layout is the higher one,
    then the other two striped cluster by cluster until the smaller is full; a write over two cluster
    boundaries is split there, each piece at its member's own slot, and reads back whole."""
    paths = [str(tmp_path / n) for n in ("low-a", "low-b", "high")]
    for path, size in zip(paths, (3 * CLUSTER + 10, 1 * CLUSTER + 5, 2 * CLUSTER)):
        mkswap(path, (size + 1) * PAGE_SIZE)
    s = CSet([(paths[0], 0), (paths[1], 0), (paths[2], 7)])
    try:
        assert lib.uswap_storeset_slot_count(s.c) == (2 + 3 + 1) * CLUSTER     # whole clusters only
        ends = ffi.new("uint64_t[]", 4)
        assert lib.uswap_storeset_groups(s.c, ends, 4) == 2
        assert list(ends[0:2]) == [2 * CLUSTER, 6 * CLUSTER]
        H = 2 * CLUSTER     # the low group's first slot
        assert s.locate(0) == (2, 0, CLUSTER) and s.locate(CLUSTER + 3) == (2, CLUSTER + 3, CLUSTER - 3)
        assert s.locate(H + 5) == (0, 5, CLUSTER - 5)                    # round 0: a, then b
        assert s.locate(H + CLUSTER) == (1, 0, CLUSTER)
        assert s.locate(H + 2 * CLUSTER + 1) == (0, CLUSTER + 1, CLUSTER - 1)   # b is full: a alone
        assert s.locate(H + 3 * CLUSTER) == (0, 2 * CLUSTER, CLUSTER)

        first, count = H + CLUSTER - 3, CLUSTER + 6      # a's last 3 of cluster 0, all of b's, 3 of a's next
        buf = pattern(first, count)
        expect = bytes(buf.view)
        assert lib.uswap_storeset_pwrite(s.c, buf.ptr, count * PAGE_SIZE, (first + 1) * PAGE_SIZE) == \
            count * PAGE_SIZE
        assert (s.stats(0).writes, s.stats(1).writes, s.stats(2).writes) == (2, 1, 0)
        assert s.stats(1).write_bytes == CLUSTER * PAGE_SIZE
        back = AlignedBuffer(count * PAGE_SIZE)
        assert lib.uswap_storeset_pread(s.c, back.ptr, count * PAGE_SIZE, (first + 1) * PAGE_SIZE) == \
            count * PAGE_SIZE
        assert bytes(back.view) == expect
        # each piece is where locate says, in the member's own slots
        assert member_page(paths[0], CLUSTER - 3) == expect[:PAGE_SIZE]
        assert member_page(paths[1], 0) == expect[3 * PAGE_SIZE:4 * PAGE_SIZE]
        assert member_page(paths[0], CLUSTER) == expect[(CLUSTER + 3) * PAGE_SIZE:(CLUSTER + 4) * PAGE_SIZE]
        # where the engine's io_uring rings read it: the first piece's file and offset
        fd, at = ffi.new("int *"), ffi.new("uint64_t *")
        assert lib.uswap_storeset_local(s.c, (first + 1) * PAGE_SIZE, count * PAGE_SIZE, fd, at) == 3 * PAGE_SIZE
        assert (fd[0], at[0]) == (s.fds[0], (CLUSTER - 3 + 1) * PAGE_SIZE)
        assert lib.uswap_storeset_local(s.c, (H + CLUSTER + 1) * PAGE_SIZE, 2 * PAGE_SIZE, fd, at) == 2 * PAGE_SIZE
        assert (fd[0], at[0]) == (s.fds[1], PAGE_SIZE)
        # not whole slots, the header page, past the end: refused before any I/O
        for length, offset in ((100, PAGE_SIZE), (PAGE_SIZE, 0), (2 * PAGE_SIZE, 6 * CLUSTER * PAGE_SIZE)):
            assert lib.uswap_storeset_pread(s.c, back.ptr, length, offset) == -22
        assert sum(s.stats(i).errors for i in range(3)) == 0
    finally:
        s.close()


class BrokenMember:
    """Member ``i``'s fd made to fail every transfer (a directory's fd in its place: reads EISDIR, writes
    EBADF) while the block runs; the real file is put back afterwards."""

    def __init__(self, s: CSet, i: int, tmp_path):
        self.s, self.i, self.tmp_path = s, i, tmp_path

    def __enter__(self):
        self.saved = os.dup(self.s.fds[self.i])
        directory = os.open(str(self.tmp_path), os.O_RDONLY | os.O_DIRECTORY)
        os.dup2(directory, self.s.fds[self.i])
        os.close(directory)

    def __exit__(self, *exc):
        os.dup2(self.saved, self.s.fds[self.i])
        os.close(self.saved)


def test_two_copies_fall_back_to_the_other_and_resync_copies_back_what_a_member_missed(tmp_path):
    """--copies 2 over two files of one priority: each slot is at two members (never both at one), a write
    lands at both; with one member failing, reads come from the other (a fallback counted at the one that
    failed) and writes keep one copy, marking the missed cluster stale; resync copies it back, after which
    the other member can fail and the new data still reads back."""
    paths = [str(tmp_path / n) for n in ("a", "b")]
    for path in paths:
        mkswap(path, (4 * CLUSTER + 1) * PAGE_SIZE)
    s = CSet([(paths[0], 0), (paths[1], 0)], copies=2)
    try:
        assert lib.uswap_storeset_copies(s.c) == 2
        assert lib.uswap_storeset_slot_count(s.c) == 4 * CLUSTER        # 8 clusters of room, two copies each
        assert s.stats(0).slots == s.stats(1).slots == 4 * CLUSTER
        assert s.locate(5, 0) == (0, 5, CLUSTER - 5) and s.locate(5, 1) == (1, CLUSTER + 5, CLUSTER - 5)
        assert s.locate(CLUSTER, 0) == (1, 0, CLUSTER) and s.locate(CLUSTER, 1) == (0, CLUSTER, CLUSTER)
        assert s.locate(2 * CLUSTER + 1, 0) == (0, 2 * CLUSTER + 1, CLUSTER - 1)
        assert s.locate(2 * CLUSTER + 1, 1) == (1, 3 * CLUSTER + 1, CLUSTER - 1)
        places = {(s.locate(v, c)[0], s.locate(v, c)[1]) for v in range(4 * CLUSTER) for c in (0, 1)}
        assert len(places) == 8 * CLUSTER                                  # every place holds one copy
        assert all(s.locate(v, 0)[0] != s.locate(v, 1)[0] for v in range(4 * CLUSTER))

        old = pattern(0, 2 * CLUSTER)
        assert s.write(0, old) == old.size
        assert member_page(paths[0], 7) == member_page(paths[1], CLUSTER + 7) == bytes(old.view[7 * PAGE_SIZE:
                                                                                            8 * PAGE_SIZE])
        assert (s.stats(0).writes, s.stats(1).writes) == (2, 2)
        fd, at = ffi.new("int *"), ffi.new("uint64_t *")
        assert lib.uswap_storeset_local(s.c, PAGE_SIZE, PAGE_SIZE, fd, at) == -errno.ENXIO   # reads choose

        new = pattern(1000, 3)
        with BrokenMember(s, 0, tmp_path):
            assert s.read(3, 2) == (2 * PAGE_SIZE, bytes(old.view[3 * PAGE_SIZE:5 * PAGE_SIZE]))   # from b
            a = s.stats(0)
            assert (a.down, a.fallbacks, a.errors, a.last_error) == (1, 1, 1, -errno.EISDIR)
            assert s.write(10, new) == new.size                             # b only: a is down
            assert s.read(10, 3) == (new.size, bytes(new.view))
            assert (s.stats(0).stale_slots, s.stats(1).stale_slots) == (CLUSTER, 0)
            assert s.stats(0).writes == 2                                   # not tried while down
            assert lib.uswap_storeset_resync(s.c, 100) == 1                 # a's probe fails: still behind
            assert s.stats(0).down == 1
        assert member_page(paths[0], 10) == bytes(old.view[10 * PAGE_SIZE:11 * PAGE_SIZE])    # a missed it
        assert lib.uswap_storeset_resync(s.c, 100) == 0
        a = s.stats(0)
        assert (a.down, a.stale_slots, a.resynced_slots) == (0, 0, CLUSTER)
        assert member_page(paths[0], 10) == bytes(new.view[:PAGE_SIZE])
        with BrokenMember(s, 1, tmp_path):
            assert s.read(10, 3) == (new.size, bytes(new.view))            # from a, resynchronised
            assert s.read(CLUSTER + 1, 1) == (PAGE_SIZE, bytes(old.view[(CLUSTER + 1) * PAGE_SIZE:
                                                                        (CLUSTER + 2) * PAGE_SIZE]))
            assert s.stats(1).fallbacks == 1
    finally:
        s.close()


def test_a_write_that_fails_at_every_copy_fails_and_marks_nothing(tmp_path):
    """Both members failing: the write fails (the caller keeps its pages), no copy is marked stale (the
    cluster's other slots are still good at both), and a read fails with the member's error."""
    paths = [str(tmp_path / n) for n in ("a", "b")]
    for path in paths:
        mkswap(path, (2 * CLUSTER + 1) * PAGE_SIZE)
    s = CSet([(paths[0], 0), (paths[1], 0)], copies=2)
    try:
        with BrokenMember(s, 0, tmp_path), BrokenMember(s, 1, tmp_path):
            buf = pattern(0, 4)
            assert s.write(0, buf) == -errno.EBADF
            assert s.read(0, 1)[0] == -errno.EISDIR
        assert (s.stats(0).stale_slots, s.stats(1).stale_slots) == (0, 0)
        assert (s.stats(0).down, s.stats(1).down) == (1, 1)
        assert lib.uswap_storeset_resync(s.c, 100) == 0
        assert (s.stats(0).down, s.stats(1).down) == (0, 0)               # both answer again
    finally:
        s.close()


def test_copies_need_two_stores_of_each_priority_in_c():
    members = ffi.new("struct uswap_set_member[]", 3)
    for m, prio in zip(members, (0, 0, 1)):
        m.prio, m.fd, m.slots = prio, 0, 4 * CLUSTER
    out = ffi.new("struct uswap_storeset **")
    assert lib.uswap_storeset_new(PAGE_SIZE, members, 3, 2, out) == -errno.EINVAL    # prio 1 has one
    assert lib.uswap_storeset_new(PAGE_SIZE, members, 2, 3, out) == -errno.EINVAL    # at most 2 copies
    members[1].slots = CLUSTER                                                       # less than a unit
    assert lib.uswap_storeset_new(PAGE_SIZE, members, 2, 2, out) == -errno.EINVAL


def test_the_allocator_fills_the_first_group_before_the_next():
    slots = SlotAllocator(300, groups=(100, 300))
    assert slots.allocate(64) == (0, 64)
    assert slots.allocate(64) == (64, 36)            # the rest of group 0, not a whole run in group 1
    assert slots.allocate(64) == (100, 64)           # group 0 full: group 1
    slots.free(10, 2)
    assert slots.allocate(64) == (10, 2)             # room in group 0 again: taken first
    assert slots.allocate(8) == (164, 8)             # next-fit within group 1
    assert lib.uswap_slots_used_in(slots.c, 0, 100) == 100
    assert lib.uswap_slots_used_in(slots.c, 100, 200) == 72
    slots.allocate(128)
    with pytest.raises(NoSlots):
        slots.allocate(1)
    assert slots.in_use == 300
    with pytest.raises(OSError):
        SlotAllocator(300, groups=(200, 100, 300))   # not ascending


# -- layer 4: daemons on store sets ------------------------------------------------------------------------

def stores_of(daemon) -> dict:
    return {s["url"]: s for s in daemon.status()["stores"]}


def make_stores(tmp_path, sizes: dict[str, str]) -> dict[str, str]:
    paths = {}
    for name, size in sizes.items():
        paths[name] = str(tmp_path / f"{name}.store")
        r = uswap("mkswap", paths[name], "--size", size)
        assert r.returncode == 0, r.stderr
    return paths


def test_equal_priorities_stripe_and_every_word_comes_back(uswapd, hog, tmp_path):
    """Three stores of one priority: a 48 MiB holder through a 4 MiB budget spreads its slots within 10%
    across them, hogs verify every word meanwhile, and status and metrics show each store."""
    paths = make_stores(tmp_path, {"a": "24M", "b": "24M", "c": "24M"})
    daemon = uswapd(store=paths["a"], resident="4M", extra=("--store", paths["b"], "--store", paths["c"]))
    holder = start_holder(daemon, 48 * MiB)
    try:
        status = daemon.status()
        stores = {s["url"]: s for s in status["stores"]}
        used = [stores[p]["used_slots"] for p in paths.values()]
        assert sum(used) == status["daemon"]["slots_used"] >= (48 - 8) * MiB // PAGE_SIZE
        assert max(used) - min(used) <= 0.1 * max(used), used
        assert all(stores[p]["writes"] > 0 and stores[p]["prio"] == 0 for p in paths.values())
        text = uswap("status", "--socket", daemon.socket).stdout
        for path in paths.values():
            assert sum(line.startswith(f"  {path} ") for line in text.splitlines()) == 1, text
        families = parse_exposition(uswap("status", "--format", "prometheus", "--socket", daemon.socket).stdout)
        assert sum(sample(families, "uswap_set_store_used_bytes", store=path) for path in paths.values()) == \
            sample(families, "uswap_store_used_bytes") > 0           # one snapshot: reclaim may go on
        assert all(sample(families, "uswap_set_store_healthy", store=path) == 1 for path in paths.values())
        r = run_hog(hog, daemon, "-s", "8", "-p", "2", "-r", "2")
        assert r.returncode == 0 and r.stdout.count(" 0 mismatches") == 2, r.stdout + r.stderr
    finally:
        code, out, err = finish_holder(holder)
    assert (code, out) == (0, "intact\n"), err
    d = daemon.status()["daemon"]
    assert d["read_errors"] == d["write_errors"] == 0 and d["pswpin"] > 0
    assert d["readahead_pages"] > 0        # the engine's io_uring rings read the member files (remote_local)
    stores = stores_of(daemon)
    assert all(stores[p]["reads"] > 0 and stores[p]["errors"] == 0 for p in paths.values())


def test_the_higher_priority_fills_first(uswapd, tmp_path):
    """low (prio 1, given first) gets nothing while high (prio 5) has room; once high is full, low takes
    the rest, and every word comes back."""
    paths = make_stores(tmp_path, {"low": "32M", "high": "16M"})
    daemon = uswapd(store=paths["low"] + ",prio=1", resident="4M", extra=("--store", paths["high"] + ",prio=5"))
    first = start_holder(daemon, 8 * MiB)
    second = None
    try:
        stores = stores_of(daemon)
        high, low = stores[paths["high"]], stores[paths["low"]]
        assert (high["prio"], low["prio"]) == (5, 1)
        assert high["used_slots"] > 0 and high["used_slots"] < high["slots"]
        assert low["used_slots"] == 0 and low["writes"] == 0
        second = start_holder(daemon, 24 * MiB)       # 28 MiB out: more than high holds
        stores = stores_of(daemon)
        high, low = stores[paths["high"]], stores[paths["low"]]
        assert low["used_slots"] > 0
        assert high["slots"] == 16 * MiB // PAGE_SIZE - CLUSTER      # its whole clusters
        assert high["slots"] - high["used_slots"] <= 8     # full when low was taken (a swap-in since frees one)
    finally:
        results = [finish_holder(h) for h in (first, second) if h is not None]
    assert all((code, out) == (0, "intact\n") for code, out, _ in results), results


def test_a_corrupted_slot_in_one_member_poisons_its_page(uswapd, hog, tmp_path):
    """Negative control: bits flipped behind the daemon's back in one member's slots: the holder whose pages
    were there dies of SIGBUS, never sees wrong data; a hog written afterwards is intact."""
    paths = make_stores(tmp_path, {"a": "16M", "b": "16M"})
    daemon = uswapd(store=paths["a"], resident="4M", extra=("--store", paths["b"]))
    victim = start_holder(daemon, 16 * MiB)
    used_b = stores_of(daemon)[paths["b"]]["used_slots"]
    assert used_b > 0
    corrupt_slots(paths["b"], 0, used_b)     # b's used slots are its first ones (next-fit from slot 0)
    bystander = run_hog(hog, daemon, "-s", "8", "-r", "2")
    assert bystander.returncode == 0 and " 0 mismatches" in bystander.stdout, bystander.stderr
    code, out, err = finish_holder(victim)
    assert code == -signal.SIGBUS, (code, out, err)
    assert "CORRUPT" not in out and "intact" not in out
    assert f"slot {CLUSTER} failed" in daemon.log() and "poisoned" in daemon.log()
    assert f"(the set's slot {CLUSTER} is slot 0 of {paths['b']})" in daemon.log()      # b's first


def test_a_set_of_a_store_on_nfs_and_a_local_one(nfs, uswapd, hog, tmp_path):
    """An nfs:// store and a local one of one priority: both take slots, every word comes back, and status
    shows the NFS server under its store (and at the top: it is the only one)."""
    url = nfs_mkswap(nfs, size="24M")
    local = make_stores(tmp_path, {"local": "24M"})["local"]
    daemon = uswapd(store=url, resident="4M", prefix=nfs.netns_cmd([]), extra=("--store", local))
    holder = start_holder(daemon, 16 * MiB)
    try:
        status = daemon.status()
        stores = {s["url"]: s for s in status["stores"]}
        assert stores[url]["used_slots"] > 0 and stores[local]["used_slots"] > 0, stores
        assert stores[url]["nfs"]["state"] == "up" and "nfs" not in stores[local]
        assert status["nfs"]["server"] == "127.0.0.1" and status["daemon"]["io"] == "nfs"
        r = run_hog(hog, daemon, "-s", "8", "-p", "2", "-r", "2")
        assert r.returncode == 0 and r.stdout.count(" 0 mismatches") == 2, r.stdout + r.stderr
    finally:
        code, out, err = finish_holder(holder)
    assert (code, out) == (0, "intact\n"), err
    status = daemon.status()
    d = status["daemon"]
    assert d["read_errors"] == d["write_errors"] == 0 and d["pswpin"] > 0 and d["slots_used"] == 0
    assert all(s["reads"] > 0 and s["writes"] > 0 and s["errors"] == 0 and s["health"] == "ok"
               for s in status["stores"]), status["stores"]


@pytest.mark.parametrize("stores,message", [
    (["{a}", "{a}"], "the store {a} is given twice: each --store must be another store"),
    (["{a}", "{dir}/../{name}"], "the store {dir}/../{name} is given twice (as '{a}' and '{dir}/../{name}'): "
                                 "each --store must be another store"),
    (["{a}", "{b},prio=-1"], "bad priority '-1' in --store '{b},prio=-1': a whole number from 0 to 32767"),
    (["{a},prio=32768", "{b}"], "bad priority '32768' in --store '{a},prio=32768': a whole number from 0 to 32767"),
    (["{a}", "{b},prio="], "bad priority '' in --store '{b},prio=': a whole number from 0 to 32767"),
])
def test_bad_store_lists_are_refused_in_one_line_before_anything_is_made(tmp_path, stores, message):
    a, b = str(tmp_path / "a.store"), str(tmp_path / "b.store")
    mkswap(a, 1 * MiB)
    names = dict(a=a, b=b, dir=str(tmp_path / "x"), name="a.store")
    os.mkdir(names["dir"])
    args = [arg for s in stores for arg in ("--store", s.format(**names))]
    r = uswap("daemon", *args, "--socket", str(tmp_path / "d.sock"), timeout=60)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.splitlines() == [f"uswap daemon: error: {message.format(**names)}"]
    assert sorted(os.listdir(tmp_path)) == ["a.store", "x"]       # b not made, no socket


def test_a_store_smaller_than_a_stripe_cluster_is_refused(tmp_path):
    a, b = str(tmp_path / "a.store"), str(tmp_path / "b.store")
    mkswap(a, 1 * MiB)
    mkswap(b, 32 * PAGE_SIZE)
    r = uswap("daemon", "--store", a, "--store", b, "--socket", str(tmp_path / "d.sock"), timeout=60)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (f"uswap daemon: error: {b}: 31 slots: a store of a set needs at least "
                                         f"{CLUSTER} (one stripe cluster)")
    assert not os.path.exists(str(tmp_path / "d.sock"))


def test_two_copies_keep_every_page_through_the_loss_of_a_server_and_resync_when_it_is_back(nfs, uswapd, hog,
                                                                                             tmp_path):
    """--copies 2 over an nfs:// store and a local one: each slot is at both.  The server killed, a holder's
    pages all come back (the NFS copies are read from the local store), a hog writes and verifies through
    it (one copy each), and status shows the store down with its fallbacks; the server restarted, the
    background resync copies back what it missed until it is whole again."""
    url = nfs_mkswap(nfs, size="40M")       # 40 MiB each, two copies: room for 40 MiB of pages
    local = make_stores(tmp_path, {"local": "40M"})["local"]
    daemon = uswapd(store=url, resident="4M", prefix=nfs.netns_cmd([]),
                    extra=("--store", local, "--copies", "2", "--nfs-timeout", "5"))
    holder = start_holder(daemon, 12 * MiB)
    try:
        status = daemon.status()
        assert status["copies"] == 2
        stores = stores_of(daemon)
        assert stores[url]["used_slots"] == stores[local]["used_slots"] > 0      # one bitmap, each slot at both
        nfs.kill()
        r = run_hog(hog, daemon, "-s", "8", "-p", "2", "-r", "2")
        assert r.returncode == 0 and r.stdout.count(" 0 mismatches") == 2, r.stdout + r.stderr
    finally:
        code, out, err = finish_holder(holder)
    assert (code, out) == (0, "intact\n"), err
    d = daemon.status()["daemon"]
    assert d["read_errors"] == d["write_errors"] == 0 and d["pswpin"] > 0
    gone = stores_of(daemon)[url]
    assert gone["down"] and gone["fallbacks"] > 0 and gone["stale_slots"] > 0, gone
    assert gone["health"].startswith("down"), gone
    assert stores_of(daemon)[local]["fallbacks"] == 0
    assert daemon.log().count(f"store {url} failed") == 1, daemon.log()
    text = uswap("status", "--socket", daemon.socket).stdout
    assert "  every slot on 2 of these stores (--copies)" in text, text
    assert f"{gone['fallbacks']} read from the other copy  down" in text, text
    families = parse_exposition(uswap("status", "--format", "prometheus", "--socket", daemon.socket).stdout)
    assert sample(families, "uswap_set_store_healthy", store=url) == 0
    assert sample(families, "uswap_set_store_healthy", store=local) == 1
    assert sample(families, "uswap_set_store_stale_bytes", store=url) == gone["stale_slots"] * PAGE_SIZE

    nfs.restart()
    deadline = time.monotonic() + 60
    while (back := stores_of(daemon)[url])["down"] or back["stale_slots"]:
        assert time.monotonic() < deadline, back
        time.sleep(0.2)
    assert back["resynced_slots"] >= gone["stale_slots"] and back["health"] == "ok", back
    assert f"store {url} holds every copy again" in daemon.log()
    r = run_hog(hog, daemon, "-s", "8", "-r", "2")
    assert r.returncode == 0 and " 0 mismatches" in r.stdout, r.stdout + r.stderr
    assert stores_of(daemon)[url]["reads"] > back["reads"]         # the NFS copies are read again


@pytest.mark.parametrize("stores,message", [
    (["{a}"], "--copies 2 keeps each slot on 2 stores of one priority: priority 0 has 1 ({a})"),
    (["{a}", "{b}", "{c},prio=3"], "--copies 2 keeps each slot on 2 stores of one priority: priority 3 has 1 ({c})"),
])
def test_copies_without_two_stores_of_a_priority_are_refused_in_one_line(tmp_path, stores, message):
    names = {n: str(tmp_path / f"{n}.store") for n in "abc"}
    args = [arg for s in stores for arg in ("--store", s.format(**names))]
    r = uswap("daemon", *args, "--copies", "2", "--socket", str(tmp_path / "d.sock"), timeout=60)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.splitlines() == [f"uswap daemon: error: {message.format(**names)}"]
    assert os.listdir(tmp_path) == []                                 # nothing made
