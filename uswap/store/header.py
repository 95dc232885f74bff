"""The store's header page, in the spirit of mkswap's swap header.

Page 0 of a store file; slots follow, slot N at offset (N + 1) * page_size.
All integers little-endian; the rest of the page is zero.

    offset  size  field
         0     8  magic b"USWAPSTR"
         8     4  format version (1)
        12     4  page size (bytes; also the slot size)
        16     8  slot count
        24    16  UUID
        40     8  creation time (Unix seconds)
        48    64  creating host name (UTF-8, NUL-padded)
       112    32  creating program, e.g. "uswap 0.1.0"
       144     4  crc32c of bytes [0, 144)
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

from uswap.core import crc32c

MAGIC = b"USWAPSTR"
VERSION = 1
_LAYOUT = struct.Struct("<8sIIQ16sQ64s32s")
_CRC = struct.Struct("<I")
HEADER_BYTES = _LAYOUT.size + _CRC.size


class HeaderError(ValueError):
    """The header page does not describe a usable uswap store."""


@dataclass(frozen=True)
class StoreHeader:
    page_size: int
    slot_count: int
    uuid: uuidlib.UUID
    created: int
    host: str
    created_by: str
    version: int = VERSION

    @property
    def file_size(self) -> int:
        """Bytes the file must have: the header page plus every slot."""
        return (self.slot_count + 1) * self.page_size

    def pack(self) -> bytes:
        """The whole header page."""
        fields = _LAYOUT.pack(MAGIC, self.version, self.page_size, self.slot_count, self.uuid.bytes,
                              self.created, self.host.encode()[:64], self.created_by.encode()[:32])
        page = fields + _CRC.pack(crc32c(fields))
        return page + bytes(self.page_size - len(page))

    @classmethod
    def unpack(cls, page: bytes) -> "StoreHeader":
        """Parse a header page; HeaderError says what is wrong in words."""
        if len(page) < HEADER_BYTES:
            raise HeaderError(f"header is {len(page)} bytes, shorter than {HEADER_BYTES}")
        fields = bytes(page[:_LAYOUT.size])
        magic, version, page_size, slots, raw_uuid, created, host, by = _LAYOUT.unpack(fields)
        if magic != MAGIC:
            raise HeaderError(f"bad magic {magic!r}: not a uswap store (make one with uswap mkswap)")
        if version != VERSION:
            raise HeaderError(f"format version {version} is not supported (this uswap reads version {VERSION})")
        (stored_crc,) = _CRC.unpack_from(page, _LAYOUT.size)
        if stored_crc != crc32c(fields):
            raise HeaderError("header checksum mismatch: the header page is damaged")
        if page_size < 512 or page_size & (page_size - 1):
            raise HeaderError(f"bad page size {page_size} in header")
        return cls(page_size=page_size, slot_count=slots, uuid=uuidlib.UUID(bytes=raw_uuid), created=created,
                   host=host.rstrip(b"\0").decode(errors="replace"),
                   created_by=by.rstrip(b"\0").decode(errors="replace"), version=version)
