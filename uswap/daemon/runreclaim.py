"""A run process's reclaim (part of uswap.daemon.runprocess.RunProcess): counting its pages, and eviction.

Counting: the present pages of the registered ranges, from /proc/PID/pagemap (PAGEMAP_SCAN skips holes; a
fork child counts only the pages it has alone), in chunks with a checkpoint between them.  Eviction, above the
run's line: spans of evictable pages (present, exclusively mapped, not SHARED) in address order from where the
last pass stopped (a FIFO, not a CLOCK: pagemap shows no accessed bit), in batches of up to BATCH_PAGES: one
claim, one write-protect, one /proc/PID/mem read and one slot write per batch, then one DROP of up to
MAX_SPANS spans to the process's agent, which moves the pages out (R1).  A CLEAN page needs no write (R7).
"""

from __future__ import annotations

import errno
import logging
import os
import re

import trio

from uswap._core import lib
from uswap.core import PAGE_SIZE
from uswap.daemon.runengine import CLAIMED, CLEAN, INFLIGHT, SHARED, SWAPPED, entry, state_of
from uswap.daemon.runproto import MAX_SPANS, MSG_SIZE, check_dropped, message, parse
from uswap.daemon.slots import NoSlots
from uswap.protocol import ProtocolError

log = logging.getLogger("uswap.daemon")

PS = PAGE_SIZE
SPAN_PAGES = 32                # pages per eviction span (one MOVE)
BATCH_PAGES = 1024             # pages per eviction batch at most (one slot write, one DROP of up to MAX_SPANS spans)
SCAN_CHUNK = 4096              # pages of pagemap read at a time (counts and passes): held at once at most
SCAN_REGIONS = 64              # spans of present pages found per PAGEMAP_SCAN; a checkpoint after each
SCAN_CAP = 1 << 18             # pages of pagemap one reclaim pass reads at most; the next goes on from there
COUNT_CHUNK = 1 << 16          # present pages counted in one call into C (well under a millisecond); a checkpoint after
DRAIN_ROUNDS = 100             # eviction: drains before a refused (EAGAIN) drop is given up
# /proc/PID/pagemap, top byte of an entry: bit 7 present, bit 0 exclusively mapped (bit 56)
_EVICTABLE = bytes(1 if b & 0x81 == 0x81 else 0 for b in range(256))


class RunReclaim:
    """The count and eviction of a RunProcess.  What it keeps of the process's state: ``resident`` (its count,
    less what was dropped since), ``cursor`` (where the next pass starts), ``evicted`` (pages dropped in the
    last pass) and ``stuck_until`` (set by the serve loop when a pass evicted nothing); it reads the
    process's ``image``, ``ranges``, ``table`` and talks to its agent on ``sock``."""

    def _tops(self, a: int, b: int) -> bytes:
        """The top byte of each pagemap entry of [a, b)."""
        data = os.pread(self.image.pagemap, (b - a) // PS * 8, a // PS * 8)
        return data[7::8]

    def _present(self, a: int, b: int):
        """[start, end) spans of present pages in [a, b), each at most SCAN_CHUNK pages, and how far the walk
        got (holes skipped by PAGEMAP_SCAN: a sparse 128 GiB range is as cheap as its present pages)."""
        spans, walked = self.image.present(a, b, SCAN_REGIONS)
        out = []
        for s, e in spans:
            out.extend((x, min(e, x + SCAN_CHUNK * PS)) for x in range(s, e, SCAN_CHUNK * PS))
        return out, walked

    async def _count(self) -> int | None:
        """Present pages of the registered ranges charged to this process (None: it may not be read any more).
        In chunks, a checkpoint between them: the trio loop serves every other client meanwhile.  The process
        the run started with is counted in C, up to COUNT_CHUNK present pages a call (PAGEMAP_SCAN skips holes;
        the spans of a fragmented range cost no Python); a fork child too, its pages' exclusive bits read in C
        from pagemap's entries of the present runs (it was a Python walk of SCAN_REGIONS spans a chunk, a
        checkpoint after each)."""
        # A page a fork shares is charged once, to the process the run started with (or the oldest one
        # still sharing it: a child counts only the pages it has alone).  Counting it in every process
        # (summed RSS) put a 2-worker pool permanently over its line with pages nobody can evict (a fork
        # shares them), and reclaim thrashed the rest.  Pages only siblings still share are charged to
        # none (a limit, RUN-DESIGN).
        exclusive = self.parent is not None
        present = 0
        for a, b in list(self.ranges):
            pos = a
            while pos < b:
                try:
                    pages, pos = self.image.count_present(pos, b, COUNT_CHUNK, exclusive)
                    present += pages
                except OSError:
                    break                   # gone meanwhile
                await trio.sleep(0)
                if not self.readable():     # awaited: again (procimage, rule 4)
                    return None
        return present

    async def reclaim(self, count: bool = True) -> None:
        """Above the line, evict spans in address order from where the last pass stopped (a FIFO, not a
        CLOCK).  ``count``: count the registered resident pages first (pagemap, each tick).  Between ticks
        (a pass because the run went over its line) the last count, less what was evicted since and plus
        what came in, stands for it, and pagemap is read only from the cursor on, as far as the pass goes:
        a whole count of a 256 MiB program every 2 ms was a fifth of the daemon's time."""
        if not self.readable():
            return
        shared = [a for a, _ in self.table.walk(states=(SHARED,))] if self.table.count(SHARED) else []
        if count:
            # The fault thread's count is read before the walk and taken after it, with no await between
            # the take and recount: meanwhile the run's total is the last count plus everything filled since
            # (never low), and after it the walk's count plus what was filled while it walked (which it may
            # have counted too: high by that, never low).  Taken before the walk, the total lost what was
            # filled since the last count for as long as the walk took (tens of ms between checkpoints), and
            # fault threads filling first-touch windows over that room took a 4-process hog under 8 MiB to
            # 4,165 pages resident (pagemap) on a 2,048-page line.
            before = self.engine.filled
            present = await self._count()
            if present is None:
                return
            during = self.engine.take_filled() - before
            # Pages MOVE refused (SHARED) stay until written, like mlocked pages: they are shown
            # (cow_shared_pages) but not held against the line, or the rest of the run thrashes under them
            # (a parent that read its pages after a child exited kept 4,868 such pages over a 4,096-page line).
            self.resident = max(0, present - len(shared)) + max(0, during)
            self.stats.max_resident_pages = max(self.stats.max_resident_pages, present)
        else:
            self.resident += self.engine.take_filled()
        self.tree.recount()
        self.tree.max_resident_pages = max(self.tree.max_resident_pages, self.tree.resident)
        want = self.over_line()
        if want <= 0 or self.sock is None:  # no agent (a raw fork's child): counted, served, never evicted
            return
        room = self.slot_room()
        if room < want and self.table.count(CLEAN):
            # Short of store room: CLEAN pages give their slots back first, as the kernel frees swap cache
            # when swap runs full.  They stay resident and protected; a write finds no entry and lifts it.
            for _, e in self.table.walk(states=(CLEAN,), take=True):
                self._forget(e)
            room = self.slot_room()
        if room < want:
            self.stats.no_room += 1
            self.daemon.log_limited(f"runroom {self.id}", logging.WARNING, "run %d (pid %d): no store room "
                                    "left for it (%d slot(s)): it stays above its budget", self.id, self.pid,
                                    max(room, 0))
            want = room
            if want <= 0:
                return
        batch: list[tuple[int, int]] = []
        pages = read = 0
        for start, evictable in self._candidates(shared):
            if start is None:               # the pass read SCAN_CAP pages of pagemap: the next one goes on from here
                self.cursor = evictable
                break
            for m in re.finditer(b"\x01+", evictable):
                first = start + m.start() * PS
                count = min(m.end() - m.start(), want)
                for off in range(0, count, SPAN_PAGES):
                    n = min(SPAN_PAGES, count - off)
                    batch.append((first + off * PS, n))
                    pages += n
                    if len(batch) == MAX_SPANS or pages > BATCH_PAGES - SPAN_PAGES:   # the next span may not fit
                        await self.evict(batch)
                        batch, pages = [], 0
                        if self.agent_gone:
                            return
                want -= count
                self.cursor = first + count * PS
                if want <= 0:
                    break
            if want <= 0:
                break
            read += len(evictable) + 64     # a pread costs as much as a few pages more
            if read >= SCAN_CHUNK:          # a checkpoint: the other clients.  (The candidates read before may be
                read = 0                    # stale after it: evict claims each page, and skips what has an entry.)
                await trio.sleep(0)
        else:
            self.cursor = 0
        if batch:
            await self.evict(batch)

    def _candidates(self, shared: list[int]):
        """(address, one byte per page from there: 1 evictable) over the registered ranges from the cursor
        on, read in chunks (at most SCAN_CHUNK pages of present pages, holes skipped) as the pass asks for
        them; SHARED pages are cut out (MOVE refused them).  A pass reads at most SCAN_CAP pages of pagemap:
        then (None, where to go on from)."""
        order = sorted(range(len(self.ranges)), key=lambda k: (self.ranges[k][1] <= self.cursor, self.ranges[k][0]))
        scanned = 0
        for k in order:
            a0, b0 = self.ranges[k]
            start = max(a0, self.cursor) if a0 < self.cursor < b0 else a0
            while start < b0:
                if scanned >= SCAN_CAP:
                    yield None, start
                    return
                try:
                    spans, walked = self._present(start, b0)
                except OSError:
                    break                       # gone meanwhile
                for s, end in spans:
                    try:
                        t = self._tops(s, end)
                    except OSError:
                        return                  # gone meanwhile
                    scanned += len(t)
                    evictable = t.translate(_EVICTABLE)
                    cut = [(a - s) // PS for a in shared if s <= a < end]
                    if cut:
                        evictable = bytearray(evictable)
                        for i in cut:
                            if i < len(evictable):
                                evictable[i] = 0
                    yield s, evictable
                scanned += 1                    # a walk that found nothing still costs
                start = walked

    async def evict(self, spans: list[tuple[int, int]]) -> None:
        """R1, in this order: claim (the fault thread then hands a write to these pages to
        Python, which cancels), write-protect, read through /proc/PID/mem, write slots, agent drop,
        publish SWAPPED.  A CLEAN page is claimed straight into INFLIGHT (R7): its slot holds it
        already, so it is neither read nor written, only dropped.  Whatever is still in flight at the end
        stays resident as CLEAN (protected, equal to its slot); what is still claimed stays resident."""
        t = self.table
        claimed, kept = [], []
        for a, n in spans:
            if not t.claim_evict(a, n):
                continue                        # a page of it has another entry (SHARED since the count)
            claimed.append((a, n))
            for _ in range(DRAIN_ROUNDS):
                try:
                    self.uffd.write_protect(a, n * PS)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        self.stats.eagain += 1
                        await self.drain()      # nothing of ours is in flight yet
                        continue
                    break                       # gone meanwhile
                kept.append((a, n))
                break
        async with self.tree.evict_lock:       # the buffer, from the read to the end of the write
            buf = self.tree.evict_buf
            room = self.slot_room()       # other runs may have taken slots since reclaim looked
            pos = 0
            read = []
            if not self.readable():             # awaited since reclaim's check: again
                kept = []                       # nothing is dropped either: the CLEAN pages stay so
            for a, n in kept:
                for f, k in t.spans(a, n, CLAIMED, n):   # the pages without a slot (CLEAN ones, INFLIGHT, have theirs)
                    if pos + k > room:
                        continue                    # write-protected but kept: a WP fault lifts the protection
                    try:
                        got = os.preadv(self.image.mem, [buf.view[pos * PS:(pos + k) * PS]], f)
                    except OSError:
                        got = 0
                    if got != k * PS:
                        continue                    # unmapped meanwhile; a WP fault lifts the protection
                    read.append((f, k, pos))
                    pos += k
            # One slot write for the batch (split only where the allocator gives a shorter range): slots follow
            # the buffer, so the pages of a span get consecutive slots (what swap-in readahead looks for).
            pages = [a + i * PS for a, n, _ in read for i in range(n)]
            done = 0
            while done < len(pages):
                try:
                    first, got = self.daemon.slots.allocate(len(pages) - done)
                except NoSlots:
                    self.daemon.log_limited("runslots", logging.ERROR, "run %d: the store is full", self.id)
                    break
                try:
                    await self.daemon.io.write(first, got, buf, done)
                except OSError as e:
                    self.daemon.slots.free(first, got)
                    self.daemon.stats.write_errors += 1
                    self.daemon.log_limited("runwrite", logging.ERROR, "run %d: slot write failed: %s", self.id, e)
                    break
                # the slots are complete; a page is still here unless written meanwhile (its claim cancelled)
                written = 0
                for i, ok in enumerate(t.assign(pages[done:done + got], CLAIMED, INFLIGHT, first)):
                    written += ok
                    if not ok:
                        self.tree.unref(first + i)
                self.stats.pswpout += written
                self.daemon.stats.pswpout += written
                done += got
        await self.drop(kept)
        for a, n in claimed:
            # Not moved.  Still in flight: protected and equal to its slot since its claim (a write would have
            # cancelled it, R3): CLEAN, its slot kept.  Still claimed: no slot; the page stays.
            t.change(a, n, (INFLIGHT,), CLEAN)
            for e in t.change(a, n, (CLAIMED,), 0):
                self._forget(e)
        self.tree.recount()                     # a fault thread waiting above the hard line sees the room

    async def drop(self, spans: list[tuple[int, int]]) -> None:
        """Ask the agent to move the INFLIGHT pages of ``spans`` out; what it moved is SWAPPED."""
        t = self.table
        for _ in range(DRAIN_ROUNDS):
            addrs, lens = [], []
            for a, n in spans:
                for first, k in t.spans(a, n, INFLIGHT, MAX_SPANS - len(addrs)):
                    addrs.append(first)
                    lens.append(k * PS)
                if len(addrs) == MAX_SPANS:
                    break
            if not addrs:
                return
            # No timeout: a stopped process (SIGSTOP) answers when it runs again, and faults nothing meanwhile.
            try:
                await self.sock.send(message(lib.USWAP_RUN_DROP, count=len(addrs), addr=addrs, len=lens))
                reply = check_dropped(parse(await self.sock.recv(MSG_SIZE + 1), lib.USWAP_RUN_DROPPED), addrs, lens)
            except (OSError, ProtocolError) as e:
                # Gone (exit, exec: EOF), or an answer that cannot be trusted: which pages moved is
                # unknown, so no slot may be dropped as if its page were still there.  Serving ends;
                # the agent, if alive, sees the connection close and answers faults with SIGBUS.
                log.info("run %d (pid %d): no answer to DROP (%s); ending the run", self.id, self.pid, e)
                self.agent_gone = True
                return
            self.stats.drops += 1
            again = refused = False
            # No await from here to the end of the loop body (R3): the pages asked for were
            # INFLIGHT when asked, and only Python changes an INFLIGHT entry.
            for k in range(reply.count):
                moved = reply.len[k] // PS
                t.change(reply.addr[k], moved, (INFLIGHT,), SWAPPED)
                self.stats.dropped += moved
                self.evicted += moved
                self.resident = max(0, self.resident - moved)   # until the next count
                err = reply.err[k]
                if not err:
                    continue
                if err == errno.EAGAIN:
                    again = True
                    continue
                self.stats.ebusy += err == errno.EBUSY
                self.stats.enoent += err == errno.ENOENT
                if err not in (errno.EBUSY, errno.ENOENT) and not self.stats.other_refusals:
                    log.warning("run %d (pid %d): the agent could not move a page: %s (first of its kind; "
                                "counted)", self.id, self.pid, os.strerror(err))
                self.stats.other_refusals += err not in (errno.EBUSY, errno.ENOENT)
                b = reply.addr[k] + moved * PS     # the page MOVE refused stays resident
                e = t.get(b)
                if state_of(e) == INFLIGHT:
                    t.set(b, entry(SHARED) if err == errno.EBUSY else 0)
                    self._forget(e)
                refused = True
            if not again and not refused:
                return
            if again:
                self.stats.eagain += 1
                await self.drain()
