"""Layer 2: every activation refusal, reproduced on a real file of a real filesystem.

ext4 cases use the test's own directory (ext4 on this machine) or loop images
with special layouts; xfs and btrfs cases use loop-mounted images.  They
mirror swapon and xfstests generic/356 (reflinked), 357 (reflink after
swapon), 472 (sizes), 495 (holes), 496 (unwritten), 497 (partial file),
636, 641 (page-unaligned).
"""

from __future__ import annotations

import os
import stat
import struct
import uuid

import pytest

from conftest import need_root, run
from uswap.core import PAGE_SIZE
from uswap.store.checks import CheckReport, check_nfs_allocation, check_store, extent_problems, fs_name
from uswap.store.header import StoreHeader
from uswap.store.mkswap import mkswap
from uswap.store.lock import StoreError, StoreUnusable
from uswap.store.swapfile import SwapStore

SLOTS = 63
SIZE = (SLOTS + 1) * PAGE_SIZE


def store_image(slots: int = SLOTS) -> bytes:
    """A valid header page followed by zeroed slots, for writing by other means."""
    header = StoreHeader(page_size=PAGE_SIZE, slot_count=slots, uuid=uuid.uuid4(), created=0,
                         host="test", created_by="test")
    return header.pack() + bytes(slots * PAGE_SIZE)


def write_synced(path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def refusals(path) -> list[str]:
    report = check_store(str(path))
    assert report.usable == (not report.refusals)
    return report.refusals


def assert_refused(path, *fragments: str, also_open: bool = True) -> None:
    """check refuses with every fragment named, and so does opening for use."""
    found = refusals(path)
    for fragment in fragments:
        assert any(fragment in text for text in found), (fragment, found)
    if also_open:
        with pytest.raises(StoreUnusable):
            SwapStore.open(str(path)).close()


# -- ext4, the ordinary case --------------------------------------------------

def test_fresh_store_passes_every_check(tmp_path):
    path = tmp_path / "store"
    mkswap(str(path), SIZE)
    report = check_store(str(path))
    assert report.usable, report.render()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert report.header.slot_count == SLOTS
    topics = {f.topic for f in report.findings}
    assert {"filesystem", "header", "extents"} <= topics
    assert "written, page-aligned" in report.render()


def test_hole_is_refused(tmp_path):
    path = tmp_path / "store"
    mkswap(str(path), SIZE)
    run("fallocate", "--punch-hole", "--offset", str(3 * PAGE_SIZE), "--length", str(PAGE_SIZE), str(path))
    assert_refused(path, "has holes: 1 unallocated range(s), first at offset 12288")


def test_sparse_tail_is_refused(tmp_path):
    path = tmp_path / "store"
    write_synced(path, store_image()[:PAGE_SIZE])
    os.truncate(path, SIZE)
    assert_refused(path, "has holes")


def test_unwritten_extents_are_refused(tmp_path):
    path = tmp_path / "store"
    run("fallocate", "--length", str(SIZE), str(path))
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, store_image()[:PAGE_SIZE], 0)
    os.fsync(fd)
    os.close(fd)
    os.chmod(path, 0o600)
    assert_refused(path, "unwritten (preallocated) extents")


def test_delalloc_extents_are_refused(tmp_path):
    # Buffered and not synced: ext4 keeps it delalloc for ~30 s (dirty_expire).
    path = tmp_path / "store"
    with open(path, "wb") as f:
        f.write(store_image())
    os.chmod(path, 0o600)
    # (check's own O_DIRECT header read writes the data back, so no reopen here)
    assert_refused(path, "delayed-allocation", also_open=False)
    os.sync()
    assert refusals(path) == []  # and once written back, the same file is fine


def test_too_small(tmp_path):
    path = tmp_path / "store"
    write_synced(path, store_image(0)[:PAGE_SIZE])
    assert_refused(path, "smaller than the header page plus one slot")


def test_empty_file(tmp_path):
    path = tmp_path / "store"
    write_synced(path, b"")
    assert_refused(path, "0 bytes is smaller than the header page plus one slot")


def test_not_a_store(tmp_path):
    path = tmp_path / "store"
    write_synced(path, bytes(SIZE))
    assert_refused(path, "bad magic")


def test_wrong_version(tmp_path):
    page = bytearray(store_image())
    struct.pack_into("<I", page, 8, 2)
    path = tmp_path / "store"
    write_synced(path, bytes(page))
    assert_refused(path, "format version 2 is not supported")


def test_damaged_header(tmp_path):
    page = bytearray(store_image())
    page[20] ^= 0xFF  # inside the slot count
    path = tmp_path / "store"
    write_synced(path, bytes(page))
    assert_refused(path, "header checksum mismatch")


def test_other_page_size(tmp_path):
    path = tmp_path / "store"
    mkswap(str(path), 4 * 16384, page_size=16384)  # like mkswap -p: made for another system
    assert_refused(path, "store page size 16384 does not match this system's 4096-byte pages")


def test_file_shorter_than_its_header(tmp_path):
    path = tmp_path / "store"
    mkswap(str(path), SIZE)
    os.truncate(path, SIZE - PAGE_SIZE)
    assert_refused(path, f"shorter than its header's {SLOTS} slots")


def test_insecure_mode_is_a_warning_not_a_refusal(tmp_path):
    path = tmp_path / "store"
    mkswap(str(path), SIZE)
    os.chmod(path, 0o644)
    report = check_store(str(path))
    assert report.usable
    assert any(f.level == "warning" and "insecure permissions 0644" in f.text for f in report.findings)


def test_not_a_regular_file(tmp_path):
    assert check_store("/dev/null").refusals == ["not a regular file"]


# -- ext4 images with special layouts ------------------------------------------

def test_inline_data_is_refused(loopfs):
    mnt = loopfs.make("ext4", size="64M", mkfs_args=("-q", "-F", "-b", "4096", "-O", "inline_data"))
    path = os.path.join(mnt, "store")
    write_synced(path, b"tiny store\n")
    assert_refused(path, "has inline data", "smaller than the header page")


def test_extents_not_page_aligned_are_refused(loopfs):
    # 1 KiB blocks: group-aligned allocations sit 1 KiB past a 4 KiB boundary.
    mnt = loopfs.make("ext4", size="64M", mkfs_args=("-q", "-F", "-b", "1024"))
    path = os.path.join(mnt, "store")
    write_synced(path, store_image())
    assert_refused(path, "not aligned to the 4096-byte page")
    with pytest.raises(StoreUnusable, match="not aligned"):
        mkswap(os.path.join(mnt, "made"), SIZE)
    assert sorted(os.listdir(mnt)) == ["lost+found", "store"]  # mkswap left nothing behind


# -- xfs -------------------------------------------------------------------------

def test_xfs_store_and_its_reflinked_copy(loopfs):
    mnt = loopfs.make("xfs", mkfs_args=("-q", "-f"))
    original = os.path.join(mnt, "store")
    mkswap(original, SIZE)
    assert refusals(original) == []
    clone = os.path.join(mnt, "clone")
    run("cp", "--reflink=always", original, clone)
    os.sync()
    assert_refused(clone, "shared (reflinked or snapshotted) extents")
    assert_refused(original, "shared")  # sharing makes the original unsafe too
    run("xfs_io", "-c", f"funshare 0 {SIZE}", original)  # the remedy: give it blocks of its own
    os.sync()
    assert refusals(original) == []


def test_xfs_unwritten(loopfs):
    mnt = loopfs.make("xfs", mkfs_args=("-q", "-f"))
    path = os.path.join(mnt, "store")
    run("fallocate", "--length", str(SIZE), path)
    assert_refused(path, "unwritten")


# -- btrfs -----------------------------------------------------------------------

def test_btrfs_mkswap_sets_nocow(loopfs):
    mnt = loopfs.make("btrfs", size="256M", mkfs_args=("-q", "-f"))
    path = os.path.join(mnt, "store")
    mkswap(path, SIZE)
    report = check_store(path)
    assert report.usable, report.render()
    assert "btrfs NOCOW, not compressed" in report.render()
    assert "C" in run("lsattr", path).stdout.split()[0]


def test_btrfs_without_nocow_is_refused(loopfs):
    mnt = loopfs.make("btrfs", size="256M", mkfs_args=("-q", "-f"))
    path = os.path.join(mnt, "store")
    write_synced(path, store_image())
    assert_refused(path, "btrfs file without NOCOW")


def test_btrfs_compression_attribute_is_refused(loopfs):
    mnt = loopfs.make("btrfs", size="256M", mkfs_args=("-q", "-f"))
    path = os.path.join(mnt, "store")
    write_synced(path, b"")
    run("chattr", "+c", path)
    write_synced(path, store_image())
    assert_refused(path, "compression attribute is set", "compressed or encoded extents")


def test_btrfs_compress_mount_is_refused(loopfs):
    mnt = loopfs.make("btrfs", size="256M", mkfs_args=("-q", "-f"), mount_opts="compress=zstd")
    path = os.path.join(mnt, "copied")
    write_synced(path, store_image())
    assert_refused(path, "compressed or encoded extents", "without NOCOW")
    made = os.path.join(mnt, "store")
    mkswap(made, SIZE)  # NOCOW files are never compressed
    assert refusals(made) == []


def test_btrfs_snapshot_shares_extents(loopfs):
    mnt = loopfs.make("btrfs", size="256M", mkfs_args=("-q", "-f"))
    run("btrfs", "-q", "subvolume", "create", os.path.join(mnt, "sv"))
    path = os.path.join(mnt, "sv", "store")
    mkswap(path, SIZE)
    run("btrfs", "-q", "subvolume", "snapshot", os.path.join(mnt, "sv"), os.path.join(mnt, "snap"))
    os.sync()
    assert_refused(path, "shared")


# -- memory filesystems --------------------------------------------------------------

def test_tmpfs_is_refused(loopfs):
    mnt = loopfs.mount_memory("tmpfs")
    fd = os.open(mnt, os.O_RDONLY)
    try:
        assert fs_name(fd) == "tmpfs"
    finally:
        os.close(fd)
    with pytest.raises(StoreError, match="tmpfs keeps files in memory"):
        mkswap(os.path.join(mnt, "store"), SIZE)
    assert os.listdir(mnt) == []
    path = os.path.join(mnt, "copied")
    write_synced(path, store_image())
    assert_refused(path, "tmpfs keeps files in memory", "cannot report extents")


def test_ramfs_has_no_o_direct(loopfs):
    mnt = loopfs.mount_memory("ramfs")
    with pytest.raises(StoreError, match="ramfs keeps files in memory"):
        mkswap(os.path.join(mnt, "store"), SIZE)
    path = os.path.join(mnt, "copied")
    write_synced(path, store_image())
    assert_refused(path, "ramfs keeps files in memory", also_open=False)
    with pytest.raises(StoreError, match="does not support O_DIRECT"):
        SwapStore.open(path)


# -- policy units: decisions on given facts --------------------------------------------

def test_nfs_rule_allocated_blocks_must_cover_the_size():
    # No kernel NFS client here: the decision is tested on the facts it uses.
    def decide(size, allocated):
        report = CheckReport("/nfs/store", fs_name="nfs", size=size)
        check_nfs_allocation(report, allocated)
        return report
    assert decide(SIZE, SIZE).usable
    assert "nfs_swap_activate" in decide(SIZE, SIZE).render()
    assert "has holes" in decide(SIZE, SIZE - PAGE_SIZE).refusals[0]


def test_extent_problems_summarise_per_kind():
    p = PAGE_SIZE
    extents = [(0, 10 * p, p, 0), (2 * p, 20 * p, p, 0x800), (3 * p, 30 * p + 1024, p, 0x2000)]
    problems = extent_problems(extents, 5 * p, p)
    assert problems == [
        f"has holes: 2 unallocated range(s), first at offset {p} (4K)",
        "has unwritten (preallocated) extents: their first write would convert them in the swap path; "
        f"recreate with uswap mkswap (1 extent(s), first at offset {2 * p})",
        f"has shared (reflinked or snapshotted) extents: a write would copy them (1 extent(s), first at offset {3 * p})",
        f"has extents not aligned to the 4096-byte page (1 extent(s), first at offset {3 * p}, disk offset {30 * p + 1024})",
    ]
    assert extent_problems([(0, 0, 5 * p, 1)], 5 * p, p) == []


def test_root_is_needed_for_loop_images():
    need_root()
