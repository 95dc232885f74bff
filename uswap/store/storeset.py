"""Several stores behind one slot space, like ``swapon -p``: ``uswap daemon --store URL[,prio=N] --store ...``.

Each member is opened, checked and locked by the class its URL names
(uswap.store.opening), local paths and nfs:// alike.  The set has one slot
codec over its virtual slots, and its C view names the set
(csrc/daemon/uswap_storeset.h) as its remote store: every C path that reads or
writes a slot (the fault engines, writeback, the compressed pool, the slot I/O
here) goes through the set to the member that holds the slot.  Members of
equal priority are striped by clusters of USWAP_SET_CLUSTER slots; a higher
priority group fills first (the slot allocator's groups, uswap.daemon.slots).

With ``--copies 2`` every slot is kept on two members of its group (like
RAID 1; the layout and the rules for writes, reads and resync are in
csrc/daemon/uswap_storeset.h): a read falls back to the other copy when a
member fails, and :meth:`StoreSet.maintain` brings a member back in the
background once it answers again.

The members have no codec of their own (``own_codec=False``: one over no
slots): the set's covers every slot.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re

import trio

from uswap._core import ffi, lib
from uswap.core import AlignedBuffer, check
from uswap.store.base import SlotIO, Store, StoreOptions
from uswap.store.checksums import ChecksumError
from uswap.store.lock import StoreError
from uswap.store.sealing import slot_codec
from uswap.store.swapfile import local_slot_io, read_slots_through_c, slot_span

MAX_PRIO = 32767                        # as swapon's --priority
MAX_MEMBERS = lib.USWAP_SET_MAX_MEMBERS
MAX_COPIES = lib.USWAP_SET_MAX_COPIES
CLUSTER = lib.USWAP_SET_CLUSTER
RESYNC_INTERVAL = 1.0                   # seconds between passes of StoreSet.maintain
RESYNC_CLUSTERS = 256                   # clusters copied back per pass at most (64 MiB of 4 KiB pages)

log = logging.getLogger("uswap.store")
_PRIO = re.compile(r"(?P<url>.+),prio=(?P<prio>[^,]*)")


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """One ``--store``: a path or URL, and its priority (higher fills first)."""
    url: str
    prio: int = 0

    @classmethod
    def parse(cls, text: str) -> "StoreSpec":
        """``URL`` or ``URL,prio=N``; only a last ``,prio=`` is the priority (a path or an NFS URL's
        ``?`` parameters may hold commas).  ValueError (one line) for a bad priority."""
        m = _PRIO.fullmatch(text)
        if not m:
            return cls(text)
        prio = m["prio"]
        if not re.fullmatch(r"[0-9]+", prio) or int(prio) > MAX_PRIO:
            raise ValueError(f"bad priority {prio!r} in --store {text!r}: a whole number from 0 to {MAX_PRIO}")
        return cls(m["url"], int(prio))

    def failure_domain(self) -> tuple:
        """What a copy on this store is lost with: its NFS server, or for a local path its filesystem."""
        if self.url.startswith("nfs:"):
            from uswap.nfs.url import NfsUrl
            return ("nfs", NfsUrl.parse(self.url).server.lower())
        path = os.path.abspath(self.url)
        while True:                 # the store, or the nearest directory that exists (it is made later)
            try:
                return ("dev", os.stat(path).st_dev)
            except OSError:
                if path == os.path.dirname(path):
                    return ("path", path)
                path = os.path.dirname(path)

    def identity(self) -> tuple:
        """What names the same store however it is spelt: the file (its inode if it exists), or the NFS
        server, export and file."""
        if self.url.startswith("nfs:"):
            from uswap.nfs.url import NfsUrl    # parsing only: no libnfs
            url = NfsUrl.parse(self.url)
            return ("nfs", url.server.lower(), url.export.rstrip("/"), url.file)
        try:
            st = os.stat(self.url)
            return ("file", st.st_dev, st.st_ino)
        except FileNotFoundError:
            return ("path", os.path.realpath(self.url))


def store_specs(texts: list[str], copies: int = 1) -> list[StoreSpec]:
    """The ``--store`` options, checked before anything is opened or made: priorities, the same store
    twice, too many, enough stores of each priority for ``copies``.  ValueError in one line."""
    if not 1 <= copies <= MAX_COPIES:
        raise ValueError(f"--copies {copies}: 1 to {MAX_COPIES}")
    specs = [StoreSpec.parse(text) for text in texts]
    if len(specs) > MAX_MEMBERS:
        raise ValueError(f"{len(specs)} stores given: at most {MAX_MEMBERS}")
    seen: dict[tuple, str] = {}
    for spec in specs:
        key = spec.identity()
        if key in seen:
            same = "" if seen[key] == spec.url else f" (as {seen[key]!r} and {spec.url!r})"
            raise ValueError(f"the store {spec.url} is given twice{same}: each --store must be another store")
        seen[key] = spec.url
    if copies > 1:
        for prio in sorted({spec.prio for spec in specs}, reverse=True):
            group = [spec for spec in specs if spec.prio == prio]
            if len(group) < copies:
                raise ValueError(f"--copies {copies} keeps each slot on {copies} stores of one priority: "
                                 f"priority {prio} has {len(group)} ({', '.join(s.url for s in group)})")
            domains = {spec.failure_domain() for spec in group}
            if len(domains) < len(group):
                log.warning("--copies %d: some stores of priority %d are on the same server or filesystem, "
                            "so one failure can lose both copies of a slot", copies, prio)
    return specs


class StoreSet(Store):
    """Open stores behind one slot space.  Use :meth:`open_for_use` with the specs; ``await aclose()``."""

    fd = -1   # no local fd: the codec's remote store (the set) instead

    def __init__(self, members: list[tuple[StoreSpec, Store]], *, encrypt: bool, close_timeout: float = 60.0,
                 copies: int = 1):
        sizes = {store.page_size for _, store in members}
        if len(sizes) != 1:
            raise StoreError(errno.EINVAL, f"the stores have different page sizes ({sorted(sizes)})",
                             members[0][1].path)
        for spec, store in members:
            if store.slot_count < CLUSTER * copies:
                raise StoreError(errno.ENOSPC, f"{store.slot_count} slots: a store of a set needs at least "
                                               f"{CLUSTER * copies} (one stripe cluster{' per copy' * (copies > 1)})",
                                 store.path)
        self.members = members
        self.timeout_fails_every_slot = len(members) == 1
        self.close_timeout = close_timeout     # each member's close (an NFS server may be down)
        self.page_size = sizes.pop()
        self.path = " + ".join(store.path for _, store in members)
        specs = ffi.new("struct uswap_set_member[]", len(members))
        for spec_c, (spec, store) in zip(specs, members):
            spec_c.prio = spec.prio
            spec_c.slots = store.slot_count
            spec_c.fd = store.local_fd
            if store.local_fd < 0:          # a remote store: the functions its codec view names
                spec_c.remote_pread = store.codec_c.remote_pread
                spec_c.remote_pwrite = store.codec_c.remote_pwrite
                spec_c.remote = store.codec_c.remote
                spec_c.remote_up = store.remote_up or ffi.NULL
        out = ffi.new("struct uswap_storeset **")
        check(lib.uswap_storeset_new(self.page_size, specs, len(members), copies, out), self.path)
        self.copies = copies
        self.c = out[0]                     # freed by aclose, after everything using it stopped
        self.slot_count = lib.uswap_storeset_slot_count(self.c)
        ends = ffi.new("uint64_t[]", MAX_MEMBERS)
        self.slot_groups = tuple(ends[0:lib.uswap_storeset_groups(self.c, ends, MAX_MEMBERS)])
        self.codec = slot_codec(self.path, self.slot_count, self.page_size, encrypt=encrypt)
        self.codec_c = self.codec.c_view()
        self.codec_c.remote = self.c
        self.codec_c.remote_pread = ffi.addressof(lib, "uswap_storeset_pread")
        self.codec_c.remote_pwrite = ffi.addressof(lib, "uswap_storeset_pwrite")
        if copies == 1 and all(store.local_fd >= 0 for _, store in members):   # io_uring reads the files
            self.codec_c.remote_local = ffi.addressof(lib, "uswap_storeset_local")
        self._stats = ffi.new("struct uswap_set_member_stats *")
        self._used = ffi.new("uint64_t[]", len(members))
        self._state = ["ok"] * len(members)         # each member's as last logged: ok, down, stale

    @classmethod
    async def open_for_use(cls, spec, options: StoreOptions) -> "StoreSet":
        """``spec``: the members (a list of StoreSpec, from :func:`store_specs`)."""
        from uswap.store.opening import store_class
        member_options = dataclasses.replace(options, encrypt=False, own_codec=False)   # the set's codec seals
        members: list[tuple[StoreSpec, Store]] = []
        try:
            for member in spec:
                store = await store_class(member.url).open_for_use(member.url, member_options)
                members.append((member, store))
            return cls(members, encrypt=options.encrypt, close_timeout=options.nfs_timeout, copies=options.copies)
        except BaseException:
            await _close_members(members, options.nfs_timeout)
            raise

    async def aclose(self) -> None:
        members, self.members = self.members, []
        if not members:
            return
        self.codec.close()
        try:
            await _close_members(members, self.close_timeout)
        finally:
            lib.uswap_storeset_free(self.c)
            self.c = ffi.NULL

    async def maintain(self) -> None:
        """With copies: every RESYNC_INTERVAL, probe the members that are down and copy their stale clusters
        back (uswap_storeset_resync, on a worker thread: a probe of a server that is down waits as a read
        does, and a stop waits for that one pass); log each member once as it fails and as it is whole again."""
        if self.copies == 1:
            return
        while True:
            if self._log_changes():
                await trio.to_thread.run_sync(lib.uswap_storeset_resync, self.c, RESYNC_CLUSTERS)
                self._log_changes()
            await trio.sleep(RESYNC_INTERVAL)

    def _log_changes(self) -> bool:
        """Log the members whose state changed since the last call; whether any is down or stale."""
        behind = False
        for i, (_, store) in enumerate(self.members):
            s = self._stats
            lib.uswap_storeset_stats(self.c, i, s)
            state = "down" if s.down else "stale" if s.stale_slots else "ok"
            behind = behind or state != "ok"
            if state == self._state[i]:
                continue
            if state == "down":
                error = os.strerror(-s.last_error) if s.last_error else "its server is unreachable"
                log.warning("store %s failed (%s): its slots are read from their other copy, and written to "
                            "one copy only until it is back", store.path, error)
            elif state == "stale":
                log.info("store %s answers again: copying back the %d slots it missed", store.path, s.stale_slots)
            elif self._state[i] != "ok":
                log.info("store %s holds every copy again (%d slots copied back so far)", store.path,
                         s.resynced_slots)
            self._state[i] = state
        return behind

    @property
    def local_fd(self) -> int:
        return -1   # the engines read through the codec view's remote store: the set

    def slot_io(self, mode: str) -> SlotIO:
        """All members local: ``sync`` or ``async`` as for one local store; any remote member: worker threads."""
        from uswap.store.slot_io import RemoteSlotIO
        if any(store.local_fd < 0 for _, store in self.members):
            return RemoteSlotIO(self)
        return local_slot_io(self, mode)

    def _span(self, first: int, count: int, buf: AlignedBuffer, buf_page: int):
        slot_span(self, first, count, buf, buf_page)   # the set has a store's slot_count and page_size
        return buf.ptr + buf_page * self.page_size

    def write_slots(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """As uswap.store.swapfile.SwapStore.write_slots, through the set (blocking)."""
        ptr = self._span(first, count, buf, buf_page)
        check(lib.uswap_pool_write_slots(self.codec_c, -1, ptr, first, count, ffi.NULL), self.path)

    def read_slots(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """As uswap.store.swapfile.SwapStore.read_slots, through the set (blocking); a slot that fails its
        check is named in its member too."""
        try:
            read_slots_through_c(self, first, count, self._span(first, count, buf, buf_page))
        except ChecksumError as e:
            member, slot = self.locate(e.slot)
            raise ChecksumError(member.path, e.slot, f"{e.strerror} (the set's slot {e.slot} is slot {slot} of "
                                                     f"{member.path})") from None

    def locate(self, slot: int, copy: int = 0) -> tuple[Store, int]:
        """The member holding copy ``copy`` of the set's ``slot``, and its slot there."""
        m, member_slot, run = ffi.new("uint32_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        check(lib.uswap_storeset_locate(self.c, slot, copy, m, member_slot, run), self.path)
        return self.members[m[0]][1], member_slot[0]

    def slots_on_one_server(self, slot: int, count: int) -> int:
        m, member_slot, run = ffi.new("uint32_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        check(lib.uswap_storeset_locate(self.c, slot, 0, m, member_slot, run), self.path)
        return min(count, run[0])      # a cluster's copies are whole clusters too

    def status(self, slots=None) -> dict:
        """The codec's encryption and a ``stores`` list (per member: url, prio, slots, used_slots from the
        allocator ``slots`` if given, transfers, bytes, errors, health, ``nfs`` for an nfs:// one); the
        ``nfs`` object at the top too when exactly one member is on NFS."""
        have_used = slots is not None and lib.uswap_storeset_used(self.c, slots.c, self._used) == 0
        stores = []
        for i, (spec, store) in enumerate(self.members):
            s = self._stats
            lib.uswap_storeset_stats(self.c, i, s)
            health = "ok" if s.last_error == 0 else os.strerror(-s.last_error)
            if s.down:
                health = f"down ({health})" if s.last_error else "down"
            elif s.stale_slots:
                health = f"resyncing ({s.stale_slots} slots behind)"
            entry = {"url": store.path, "prio": spec.prio, "slots": s.slots,
                     "used_slots": self._used[i] if have_used else None, "reads": s.reads, "writes": s.writes,
                     "read_bytes": s.read_bytes, "write_bytes": s.write_bytes, "errors": s.errors}
            if self.copies > 1:
                entry.update(down=bool(s.down), stale_slots=s.stale_slots, fallbacks=s.fallbacks,
                             resynced_slots=s.resynced_slots)
            nfs = store.status().get("nfs")
            if nfs is not None:
                entry["nfs"] = nfs
                if nfs["state"] != "up" and health == "ok":
                    health = f"server {nfs['state']}"
            entry["health"] = health
            stores.append(entry)
        out = {"encryption": self.codec.encryption, "stores": stores, "copies": self.copies}
        on_nfs = [entry["nfs"] for entry in stores if "nfs" in entry]
        if len(on_nfs) == 1:
            out["nfs"] = on_nfs[0]
        return out


async def _close_members(members: list[tuple[StoreSpec, Store]], timeout: float) -> None:
    """Close every member (each bounded by ``timeout``), the last opened first."""
    for _, store in reversed(members):
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            await store.aclose()
