"""Create a store file, so that later slot writes are pure overwrites.

Like mkswap, but a store is written in full: every block gets real zeros, so
no extent is left unallocated or unwritten (fallocate would leave unwritten
extents whose first write converts them).  On btrfs the empty file gets NOCOW
before any data.  The file is built under a temporary name beside the target
and renamed into place only once it passes the activation checks: a failure
at any point (no space, I/O error, Ctrl-C) leaves the target as it was.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import uuid
from typing import Callable

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer, check
from uswap.paths import check_directory_chain
from uswap.store.checks import MEMORY_FILESYSTEMS, check_fd, fs_name
from uswap.store.header import HeaderError, StoreHeader
from uswap.store.lock import StoreError, StoreUnusable, take_lock
from uswap.units import format_size

CHUNK = 4 << 20  # bytes of zeros per write while filling


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"uswap {version('uswap')}"
    except PackageNotFoundError:
        return "uswap"


def validate_geometry(size: int, page_size: int) -> int:
    """Slot count for a file of ``size`` bytes; ValueError naming the problem."""
    if page_size < 4096 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two of at least 4096")
    if size % page_size:
        raise ValueError(f"size {size} is not a whole number of {format_size(page_size)} pages")
    if size < 2 * page_size:
        raise ValueError(f"size {size} leaves no room for one slot after the header page "
                         f"(minimum {2 * page_size})")
    return size // page_size - 1


def _is_uswap_store(path: str) -> bool:
    with open(path, "rb") as f:
        page = f.read(PAGE_SIZE)
    try:
        StoreHeader.unpack(page)
    except HeaderError:
        return False
    return True


def _refuse_existing(path: str, force: bool) -> None:
    """Refuse to replace what is at ``path`` unless it is an idle store (or --force)."""
    if not os.path.lexists(path):
        return
    if not os.path.isfile(path) or os.path.islink(path):
        raise StoreError(errno.EEXIST, "exists and is not a regular file", path)
    if not _is_uswap_store(path) and not force:
        raise StoreError(errno.EEXIST, "exists and is not a uswap store; use --force to overwrite it", path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        take_lock(fd, path)  # raises StoreBusy; released on close
    finally:
        os.close(fd)


def _set_nocow(fd: int) -> None:
    """btrfs: NOCOW (and no compression) must be set while the file is empty."""
    flags = ffi.new("uint32_t *")
    check(lib.uswap_get_inode_flags(fd, flags))
    check(lib.uswap_set_inode_flags(fd, (flags[0] | lib.FS_NOCOW_FL) & ~lib.FS_COMPR_FL))


def mkswap(path: str, size: int, *, page_size: int = PAGE_SIZE, force: bool = False,
           progress: Callable[[int, int], None] | None = None) -> StoreHeader:
    """Create a store of ``size`` bytes (header page included) at ``path``."""
    slots = validate_geometry(size, page_size)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise StoreError(errno.ENOENT, f"directory {parent} does not exist", path)
    unsafe = check_directory_chain(path)  # before writing anything there (check_fd would refuse it at the end)
    if unsafe:
        raise StoreError(errno.EPERM, f"refused: {unsafe[0]}", path)
    _refuse_existing(path, force)
    dirfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        name = fs_name(dirfd)
    finally:
        os.close(dirfd)
    if name in MEMORY_FILESYSTEMS:
        raise StoreError(errno.EINVAL, f"{name} keeps files in memory: swapping to it frees nothing", path)
    vfs = os.statvfs(parent)
    free = vfs.f_bavail * vfs.f_frsize
    if free < size:
        raise StoreError(errno.ENOSPC, f"not enough free space: need {format_size(size)}, "
                                       f"have {format_size(free)}", path)

    header = StoreHeader(page_size=page_size, slot_count=slots, uuid=uuid.uuid4(), created=int(time.time()),
                         host=socket.gethostname(), created_by=_version())
    tmp = f"{path}.mkswap-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise StoreError(errno.EINVAL, "filesystem does not support O_DIRECT", path) from None
        raise
    try:
        os.fchmod(fd, 0o600)  # whatever the umask: swapped memory is secret
        if name == "btrfs":
            _set_nocow(fd)
        _fill(fd, header, progress)
        os.fsync(fd)
        report = check_fd(fd, path, direct=True, page_size=page_size)
        if not report.usable:
            raise StoreUnusable(report)
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
    dirfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return header


def _fill(fd: int, header: StoreHeader, progress) -> None:
    total = header.file_size
    chunk = AlignedBuffer(min(CHUNK, total))
    done = 0
    while done < total:
        n = min(chunk.size, total - done)
        if done == 0:
            chunk.view[:header.page_size] = header.pack()
        wrote = check(lib.uswap_pwrite_full(fd, chunk.ptr, n, done))
        if done == 0:
            chunk.view[:header.page_size] = bytes(header.page_size)
        done += wrote
        if progress:
            progress(done, total)
