"""Activation checks: refuse a store file the way swapon refuses a swapfile.

The kernel will not swap to a file it cannot use safely (mm/swapfile.c,
iomap_swapfile_activate, btrfs_swap_activate, nfs_swap_activate).  uswap does
its page I/O *through* the filesystem with O_DIRECT, so it is stricter in one
place: unwritten (preallocated) extents are refused too, because their first
write would run an extent conversion, a filesystem transaction, inside the
swap-out path.  The invariant every check here protects (docs/DESIGN.md S1):

    a slot write is a pure overwrite of blocks the file already owns:
    it never allocates, converts, copies (CoW) or extends anything.

A store is also refused when someone else could read it: a file not owned by
us or open to group or others, or a directory on its path that someone else
controls (uswap.paths).  Swapped memory is as secret as the memory itself.

Every check runs, so one report names every problem at once.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer, check
from uswap.paths import check_directory_chain, describe_uid
from uswap.store.header import HeaderError, StoreHeader
from uswap.store.lock import probe_lock
from uswap.units import format_size

# statfs f_type values (include/uapi/linux/magic.h)
FS_NAMES = {
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
    0x6969: "nfs",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x65735546: "fuse",
    0x794C7630: "overlayfs",
}
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}

_FIEMAP_BATCH = 256


@dataclass(frozen=True)
class Finding:
    topic: str          # file, owner, mode, directory, filesystem, header, extents, attributes
    text: str
    level: str = "ok"   # ok, warning, refused


@dataclass
class CheckReport:
    path: str
    fs_name: str = "unknown"
    size: int = 0
    header: StoreHeader | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.refusals

    @property
    def refusals(self) -> list[str]:
        return [f.text for f in self.findings if f.level == "refused"]

    def note(self, topic: str, text: str) -> None:
        self.findings.append(Finding(topic, text))

    def warn(self, topic: str, text: str) -> None:
        self.findings.append(Finding(topic, text, "warning"))

    def refuse(self, topic: str, text: str) -> None:
        self.findings.append(Finding(topic, text, "refused"))

    def render(self) -> str:
        lines = [f"{self.path}:"]
        for f in self.findings:
            lines.append(f"  {f.topic:<11} {f.level.upper() if f.level != 'ok' else 'ok':<8} {f.text}")
        verdict = "usable" if self.usable else f"not usable ({len(self.refusals)} problem(s))"
        lines.append(f"  {'result':<11} {'':<8} {verdict}")
        return "\n".join(lines)


def fs_name(fd: int) -> str:
    magic = ffi.new("int64_t *")
    check(lib.uswap_fs_magic(fd, magic))
    return FS_NAMES.get(magic[0], f"fs-{magic[0]:#x}")


def check_store(path: str) -> CheckReport:
    """Open ``path`` read-only and run every activation check.

    A store that another process holds is refused too: the question answered
    is "can I use this now?".
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        direct = True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # The filesystem refuses O_DIRECT opens; look at the rest anyway.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        direct = False
    try:
        report = check_fd(fd, path, direct=direct)
        holder = probe_lock(fd, path)
        if holder is not None:
            report.refuse("file", f"in use by {f'PID {holder}' if holder else 'another process'}")
        return report
    finally:
        os.close(fd)


def check_fd(fd: int, path: str, *, direct: bool, page_size: int = PAGE_SIZE) -> CheckReport:
    """Run the checks on an open file; ``direct`` says it was opened O_DIRECT.

    ``page_size`` is the page size the store must have: this system's, except
    for mkswap building a store for another system (mkswap -p).
    """
    report = CheckReport(path)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        report.refuse("file", "not a regular file")
        return report
    report.size = st.st_size
    _check_ownership(st, report)
    report.fs_name = fs_name(fd)
    _check_filesystem(fd, report, direct)
    # Extents before the header: an O_DIRECT read writes back dirty page
    # cache first, which would turn delalloc extents into real ones unseen.
    if report.fs_name == "nfs":
        check_nfs_allocation(report, st.st_blocks * 512)
    else:
        _check_extents(fd, report)
    _check_header(fd, report, direct, page_size)
    if report.fs_name == "btrfs":
        _check_btrfs_attributes(fd, report)
    return report


def _check_ownership(st: os.stat_result, report: CheckReport) -> None:
    """Only we may read or write the store, and only root and we may change the
    directories leading to it.  Not overridable (mkswap --force included).

    nfs:// stores never come here (uswap/nfs/store.py: check_store_file): their
    ownership lives on the server, which trusts whatever uid the client claims,
    so a uid seen through libnfs would prove nothing.
    """
    euid = os.geteuid()
    if st.st_uid != euid:
        report.refuse("owner", f"owned by {describe_uid(st.st_uid)}, not {describe_uid(euid)}: its owner could "
                               "read every swapped page")
    if st.st_mode & 0o077:
        report.refuse("mode", f"readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                              f"swapped memory is secret; fix with chmod 0600 {report.path}")
    problems = check_directory_chain(report.path)
    for text in problems:
        report.refuse("directory", f"{text}: someone else could replace the store")
    if st.st_uid == euid and not st.st_mode & 0o077 and not problems:
        report.note("owner", f"{describe_uid(euid)}, mode {stat.S_IMODE(st.st_mode):04o}; directories on the way "
                             "owned by root or us, none writable by others unless sticky")


def _check_filesystem(fd: int, report: CheckReport, direct: bool) -> None:
    name = report.fs_name
    if name in MEMORY_FILESYSTEMS:
        report.refuse("filesystem", f"{name} keeps files in memory: there is no real O_DIRECT and "
                                    "swapping to it frees nothing")
        return
    if not direct:
        report.refuse("filesystem", f"{name} does not support O_DIRECT")
        return
    mem = ffi.new("uint32_t *")
    off = ffi.new("uint32_t *")
    ret = lib.uswap_dio_alignment(fd, mem, off)
    if ret == -errno.EOPNOTSUPP:
        report.note("filesystem", f"{name}, O_DIRECT (alignment not reported; page alignment assumed)")
        return
    check(ret, report.path)
    if off[0] == 0:
        report.refuse("filesystem", f"{name} does not support O_DIRECT on this file")
    elif off[0] > PAGE_SIZE or mem[0] > PAGE_SIZE:
        report.refuse("filesystem", f"{name} needs O_DIRECT alignment of {off[0]} bytes (memory {mem[0]}), "
                                    f"more than the {PAGE_SIZE}-byte page")
    else:
        report.note("filesystem", f"{name}, O_DIRECT alignment {off[0]} (memory {mem[0]})")


def _check_header(fd: int, report: CheckReport, direct: bool, page_size: int) -> None:
    if report.size == 0:
        check_header_page(report, b"", page_size)
        return
    buf = AlignedBuffer(PAGE_SIZE)
    try:
        n = check(lib.uswap_pread_full(fd, buf.ptr, PAGE_SIZE, 0), report.path)
    except OSError as e:
        if direct and e.errno == errno.EINVAL:
            report.refuse("filesystem", f"{report.fs_name} rejects page-aligned O_DIRECT reads")
        else:
            report.refuse("header", f"cannot read the header page: {e.strerror}")
        return
    check_header_page(report, bytes(buf.view[:n]), page_size)


def check_header_page(report: CheckReport, page: bytes, page_size: int) -> None:
    """Judge the header page read from a file of ``report.size`` bytes."""
    minimum = 2 * page_size
    if report.size < minimum:
        report.refuse("file", f"{report.size} bytes is smaller than the header page plus one slot "
                              f"({minimum} bytes)")
        if report.size == 0:
            return
    try:
        header = StoreHeader.unpack(page)
    except HeaderError as e:
        report.refuse("header", str(e))
        return
    report.header = header
    if header.page_size != page_size:
        report.refuse("header", f"store page size {header.page_size} does not match this system's "
                                f"{page_size}-byte pages")
        return
    if report.size < header.file_size:
        report.refuse("file", f"file is {report.size} bytes, shorter than its header's {header.slot_count} "
                              f"slots need ({header.file_size} bytes)")
        return
    report.note("header", f"uswap store v{header.version}, {header.slot_count} slots of "
                          f"{format_size(header.page_size)} ({format_size(header.slot_count * header.page_size)}), "
                          f"uuid {header.uuid}")
    if report.size > header.file_size:
        report.note("file", f"{report.size - header.file_size} bytes past the last slot are not used")


def check_nfs_allocation(report: CheckReport, allocated: int) -> None:
    """NFS has no FIEMAP.  The kernel's nfs_swap_activate only asks that the
    allocated bytes (st_blocks * 512) cover the file size: no holes."""
    if allocated < report.size:
        report.refuse("extents", f"has holes: {allocated} bytes allocated for {report.size} "
                                 "(NFS rule of the kernel's nfs_swap_activate)")
    else:
        report.note("extents", "NFS has no FIEMAP: checked, as the kernel's nfs_swap_activate does, that the "
                               "allocated blocks cover the file size")


def read_extents(fd: int, length: int) -> list[tuple[int, int, int, int]]:
    """Every FIEMAP extent in [0, length) as (logical, physical, length, flags)."""
    out = ffi.new("struct uswap_extent[]", _FIEMAP_BATCH)
    extents = []
    start = 0
    while start < length:
        n = check(lib.uswap_fiemap(fd, start, length - start, 0, out, _FIEMAP_BATCH))
        if n == 0:
            break
        for i in range(n):
            e = out[i]
            extents.append((e.logical, e.physical, e.length, e.flags))
        last = out[n - 1]
        if last.flags & lib.FIEMAP_EXTENT_LAST:
            break
        start = last.logical + last.length
    return extents


# Flag → why a store cannot have it.  Checked in this order; each is reported
# once, with how many extents have it and where the first one is.
_BAD_FLAGS = [
    (lib.FIEMAP_EXTENT_DATA_INLINE, "has inline data: the file has no blocks of its own"),
    (lib.FIEMAP_EXTENT_DELALLOC | lib.FIEMAP_EXTENT_UNKNOWN,
     "has delayed-allocation extents (blocks not yet allocated): run sync, then check again"),
    (lib.FIEMAP_EXTENT_UNWRITTEN,
     "has unwritten (preallocated) extents: their first write would convert them in the swap path; "
     "recreate with uswap mkswap"),
    (lib.FIEMAP_EXTENT_SHARED, "has shared (reflinked or snapshotted) extents: a write would copy them"),
    (lib.FIEMAP_EXTENT_ENCODED, "has compressed or encoded extents"),
    (lib.FIEMAP_EXTENT_NOT_ALIGNED, "has extents whose data is not block-aligned"),
]


def extent_problems(extents, length: int, page_size: int) -> list[str]:
    """Why these extents cannot back a store of ``length`` bytes, in words."""
    problems = []
    holes = []
    expected = 0
    for logical, _physical, ext_len, _flags in extents:
        if logical > expected:
            holes.append((expected, logical - expected))
        expected = max(expected, logical + ext_len)
    if expected < length:
        holes.append((expected, length - expected))
    if holes:
        offset, size = holes[0]
        problems.append(f"has holes: {len(holes)} unallocated range(s), first at offset {offset} "
                        f"({format_size(size)})")
    for flag, why in _BAD_FLAGS:
        hits = [e for e in extents if e[3] & flag]
        if hits:
            problems.append(f"{why} ({len(hits)} extent(s), first at offset {hits[0][0]})")
    unaligned = [e for e in extents
                 if e[0] % page_size or e[1] % page_size
                 or (e[2] % page_size and e[0] + e[2] < length)]
    if unaligned:
        logical, physical, _, _ = unaligned[0]
        problems.append(f"has extents not aligned to the {page_size}-byte page ({len(unaligned)} extent(s), "
                        f"first at offset {logical}, disk offset {physical})")
    return problems


def _check_extents(fd: int, report: CheckReport) -> None:
    if report.size == 0:
        return
    try:
        extents = read_extents(fd, report.size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
            report.refuse("extents", f"{report.fs_name} cannot report extents (no FIEMAP), so holes and shared "
                                     "blocks cannot be ruled out")
            return
        raise
    # Alignment to this system's page: that is the unit of every transfer here.
    problems = extent_problems(extents, report.size, PAGE_SIZE)
    for text in problems:
        report.refuse("extents", text)
    if not problems:
        report.note("extents", f"{len(extents)} extent(s), all allocated, written, page-aligned, not shared")


def _check_btrfs_attributes(fd: int, report: CheckReport) -> None:
    flags = ffi.new("uint32_t *")
    check(lib.uswap_get_inode_flags(fd, flags), report.path)
    if not flags[0] & lib.FS_NOCOW_FL:
        report.refuse("attributes", "btrfs file without NOCOW: every write would copy its block "
                                    "(uswap mkswap sets chattr +C on the empty file)")
    if flags[0] & lib.FS_COMPR_FL:
        report.refuse("attributes", "btrfs compression attribute is set (chattr +c)")
    if flags[0] & lib.FS_NOCOW_FL and not flags[0] & lib.FS_COMPR_FL:
        report.note("attributes", "btrfs NOCOW, not compressed")
