"""Per-slot crc32c of what this process wrote: wrong data is never handed back.

Like the kernel's swap map, this state lives only as long as the process that
owns the store.  A slot is trusted only between a completed write and the
next write or discard; a read whose data does not match raises EBADMSG.
"""

from __future__ import annotations

import array
import errno

from uswap._core import lib


class ChecksumError(OSError):
    def __init__(self, path: str, slot: int, expected: int, actual: int):
        self.slot = slot
        super().__init__(errno.EBADMSG, f"checksum mismatch in slot {slot}: expected {expected:#010x}, "
                                        f"read {actual:#010x}", path)


class SlotChecksums:
    def __init__(self, path: str, slot_count: int, page_size: int):
        self.path = path
        self.page_size = page_size
        # Invariant: for every slot with _valid[slot] set, _crc[slot] is the
        # crc32c of what this process last wrote there.
        self._crc = array.array("I", bytes(4 * slot_count))
        self._valid = bytearray(slot_count)

    def forget(self, first: int, count: int) -> None:
        """Before a write (a failed write leaves nothing trusted) and on discard."""
        self._valid[first:first + count] = bytes(count)

    def record(self, first: int, count: int, ptr) -> None:
        """After a write of ``count`` pages at ``ptr`` completed."""
        for i in range(count):
            self._crc[first + i] = lib.uswap_crc32c(0, ptr + i * self.page_size, self.page_size)
            self._valid[first + i] = 1

    def require_written(self, first: int, count: int) -> None:
        for i in range(count):
            if not self._valid[first + i]:
                raise ValueError(f"slot {first + i} holds nothing written since the store was opened")

    def verify(self, first: int, count: int, ptr) -> None:
        """After a read of ``count`` pages into ``ptr``."""
        for i in range(count):
            actual = lib.uswap_crc32c(0, ptr + i * self.page_size, self.page_size)
            if actual != self._crc[first + i]:
                raise ChecksumError(self.path, first + i, self._crc[first + i], actual)
