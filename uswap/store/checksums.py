"""What a store does to each slot's page on the way out and back: a slot codec.

Wrong data is never handed back.  Two codecs, one interface, used by the local
store (uswap.store.swapfile) and the NFS store (uswap.nfs.store) alike:

  * :class:`SlotChecksums` (``--encrypt off``): each slot's crc32c;
  * :class:`uswap.store.sealing.SlotSealer` (``--encrypt on``): each slot
    encrypted and authenticated (AES-256-GCM) under a key only this process
    holds, its tag and write generation kept here.

Like the kernel's swap map, this state lives only as long as the process that
owns the store.  A store calls, for a write: :meth:`SlotCodec.encode` before
the I/O (the buffer may be transformed in place: its contents are the codec's
from then on) and :meth:`SlotCodec.written` once it completed; for a read:
:meth:`SlotCodec.require_written` before, :meth:`SlotCodec.decode` after (in
place; a mismatch raises :class:`ChecksumError`, EBADMSG).  A freed slot is
forgotten by the daemon's slot allocator, in C, through :meth:`valid_array`.
"""

from __future__ import annotations

import array
import errno

from uswap._core import ffi, lib


class ChecksumError(OSError):
    """A slot's data did not verify (EBADMSG): corrupted, stale or replayed; never handed back."""

    def __init__(self, path: str, slot: int, message: str):
        self.slot = slot
        super().__init__(errno.EBADMSG, message, path)


class SlotCodec:
    """The shared half: which slots hold something this process wrote.

    Invariant: a slot is trusted (``_valid`` set) only between a completed
    write and the next write or its free; a failed write leaves it untrusted.
    Subclasses keep, per trusted slot, what :meth:`decode` checks against.
    """

    encryption = "off"   # what `uswap status` shows

    def __init__(self, path: str, slot_count: int, page_size: int):
        self.path = path
        self.page_size = page_size
        self._valid = bytearray(slot_count)
        self._c_valid = None

    def forget(self, first: int, count: int) -> None:
        """At the start of every write (a freed slot is forgotten by the slot allocator)."""
        self._valid[first:first + count] = bytes(count)

    def encode(self, first: int, count: int, ptr) -> None:
        """Before a write of ``count`` pages at ``ptr`` to slots ``first``..: may transform them in place."""
        self.forget(first, count)
        self._encode(first, count, ptr)

    def written(self, first: int, count: int) -> None:
        """After that write completed: the slots are trusted."""
        self._valid[first:first + count] = b"\1" * count

    def require_written(self, first: int, count: int) -> None:
        for i in range(count):
            if not self._valid[first + i]:
                raise ValueError(f"slot {first + i} holds nothing written since the store was opened")

    def decode(self, first: int, count: int, ptr) -> None:
        """After a read of ``count`` pages into ``ptr``: verify (and decrypt) in place, or ChecksumError."""
        raise NotImplementedError

    def close(self) -> None:
        """When the store closes: drop any secret."""

    def c_view(self):
        """A ``struct uswap_codec *`` over this codec's arrays, for C (the fault engine and
        writeback) to check, decrypt and record slots exactly as the methods here do.
        Valid while this codec lives; the arrays never move (fixed size)."""
        view = ffi.new("struct uswap_codec *")
        view.page_size = self.page_size
        view.slot_count = len(self._valid)
        view.valid = self.valid_array()
        self._fill_c_view(view)
        return view

    def valid_array(self):
        """The per-slot "written" flags as a C array (the slot allocator clears a freed slot's)."""
        if self._c_valid is None:
            self._c_valid = ffi.from_buffer("uint8_t[]", self._valid)
        return self._c_valid

    def _fill_c_view(self, view) -> None:
        raise NotImplementedError

    def _encode(self, first: int, count: int, ptr) -> None:
        raise NotImplementedError


class SlotChecksums(SlotCodec):
    """crc32c per slot (no encryption): detects every 1-, 2- and 3-bit error in a page."""

    def __init__(self, path: str, slot_count: int, page_size: int):
        super().__init__(path, slot_count, page_size)
        # Invariant: for every trusted slot, _crc[slot] is the crc32c of what this process last wrote there.
        self._crc = array.array("I", bytes(4 * slot_count))

    def _encode(self, first: int, count: int, ptr) -> None:
        for i in range(count):
            self._crc[first + i] = lib.uswap_crc32c(0, ptr + i * self.page_size, self.page_size)

    def _fill_c_view(self, view) -> None:
        self._c_crc = ffi.from_buffer("uint32_t[]", self._crc)
        view.crc = self._c_crc
        view.sealer = ffi.NULL

    def decode(self, first: int, count: int, ptr) -> None:
        for i in range(count):
            actual = lib.uswap_crc32c(0, ptr + i * self.page_size, self.page_size)
            expected = self._crc[first + i]
            if actual != expected:
                raise ChecksumError(self.path, first + i, f"checksum mismatch in slot {first + i}: "
                                                          f"expected {expected:#010x}, read {actual:#010x}")
