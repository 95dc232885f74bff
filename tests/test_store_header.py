"""Layer 2: the header page format and size parsing (pure units)."""

import uuid

import pytest

from uswap.store.header import HEADER_BYTES, MAGIC, HeaderError, StoreHeader
from uswap.store.mkswap import validate_geometry
from uswap.units import format_size, parse_size


def header(**kw):
    fields = dict(page_size=4096, slot_count=1000, uuid=uuid.uuid4(), created=1_700_000_000,
                  host="testhost", created_by="uswap test")
    fields.update(kw)
    return StoreHeader(**fields)


def test_round_trip():
    h = header()
    page = h.pack()
    assert len(page) == 4096 and page.startswith(MAGIC)
    assert page[HEADER_BYTES:] == bytes(4096 - HEADER_BYTES)
    assert StoreHeader.unpack(page) == h
    assert h.file_size == 1001 * 4096


@pytest.mark.parametrize("offset,message", [
    (0, "bad magic"),
    (8, "format version"),
    (30, "checksum mismatch"),     # inside the UUID: only the crc can tell
    (150, None),                   # past the header fields: ignored
])
def test_damage_is_named(offset, message):
    page = bytearray(header().pack())
    page[offset] ^= 0x01
    if message is None:
        StoreHeader.unpack(bytes(page))
        return
    with pytest.raises(HeaderError, match=message):
        StoreHeader.unpack(bytes(page))


def test_short_header():
    with pytest.raises(HeaderError, match="shorter"):
        StoreHeader.unpack(b"USWAPSTR")


@pytest.mark.parametrize("text,value", [("4096", 4096), ("4K", 4096), ("4k", 4096), ("256M", 256 << 20),
                                        ("1G", 1 << 30), ("1.5G", 3 << 29), ("2GiB", 2 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1X", "-4K", "0.3K"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert format_size(4096) == "4K"
    assert format_size(3 << 29) == "1.5G"
    assert format_size(100) == "100B"


@pytest.mark.parametrize("size,page,message", [
    (4097, 4096, "whole number"),
    (4096, 4096, "no room for one slot"),
    (8192, 3000, "power of two"),
    (8192, 2048, "power of two"),
])
def test_geometry_rejects(size, page, message):
    with pytest.raises(ValueError, match=message):
        validate_geometry(size, page)


def test_geometry_counts_slots_after_the_header():
    assert validate_geometry(8192, 4096) == 1
    assert validate_geometry(1 << 30, 4096) == (1 << 18) - 1
