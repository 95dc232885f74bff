"""Which store slots are in use: the swap map's free list, allocated in clusters (C: csrc/daemon/uswap_slots.c).

Like the kernel's swap cluster allocator, allocation prefers a run of
contiguous free slots after the last one handed out, so that a batch of
victims becomes one write and, later, one readahead read.  The bitmap is in C
because the engines free slots from their own threads (a swapped-in page that
goes in writable: its slot is stale at once); only the event loop allocates.
A freed slot is forgotten by the store's codec in the same call, before it
can be handed out again: reading it back is an error from then on.

A store set (uswap.store.storeset) splits the slots into priority groups,
highest first: a slot is taken from the first group with a free one, as the
kernel fills its highest-priority swap area first.
"""

from __future__ import annotations

import errno

from uswap._core import ffi, lib
from uswap.core import check


class NoSlots(OSError):
    def __init__(self):
        super().__init__(errno.ENOSPC, "the store has no free slot")


class SlotAllocator:
    def __init__(self, count: int, codec=None, groups: tuple[int, ...] = ()):
        """``groups``: the priority groups' ends, highest priority first (the last is ``count``); none: one."""
        out = ffi.new("struct uswap_slots **")
        self._valid = codec.valid_array() if codec is not None else ffi.NULL   # kept alive with us
        check(lib.uswap_slots_new(count, self._valid, out))
        self.c = ffi.gc(out[0], lib.uswap_slots_destroy)
        if groups:
            check(lib.uswap_slots_set_groups(self.c, ffi.new("uint64_t[]", list(groups)), len(groups)))
        self.count = count
        self._first = ffi.new("uint64_t *")

    @property
    def in_use(self) -> int:
        return self.c.in_use

    def allocate(self, want: int) -> tuple[int, int]:
        """A run of free slots: (first, length) with 1 <= length <= want.

        The first run of ``want`` from the next-fit position on, else the
        longest run seen in a bounded look (a fragmented store costs a short
        scan, and a batch becomes a few writes instead of one).
        """
        got = lib.uswap_slots_alloc(self.c, want, self._first)
        if got == -errno.ENOSPC:
            raise NoSlots()
        check(got)
        return self._first[0], got

    def assign(self, zero, slots, count: int) -> None:
        """A writeback batch's slots: ``slots[i]`` for each page not all zeros (``zero[i]``), -1 for
        the others, in clusters; NoSlots with none taken."""
        if lib.uswap_slots_assign(self.c, zero, slots, count) == -errno.ENOSPC:
            raise NoSlots()

    def free(self, first: int, n: int = 1) -> None:
        if lib.uswap_slots_release(self.c, first, n) == -errno.EINVAL:
            raise AssertionError(f"slot in {first}..{first + n - 1} freed twice")

    def free_list(self, slots, count: int) -> None:
        """Free every ``slots[i] >= 0`` (i < count) and set it to -1."""
        if lib.uswap_slots_release_list(self.c, slots, count) == -errno.EINVAL:
            raise AssertionError("a slot of a writeback batch was freed twice")
