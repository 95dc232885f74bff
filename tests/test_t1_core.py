"""Layer 1: the C core's page helpers and error convention."""

import errno
import os

import pytest

from uswap._core import ffi, lib
from uswap.core import PAGE_SIZE, AlignedBuffer, check, crc32c, is_zero


def crc32c_reference(data: bytes) -> int:
    """Bit-by-bit crc32c, the definition, to cross-check the C code."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_vector():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


@pytest.mark.parametrize("length", [1, 7, 8, 9, 63, 4096, 4099])
def test_crc32c_matches_reference(length):
    data = os.urandom(length)
    assert crc32c(data) == crc32c_reference(data)


def test_crc32c_chains_like_zlib():
    a, b = os.urandom(1000), os.urandom(3096)
    assert crc32c(b, crc32c(a)) == crc32c(a + b)


def test_crc32c_catches_a_single_bit_flip():
    page = bytearray(os.urandom(PAGE_SIZE))
    before = crc32c(page)
    page[1234] ^= 0x10
    assert crc32c(page) != before


@pytest.mark.parametrize("where", [0, 7, 8, 63, 64, 4095])
def test_is_zero_sees_one_nonzero_byte_anywhere(where):
    page = bytearray(PAGE_SIZE)
    assert is_zero(page)
    page[where] = 1
    assert not is_zero(page)


def test_is_zero_tail_not_multiple_of_8():
    assert is_zero(bytes(13))
    assert not is_zero(bytes(12) + b"\x01")


@pytest.mark.parametrize("align", [512, 4096, 65536])
def test_aligned_buffer_is_aligned_and_zeroed(align):
    buf = AlignedBuffer(3 * PAGE_SIZE, align)
    assert buf.address % align == 0
    assert is_zero(buf)
    buf.page(2)[:4] = b"abcd"
    assert bytes(buf.view[2 * PAGE_SIZE:2 * PAGE_SIZE + 4]) == b"abcd"


@pytest.mark.parametrize("size,align", [(0, 4096), (-1, 4096), (4096, 3000), (4096, 0)])
def test_aligned_buffer_rejects_bad_arguments(size, align):
    with pytest.raises(ValueError):
        AlignedBuffer(size, align)


def test_check_turns_negative_errno_into_oserror():
    assert check(5) == 5
    with pytest.raises(OSError) as info:
        check(-errno.ENOSPC, "/some/file")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == "/some/file"
    assert "No space" in str(info.value)


def test_c_functions_return_negative_errno(tmp_path):
    buf = AlignedBuffer(PAGE_SIZE)
    assert lib.uswap_pread_full(-1, buf.ptr, PAGE_SIZE, 0) == -errno.EBADF
    r, w = os.pipe()
    try:
        out = ffi.new("struct uswap_extent[]", 1)
        assert lib.uswap_fiemap(r, 0, 4096, 0, out, 1) < 0
    finally:
        os.close(r)
        os.close(w)


def test_pread_full_stops_at_end_of_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 5000)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = AlignedBuffer(2 * PAGE_SIZE)
        assert lib.uswap_pread_full(fd, buf.ptr, 2 * PAGE_SIZE, 0) == 5000
        assert bytes(buf.view[:5000]) == b"x" * 5000
    finally:
        os.close(fd)
