"""Slots sealed with an AEAD: swapped data is unreadable on the medium and after we stop.

``--encrypt on`` (the default, for every store): each page is encrypted and
authenticated with AES-256-GCM in the C core (csrc/daemon/uswap_seal.c, OpenSSL
libcrypto) under a 256-bit key made with getrandom() when the store is opened
and held only in one locked, undumpable page of this process; it is wiped when
the store closes.  Nothing on disk or on the NFS server can be read without
it, so freed slots, a stopped daemon's store and a server's copy hold only
ciphertext.

Each seal takes a fresh write generation (the GCM nonce) from the sealer's
64-bit counter, and the slot number is authenticated data.  Per slot we keep
the generation and the 16-byte tag (25 bytes with the trusted flag: 6.25 MiB
per GiB of store; crc32c needs 5).  So a flipped bit, a page written for
another slot, or an older ciphertext of this slot (a replay, or a write the
server executed late) fails like a checksum mismatch: ChecksumError, EBADMSG,
and the daemon's retry-then-poison policy applies unchanged.

Cost per 4 KiB page: docs/BENCHMARKS.md ("Sealed slots").
"""

from __future__ import annotations

import errno

from uswap._core import ffi, lib
from uswap.core import check
from uswap.store.checksums import ChecksumError, SlotChecksums, SlotCodec

ENCRYPT_MODES = ("on", "off")   # --encrypt; the default is the first
TAG_BYTES = lib.USWAP_SEAL_TAG_BYTES


class SlotSealer(SlotCodec):
    """AES-256-GCM per slot under an ephemeral key (the C sealer)."""

    encryption = "aes-256-gcm"

    def __init__(self, path: str, slot_count: int, page_size: int):
        super().__init__(path, slot_count, page_size)
        out = ffi.new("struct uswap_sealer **")
        check(lib.uswap_sealer_new(out), path)
        self._sealer = ffi.gc(out[0], lib.uswap_sealer_free)
        # Invariant: for every trusted slot, _gens[slot] and _tags[slot * TAG_BYTES:] are the
        # generation and tag of what this process last wrote there.  Generation 0: never sealed.
        self._gens = ffi.new("uint64_t[]", slot_count)
        self._tags = ffi.new("uint8_t[]", slot_count * TAG_BYTES)

    def _encode(self, first: int, count: int, ptr) -> None:
        check(lib.uswap_seal_pages(self._live(), ptr, count, self.page_size, first,
                                   self._gens + first, self._tags + first * TAG_BYTES), self.path)

    def decode(self, first: int, count: int, ptr) -> None:
        bad = ffi.new("int *")
        ret = lib.uswap_open_pages(self._live(), ptr, count, self.page_size, first,
                                   self._gens + first, self._tags + first * TAG_BYTES, bad)
        if ret == -errno.EBADMSG:
            slot = first + bad[0]
            raise ChecksumError(self.path, slot, f"slot {slot} failed authentication ({self.encryption}): "
                                                 "its data is corrupted, stale or replayed")
        check(ret, self.path)

    def _fill_c_view(self, view) -> None:
        view.sealer = self._live()
        view.gens = self._gens
        view.tags = self._tags

    def close(self) -> None:
        sealer, self._sealer = self._sealer, None
        if sealer is not None:
            ffi.release(sealer)   # uswap_sealer_free: the key is wiped now, not at garbage collection

    def _live(self):
        if self._sealer is None:
            raise OSError(errno.EBADF, "the store is closed: its key is gone", self.path)
        return self._sealer


def slot_codec(path: str, slot_count: int, page_size: int, *, encrypt: bool) -> SlotCodec:
    """The codec a store uses: sealed (AES-256-GCM) or crc32c only."""
    cls = SlotSealer if encrypt else SlotChecksums
    return cls(path, slot_count, page_size)
