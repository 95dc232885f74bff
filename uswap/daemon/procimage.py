"""What the daemon reads of a `uswap run` process, and the rule that binds each read to it (docs/SECURITY.md,
"Runs: what the daemon reads").

The daemon reads a run's memory as root: /proc/PID/mem to write pages out, pagemap to count them, maps to
register them.  Reading another process's memory is a privilege, so every read goes through a
``ProcessImage``, which is bound to the one process image the daemon verified and checked as the kernel checks
ptrace (``__ptrace_may_access`` for a caller without CAP_SYS_PTRACE):

1. Opened once.  mem, pagemap and maps are opened when the process is verified (HELLO, or a fork child's
   first fault) and never again by path.  Each holds the mm it was opened on (the kernel's proc_mem_open):
   after an exec, reads through them return nothing, never a byte of the new image.
2. The connecting uid may ptrace it.  After the opens (what is checked is what was opened): the real,
   effective and saved uids of the process are all the uid its connection had (SO_PEERCRED), its gids all
   that gid, and it is dumpable (the kernel makes /proc/PID/* root's when it is not: task_dump_owner).  A
   root connection is exempt: root may ptrace anything.
3. The uffd is this mm's.  The daemon copies a random nonce into the agent's proof page through the uffd
   (UFFDIO_COPY) and reads it back through mem: a uffd of any other process puts it in another mm.  A fork
   child's uffd is the kernel's (EVENT_FORK); its mem must show the nonce its parent's proof page holds (a
   copy at fork), which an exec'd image does not have.
4. Still so before every batch of reads: ``check()`` fails once the owner of /proc/PID/status is no longer
   the one verified (exec of a setuid or setgid program, a credential change, PR_SET_DUMPABLE 0) or the mm
   is gone (exec, exit); the caller then stops reading and gives the process its pages back (or ends).
"""

from __future__ import annotations

import errno
import os
import re

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.protocol import ProtocolError
from uswap.uffd import RegisterMode, Userfaultfd

# PAGEMAP_SCAN (6.7+; lib.uswap_pagemap_present) returns the spans of present pages, skipping empty page
# tables: a sparse 128 GiB range costs what its present pages cost, not 256 MiB of pagemap.
SCAN_FALLBACK = 4096                # pages of pagemap read at once where the kernel has no PAGEMAP_SCAN
NONCE = 32          # bytes of the proof page the nonce fills
_PRESENT_SPAN = re.compile(rb"[\x80-\xff]+")   # pagemap top bytes: bit 7 (bit 63) present
_IDS = re.compile(rb"^(Uid|Gid):\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+\s*$", re.M)   # real, effective, saved (, fs)


class ImageChanged(OSError):
    """The process is no longer the image the daemon verified (exec, exit, other credentials)."""


def ptrace_refusal(status: bytes, owner: tuple[int, int], uid: int, gid: int) -> str | None:
    """Why ``uid``/``gid`` (without CAP_SYS_PTRACE) may not ptrace the process whose /proc/PID/status is
    ``status`` and whose /proc/PID/status is owned by ``owner``; None if it may (rule 2)."""
    if uid == 0:
        return None
    ids = {m[1]: tuple(int(x) for x in m.groups()[1:]) for m in _IDS.finditer(status)}
    if ids.get(b"Uid") != (uid, uid, uid):
        return f"its uids {ids.get(b'Uid')} are not all uid {uid}'s"
    if ids.get(b"Gid") != (gid, gid, gid):
        return f"its gids {ids.get(b'Gid')} are not all gid {gid}'s"
    if owner != (uid, gid):
        return "it is not dumpable"
    return None


class ProcessImage:
    """/proc/PID/{mem,pagemap,maps} of one verified process image (rules 1-4 above)."""

    def __init__(self, pid: int, uid: int, gid: int):
        """Open (rule 1) and check (rule 2).  ProtocolError (EPERM) if ``uid``/``gid`` may not ptrace it;
        OSError if it is gone.  The caller proves the uffd (``prove`` or ``prove_inherited``) and that the
        pid still names its peer (a pidfd) before any read."""
        self.pid, self.uid, self.gid = pid, uid, gid
        self.dir = self.mem = self.pagemap = self.maps = -1
        self.nonce, self.proof = b"", 0     # set once proven (rule 3)
        self.scan_ok = True                 # the kernel has PAGEMAP_SCAN (present)
        try:
            self.dir = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.mem = os.open("mem", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir)
            self.pagemap = os.open("pagemap", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir)
            self.maps = os.open("maps", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir)
            self.owner = self._owner()
            with open(os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dir), "rb") as f:
                status = f.read()
        except BaseException:
            self.close()
            raise
        why = ptrace_refusal(status, self.owner, uid, gid)
        if why:
            self.close()
            raise ProtocolError(f"pid {pid} may not be read for uid {uid}: {why} (the kernel would refuse "
                                f"uid {uid} ptrace)", errno.EPERM)

    def _owner(self) -> tuple[int, int]:
        st = os.stat("status", dir_fd=self.dir)    # a lookup: procfs refreshes the owner (pid_revalidate)
        return st.st_uid, st.st_gid

    # -- rule 3 -------------------------------------------------------------------

    def prove(self, uffd: Userfaultfd, page: int) -> None:
        """The uffd is this image's: a nonce copied through it into ``page`` (untouched, not registered)
        reads back through mem.  ProtocolError (EPERM) otherwise; the page is left unregistered."""
        if page <= 0 or page % PAGE_SIZE:
            raise ProtocolError(f"HELLO: proof page {page:#x} is not page-aligned", errno.EINVAL)
        nonce = os.urandom(NONCE)
        buf = AlignedBuffer(PAGE_SIZE)
        buf.view[:NONCE] = nonce
        try:
            uffd.register(page, PAGE_SIZE, RegisterMode.MISSING)
        except OSError as e:
            raise ProtocolError(f"HELLO: proof page {page:#x} cannot be registered: {e.strerror}", e.errno) from None
        try:
            uffd.copy(page, buf.address, PAGE_SIZE)
        except OSError as e:
            raise ProtocolError(f"HELLO: proof page {page:#x} cannot be filled: {e.strerror}", errno.EPERM) from None
        finally:
            try:
                uffd.unregister(page, PAGE_SIZE)
            except OSError:
                pass
        self._expect(page, nonce, "the userfaultfd HELLO carries is not this process's")

    def prove_inherited(self, page: int, nonce: bytes) -> None:
        """A fork child: its copy of the parent's proof page holds the parent's nonce."""
        self._expect(page, nonce, "it is not the image its parent forked (exec'd since?)")

    def _expect(self, page: int, nonce: bytes, why: str) -> None:
        try:
            got = os.pread(self.mem, NONCE, page)
        except OSError:
            got = b""
        if not nonce or got != nonce:
            raise ProtocolError(f"pid {self.pid}: {why}", errno.EPERM)
        self.nonce, self.proof = nonce, page

    # -- rule 4, and the reads ---------------------------------------------------------

    def check(self) -> None:
        """Before a batch of reads: ImageChanged if the process is not the one verified any more: ESRCH if its
        mm is gone (exec, exit: the proof page reads nothing), EPERM if it lives on with other credentials
        or undumpable."""
        try:
            alive = os.pread(self.mem, NONCE, self.proof) == self.nonce
        except OSError:
            alive = False
        if not alive:
            raise ImageChanged(errno.ESRCH, f"pid {self.pid} exec'd or exited (its verified memory is gone)")
        try:
            owner = self._owner()
        except OSError:
            raise ImageChanged(errno.ESRCH, f"pid {self.pid} exited") from None
        if self.uid != 0 and owner != self.owner:
            raise ImageChanged(errno.EPERM, f"pid {self.pid} changed credentials or became undumpable "
                                            f"(/proc/PID owned by {owner}, was {self.owner})")

    def present(self, a: int, b: int, regions: int, max_pages: int = 0) -> tuple[list[tuple[int, int]], int]:
        """Up to ``regions`` spans [start, end) of present pages in [a, b) from a on, at most ``max_pages`` pages
        in all (0: no limit), and where the walk stopped (b when it got to the end): the next call goes on from
        there.  Through pagemap (rule 1): nothing once the mm is gone."""
        if self.scan_ok:
            vec, walk_end = ffi.new("uint64_t[]", 2 * regions), ffi.new("uint64_t *")
            n = lib.uswap_pagemap_present(self.pagemap, a, b, vec, regions, max_pages, walk_end)
            if n >= 0:
                return [(vec[2 * i], vec[2 * i + 1]) for i in range(n)], walk_end[0] if walk_end[0] > a else b
            if n not in (-errno.ENOTTY, -errno.EINVAL):
                raise OSError(-n, os.strerror(-n))
            self.scan_ok = False
        # Without PAGEMAP_SCAN: one bounded chunk of pagemap at a time.
        end = min(b, a + SCAN_FALLBACK * PAGE_SIZE)
        tops = os.pread(self.pagemap, (end - a) // PAGE_SIZE * 8, a // PAGE_SIZE * 8)[7::8]
        spans = [(a + m.start() * PAGE_SIZE, a + m.end() * PAGE_SIZE) for m in _PRESENT_SPAN.finditer(tops)]
        return spans, end if len(tops) == (end - a) // PAGE_SIZE else b

    def count_present(self, a: int, b: int, max_pages: int, exclusive: bool = False) -> tuple[int, int]:
        """Present pages in [a, b) from a on (``exclusive``: only those this process maps alone), at most
        ``max_pages`` of them (present ones, for the walk), and where the count stopped (b when it got to the
        end): one call into C, however fragmented the pages are.  Pages mapped to the zero page are not
        counted (lib.uswap_pagemap_count), except by the fallback for kernels without PAGEMAP_SCAN."""
        if self.scan_ok:
            pages, walk_end = ffi.new("uint64_t *"), ffi.new("uint64_t *")
            rc = lib.uswap_pagemap_count(self.pagemap, a, b, max_pages, exclusive, pages, walk_end)
            if rc == 0:
                return pages[0], walk_end[0] if walk_end[0] > a else b
            if rc not in (-errno.ENOTTY, -errno.EINVAL):
                raise OSError(-rc, os.strerror(-rc))
            self.scan_ok = False
        spans, end = self.present(a, b, 1 << 16, max_pages)
        if exclusive:
            tops = b"".join(os.pread(self.pagemap, (e - s) // PAGE_SIZE * 8, s // PAGE_SIZE * 8)[7::8] for s, e in spans)
            return sum((t & 0x81) == 0x81 for t in tops), end
        return sum(e - s for s, e in spans) // PAGE_SIZE, end

    def read_maps(self) -> bytes:
        """The image's /proc/PID/maps (empty once its mm is gone)."""
        out, off = [], 0
        while True:
            chunk = os.pread(self.maps, 1 << 16, off)
            if not chunk:
                return b"".join(out)
            out.append(chunk)
            off += len(chunk)

    def close(self) -> None:
        for name in ("mem", "pagemap", "maps", "dir"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
            setattr(self, name, -1)
