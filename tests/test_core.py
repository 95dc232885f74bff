"""Layer 1: the C core's page helpers and error convention."""

import ctypes
import errno
import mmap
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


def _pagemap_count(pid: int, start: int, end: int, exclusive: bool) -> int:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        pages, walk_end = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        check(lib.uswap_pagemap_count(fd, start, end, 1 << 20, exclusive, pages, walk_end))
        assert walk_end[0] == end
        return pages[0]
    finally:
        os.close(fd)


def test_pagemap_count_leaves_out_the_zero_page_and_counts_exclusive_pages():
    """uswap_pagemap_count (a run's count): written pages count, pages a read mapped to the zero page do not; in
    exclusive mode (a fork child's count) only the pages the process maps alone."""
    m = mmap.mmap(-1, 64 * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(m)
    a = ctypes.addressof(view)
    end = a + 64 * PAGE_SIZE
    try:
        for i in range(16):
            m[i * PAGE_SIZE] = 1                      # written: pages 0-15
        assert sum(m[i * PAGE_SIZE] for i in range(16, 32)) == 0   # read: the zero page at 16-31
        assert _pagemap_count(os.getpid(), a, end, False) == 16
        assert _pagemap_count(os.getpid(), a, end, True) == 16
        ready_r, ready_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                  # the child: 4 pages copied on write, 2 fresh ones
            try:
                for i in (0, 1, 2, 3, 40, 41):
                    m[i * PAGE_SIZE] = 2
                os.write(ready_w, b"x")
                os.read(done_r, 1)
            finally:
                os._exit(0)
        try:
            assert os.read(ready_r, 1) == b"x"
            assert _pagemap_count(pid, a, end, False) == 18      # 12 shared with the parent, 4 copied, 2 fresh
            assert _pagemap_count(pid, a, end, True) == 6        # its own: the copies and the fresh ones
            assert _pagemap_count(os.getpid(), a, end, True) == 4  # the parent's 0-3 are its alone again
        finally:
            os.write(done_w, b"x")
            os.waitpid(pid, 0)
            for fd in (ready_r, ready_w, done_r, done_w):
                os.close(fd)
    finally:
        del view
        m.close()


# -- sealing (csrc/daemon/uswap_seal.c): AES-256-GCM per slot, slot number and generation bound in ----------

TAG = lib.USWAP_SEAL_TAG_BYTES


class Sealed:
    """Pages sealed by one C sealer, with the generations and tags the caller keeps."""

    def __init__(self, sealer, pages: int):
        self.sealer = sealer
        self.pages = pages
        self.buf = AlignedBuffer(pages * PAGE_SIZE)
        self.gens = ffi.new("uint64_t[]", pages)
        self.tags = ffi.new("uint8_t[]", pages * TAG)

    def seal(self, data: bytes, slot: int) -> None:
        self.buf.view[:] = data
        check(lib.uswap_seal_pages(self.sealer, self.buf.ptr, self.pages, PAGE_SIZE, slot, self.gens, self.tags))

    def open(self, slot: int) -> tuple[int, int]:
        """(return code, failing page index)."""
        bad = ffi.new("int *", -1)
        ret = lib.uswap_open_pages(self.sealer, self.buf.ptr, self.pages, PAGE_SIZE, slot, self.gens, self.tags, bad)
        return ret, bad[0]


@pytest.fixture
def sealer():
    out = ffi.new("struct uswap_sealer **")
    check(lib.uswap_sealer_new(out))
    yield out[0]
    lib.uswap_sealer_free(out[0])


def test_seal_round_trip(sealer):
    data = os.urandom(4 * PAGE_SIZE)
    s = Sealed(sealer, 4)
    s.seal(data, slot=100)
    ciphertext = bytes(s.buf.view)
    assert ciphertext != data and data[:64] not in ciphertext
    assert all(s.gens[i] for i in range(4))           # generation 0 means "never sealed"
    assert s.open(slot=100) == (0, -1)
    assert bytes(s.buf.view) == data


@pytest.mark.parametrize("where", ["page", "tag"])
def test_seal_one_flipped_bit_fails(sealer, where):
    data = os.urandom(3 * PAGE_SIZE)
    s = Sealed(sealer, 3)
    s.seal(data, slot=7)
    if where == "page":
        s.buf.view[PAGE_SIZE + 1234] ^= 0x10       # page 1
    else:
        s.tags[TAG + 5] ^= 0x01                     # page 1's tag
    ret, bad = s.open(slot=7)
    assert (ret, bad) == (-errno.EBADMSG, 1)
    assert bytes(s.buf.view[:PAGE_SIZE]) == data[:PAGE_SIZE]      # page 0 was fine
    assert bytes(s.buf.page(1)) == bytes(PAGE_SIZE)                # no unauthenticated plaintext left behind


def test_seal_page_opened_as_another_slot_fails(sealer):
    data = os.urandom(PAGE_SIZE)
    s = Sealed(sealer, 1)
    s.seal(data, slot=5)
    sealed = bytes(s.buf.view)
    assert s.open(slot=6) == (-errno.EBADMSG, 0)
    s.buf.view[:] = sealed                          # negative control: the right slot opens
    assert s.open(slot=5) == (0, -1) and bytes(s.buf.view) == data


def test_seal_replayed_old_ciphertext_fails(sealer):
    old, new = os.urandom(PAGE_SIZE), os.urandom(PAGE_SIZE)
    s = Sealed(sealer, 1)
    s.seal(old, slot=9)
    old_ciphertext, old_gen, old_tag = bytes(s.buf.view), s.gens[0], bytes(ffi.buffer(s.tags, TAG))
    s.seal(new, slot=9)                             # a newer write to the same slot
    assert s.gens[0] > old_gen
    s.buf.view[:] = old_ciphertext                  # the medium hands back the old one
    assert s.open(slot=9) == (-errno.EBADMSG, 0)
    # Negative control: it is the kept generation and tag that refuse it, not damage.
    s.buf.view[:] = old_ciphertext
    s.gens[0] = old_gen
    ffi.memmove(s.tags, old_tag, TAG)
    assert s.open(slot=9) == (0, -1) and bytes(s.buf.view) == old


def test_seal_generations_never_repeat(sealer):
    import threading
    seen: list[int] = []

    def writer():
        s = Sealed(sealer, 8)
        for _ in range(200):
            s.seal(bytes(8 * PAGE_SIZE), slot=0)
            seen.extend(s.gens[i] for i in range(8))

    threads = [threading.Thread(target=writer) for _ in range(4)]   # the C call drops the GIL
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 * 200 * 8
    assert len(set(seen)) == len(seen) and 0 not in seen


def test_seal_keys_are_ephemeral(sealer):
    """Another sealer (another daemon, or this one restarted) cannot open our pages."""
    data = os.urandom(PAGE_SIZE)
    s = Sealed(sealer, 1)
    s.seal(data, slot=3)
    sealed = bytes(s.buf.view)
    out = ffi.new("struct uswap_sealer **")
    check(lib.uswap_sealer_new(out))
    try:
        other = Sealed(out[0], 1)
        other.buf.view[:] = sealed
        other.gens[0] = s.gens[0]
        ffi.memmove(other.tags, s.tags, TAG)
        assert other.open(slot=3) == (-errno.EBADMSG, 0)
    finally:
        lib.uswap_sealer_free(out[0])


def test_sealer_key_page_is_locked_undumpable_and_wiped_in_a_child(sealer):
    address = int(ffi.cast("uintptr_t", sealer))
    flags = None
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        start = line.split("-", 1)[0]
        if "-" in line.split(" ", 1)[0] and int(start, 16) == address:
            flags = next(l for l in lines[i + 1:] if l.startswith("VmFlags:")).split()[1:]
            break
    assert flags is not None, f"no mapping starts at {address:#x}"
    assert {"lo", "dd", "wf"} <= set(flags), flags    # mlock'ed, MADV_DONTDUMP, MADV_WIPEONFORK
    pid = os.fork()
    if pid == 0:   # the child's copy of the page is zeros: it refuses to seal with a zero key
        s = Sealed(sealer, 1)
        ret = lib.uswap_seal_pages(sealer, s.buf.ptr, 1, PAGE_SIZE, 0, s.gens, s.tags)
        os._exit(0 if ret == -errno.EBADF else 1)
    assert os.waitpid(pid, 0)[1] == 0
