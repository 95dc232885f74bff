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
from uswap.paths import check_directory_chain, describe_uid, secure_directory
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


# -- who may read the store: the file, and every directory on its way ------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
def test_store_open_to_group_or_others_is_refused(tmp_path, mode):
    path = tmp_path / "store"
    mkswap(str(path), SIZE)
    os.chmod(path, mode)
    assert_refused(path, f"readable or writable by group or others (mode {mode:04o}): swapped memory is secret; "
                         f"fix with chmod 0600 {path}")
    os.chmod(path, 0o600)  # negative control: the same file, closed again
    assert refusals(path) == []
    assert f"owner       ok       {describe_uid(os.geteuid())}, mode 0600" in check_store(str(path)).render()


def test_store_owned_by_someone_else_is_refused(tmp_path):
    need_root()
    path = tmp_path / "store"
    mkswap(str(path), SIZE)
    os.chown(path, 65534, 65534)
    assert_refused(path, "owned by uid 65534 (nobody), not uid 0 (root): its owner could read every swapped page")


def test_store_in_a_directory_someone_else_owns_is_refused(tmp_path):
    need_root()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    mkswap(str(theirs / "store"), SIZE)
    os.chown(theirs, 65534, 65534)
    assert_refused(theirs / "store", f"directory {theirs} is owned by uid 65534 (nobody), not root: someone else "
                                     "could replace the store")
    # mkswap refuses before it writes anything there, --force or not
    with pytest.raises(StoreError, match=f"refused: directory {theirs} is owned by uid 65534"):
        mkswap(str(theirs / "other"), SIZE, force=True)
    assert sorted(os.listdir(theirs)) == ["store"]


def test_directory_writable_by_others_is_refused_unless_sticky(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    mkswap(str(shared / "store"), SIZE)
    for mode, writers in [(0o777, "group and others"), (0o775, "group"), (0o757, "others")]:
        os.chmod(shared, mode)
        assert_refused(shared / "store", f"directory {shared} is writable by {writers} and not sticky "
                                         f"(mode {mode:04o})")
    os.chmod(shared, 0o1777)  # like /tmp: others cannot rename what we own
    assert refusals(shared / "store") == []


def test_directory_above_the_store_counts_too(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    mkswap(str(tmp_path / "a" / "b" / "store"), SIZE)
    os.chmod(tmp_path / "a", 0o777)
    assert_refused(tmp_path / "a" / "b" / "store", f"directory {tmp_path / 'a'} is writable by group and others")
    # the same store named through ".." from elsewhere is judged by the directories really traversed
    (tmp_path / "c").mkdir()
    assert any(f"{tmp_path / 'a'}" in text for text in refusals(tmp_path / "c" / ".." / "a" / "b" / "store"))


def test_symlink_on_the_way_must_be_ours(tmp_path):
    need_root()
    (tmp_path / "real").mkdir()
    mkswap(str(tmp_path / "real" / "store"), SIZE)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    link = sticky / "link"
    os.symlink(tmp_path / "real", link)
    assert refusals(link / "store") == []          # our own symlink in a sticky directory: fine
    os.lchown(link, 65534, 65534)                  # theirs: they may point it anywhere
    assert_refused(link / "store", f"symlink {link} is owned by uid 65534 (nobody), not root")
    # a symlink to the store file itself, and the directories its target lies in, are judged as well
    os.chown(tmp_path / "real", 65534, 65534)
    os.symlink(tmp_path / "real" / "store", tmp_path / "store-link")
    assert_refused(tmp_path / "store-link", f"directory {tmp_path / 'real'} is owned by uid 65534")


def test_directory_chain_rules():
    assert check_directory_chain("/") == []
    assert check_directory_chain("/tmp/no/such/thing") == []  # /tmp is sticky; the walk stops where nothing is
    assert check_directory_chain("/proc/self/fd") == []       # a root-owned symlink (/proc/self) on the way


def test_secure_directory(tmp_path):
    old = os.umask(0o077 ^ 0o777)   # a umask that would leave the directory wide open
    try:
        secure_directory(str(tmp_path / "mine"), 0o700)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "mine").st_mode) == 0o700
    secure_directory(str(tmp_path / "mine"), 0o700)  # existing and ours: fine
    os.symlink(tmp_path / "mine", tmp_path / "link")
    with pytest.raises(OSError, match=f"is a symlink \\(to {tmp_path / 'mine'}\\)"):
        secure_directory(str(tmp_path / "link"), 0o700)
    os.chmod(tmp_path / "mine", 0o770)
    with pytest.raises(OSError, match="writable by group \\(mode 0770\\)"):
        secure_directory(str(tmp_path / "mine"), 0o700)
    os.chmod(tmp_path / "mine", 0o777)
    with pytest.raises(OSError, match=f"unsafe directory on the way: directory {tmp_path / 'mine'} is writable"):
        secure_directory(str(tmp_path / "mine" / "inner"), 0o700)
    assert not os.path.exists(tmp_path / "mine" / "inner")  # nothing created in an unsafe place
    with pytest.raises(OSError, match=f"cannot create it: directory {tmp_path / 'none'} does not exist"):
        secure_directory(str(tmp_path / "none" / "inner"), 0o700)
    if os.geteuid() == 0:
        os.chmod(tmp_path / "mine", 0o700)
        os.chown(tmp_path / "mine", 65534, 65534)
        with pytest.raises(OSError, match="directory is owned by uid 65534 \\(nobody\\), not uid 0 \\(root\\)"):
            secure_directory(str(tmp_path / "mine"), 0o700)


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
