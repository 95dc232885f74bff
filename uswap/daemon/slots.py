"""Which store slots are in use: the swap map's free list, allocated in clusters.

Like the kernel's swap cluster allocator, allocation prefers a run of
contiguous free slots after the last one handed out, so that a batch of
victims becomes one write and, later, one readahead read.
"""

from __future__ import annotations

import errno


class NoSlots(OSError):
    def __init__(self):
        super().__init__(errno.ENOSPC, "the store has no free slot")


class SlotAllocator:
    def __init__(self, count: int):
        self.count = count
        self.in_use = 0
        self._used = bytearray(count)  # 1 = in use
        self._next = 0                 # where the next search starts (next-fit)

    def allocate(self, want: int) -> tuple[int, int]:
        """A run of free slots: (first, length) with 1 <= length <= want.

        The longest run up to ``want`` found from the next-fit position, trying
        halves of ``want`` before settling for fewer.
        """
        n = want
        while n >= 1:
            first = self._find(bytes(n))
            if first >= 0:
                self._used[first:first + n] = b"\x01" * n
                self.in_use += n
                self._next = first + n if first + n < self.count else 0
                return first, n
            n //= 2
        raise NoSlots()

    def _find(self, run: bytes) -> int:
        first = self._used.find(run, self._next)
        if first < 0:
            first = self._used.find(run, 0)
        return first

    def free(self, first: int, n: int = 1) -> None:
        for slot in range(first, first + n):
            if not self._used[slot]:
                raise AssertionError(f"slot {slot} freed twice")
            self._used[slot] = 0
        self.in_use -= n
