"""The compressed pool, as the daemon holds it (zswap's place in uswap; C: csrc/daemon/uswap_pool.h).

The pool sits at the slot level, in front of the store: whatever writes a slot (a region's writeback, a run's
eviction, Python's own slot writes) offers the page to the pool first, whatever reads a slot looks there first.
The daemon makes one when ``uswap daemon --pool SIZE`` is not 0 (the pool writes its oldest entries back
through the store's fd, or an nfs:// store's C connection: the codec view's remote store), and hands it to
every C path through
the two places they all look: the store's codec view (``store.codec_c``: the engines, writeback, Python's slot
I/O) and the slot allocator (a freed slot's entry is dropped before the slot can be taken again: P1).

Memory: the pool charges every byte it allocates, in pages, to ``charge``, a counter of its own that the
daemon's budget reads at every share-out (uswap.daemon.budget: the pool's pages come off the top of the
budget before regions and runs share the rest).  Why not the regions' ``struct uswap_budget.resident``,
which the region engines read in C at once: the pool serves regions and runs alike, and a charge there would
make the regions alone pay for the runs' pages, make the regions' reclaimer chase pages it cannot evict (its
resident count would hold the pool's), and be read by nobody while no region is mapped.  The budget needs no
faster view: see the invariant at ``pool_pages`` in budget.py.

Lifetime: made after the store opens, before any region or run; freed (``close``) after every region, run and
writeback that could use it has stopped, before the store closes (its write-backs use the store's fd or connection).
"""

from __future__ import annotations

from dataclasses import dataclass

from uswap._core import ffi, lib
from uswap.config import DEFAULTS
from uswap.core import check
from uswap.daemon.options import POOL_COMPRESSORS

# The compressors' C names, and the level each runs at (0: lz4's only one, LZ4_compress_default; zstd's default
# level, 3).
COMPRESSOR_IDS = {"lz4": "USWAP_POOL_LZ4", "zstd": "USWAP_POOL_ZSTD"}
LEVEL = 0
assert tuple(COMPRESSOR_IDS) == POOL_COMPRESSORS


@dataclass(frozen=True)
class PoolOptions:
    """``uswap daemon --pool SIZE --pool-compressor NAME`` (checked: uswap.daemon.options)."""
    max_bytes: int
    compressor: str = DEFAULTS.pool_compressor


class CompressedPool:
    """One pool over a store's slots.  ``c`` is the ``struct uswap_pool *`` the C paths are given."""

    def __init__(self, options: PoolOptions, *, slot_count: int, page_size: int, store_fd: int, codec_c):
        self.options = options
        self.page_size = page_size
        # Pages the pool's memory takes now (atomic in C; read here as one aligned 64-bit load).
        self.charge = ffi.new("int64_t *")
        self._codec_c = codec_c                 # the pool writes back through it: kept alive with the pool
        out = ffi.new("struct uswap_pool **")
        check(lib.uswap_pool_new(slot_count, page_size, getattr(lib, COMPRESSOR_IDS[options.compressor]), LEVEL,
                                 options.max_bytes, store_fd, codec_c, self.charge, out))
        self.c = out[0]
        self._stats = ffi.new("struct uswap_pool_stats *")

    @property
    def charged_pages(self) -> int:
        """What the budget charges the pool now (uswap.daemon.budget)."""
        return self.charge[0]

    def stats(self) -> dict:
        """The pool's part of `uswap status --json` ("pool"; names in docs/DESIGN.md)."""
        s = self._stats
        lib.uswap_pool_get_stats(self.c, s)
        stored, compressed = s.stored_pages, s.compressed_bytes
        return {
            "compressor": self.options.compressor,
            "max_bytes": s.max_bytes,
            "charged_bytes": s.charged_pages * self.page_size,
            "pool_bytes": s.pool_bytes,             # what max_bytes bounds; charged_bytes is it in whole pages
            "stored_pages": stored,
            "same_filled_pages": s.same_filled_pages,
            "compressed_bytes": compressed,
            # every page the pool holds over the bytes it holds them in (same-filled pages take none, as in
            # zram's mm_stat); null while it holds no compressed byte
            "ratio": round(stored * self.page_size / compressed, 2) if compressed else None,
            "stores": s.stores,
            "loads": s.loads,
            "rejected": s.rejected,
            "skipped": s.skipped,
            "written_back": s.written_back,
            "corrupted": s.corrupted,
            "write_ios": s.write_ios,               # the write-backs' pwrites (contiguous slots go in one)
        }

    def close(self) -> None:
        """Free the pool (its entries are gone: swap contents do not outlive the daemon).  Only once nothing
        can call into it: every engine stopped, every writeback ended, and the codec's and the allocator's
        ``pool`` fields cleared first (Daemon.close_pool)."""
        c, self.c = self.c, ffi.NULL
        if c != ffi.NULL:
            lib.uswap_pool_free(c)
