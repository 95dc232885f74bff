"""Layer 2: an open store: exclusive lock, O_DIRECT slot I/O, checksums and sealed (encrypted) slots."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import store_held_elsewhere
from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.store.mkswap import mkswap
from uswap.store.lock import StoreBusy, lock_holder
from uswap.store.checksums import ChecksumError
from uswap.store.swapfile import SwapStore

SLOTS = 64


@pytest.fixture
def store_path(tmp_path):
    path = str(tmp_path / "store")
    mkswap(path, (SLOTS + 1) * PAGE_SIZE)
    return path


def fill(buf: AlignedBuffer, pages: int, tag: int) -> None:
    for i in range(pages):
        buf.page(i)[:] = bytes([(tag + i) % 251]) * PAGE_SIZE


def test_contiguous_slots_round_trip(store_path):
    with SwapStore.open(store_path) as store:
        assert store.slot_count == SLOTS
        out = AlignedBuffer(8 * PAGE_SIZE)
        fill(out, 8, 10)
        written = bytes(out.view)   # write_slots seals the buffer in place
        store.write_slots(5, 8, out)
        back = AlignedBuffer(10 * PAGE_SIZE)
        store.read_slots(5, 8, back, buf_page=2)
        assert bytes(back.view[2 * PAGE_SIZE:]) == written
        store.read_slots(9, 1, back)  # any sub-range of what was written
        assert bytes(back.page(0)) == written[4 * PAGE_SIZE:5 * PAGE_SIZE]


def test_data_lands_at_slot_offsets(store_path):
    with SwapStore.open(store_path, encrypt=False) as store:
        buf = AlignedBuffer(PAGE_SIZE)
        buf.view[:4] = b"SLOT"
        store.write_slots(SLOTS - 1, 1, buf)
    with open(store_path, "rb") as f:
        f.seek(SLOTS * PAGE_SIZE)  # header page + 63 slots
        assert f.read(4) == b"SLOT"


MARKER = b"uswap-plaintext-marker:"


@pytest.mark.parametrize("encrypt", [True, False])
def test_sealed_slots_hold_no_plaintext_on_disk(store_path, encrypt):
    """With encryption the file never holds the pattern; without it, it does (the test's own control)."""
    pattern = (MARKER + bytes(range(41))) * (4 * PAGE_SIZE // (len(MARKER) + 41) + 1)
    with SwapStore.open(store_path, encrypt=encrypt) as store:
        assert store.status() == {"encryption": "aes-256-gcm" if encrypt else "off"}
        out = AlignedBuffer(4 * PAGE_SIZE)
        out.view[:] = pattern[:4 * PAGE_SIZE]
        store.write_slots(10, 4, out)
        with open(store_path, "rb") as f:
            on_disk = f.read()
        back = AlignedBuffer(4 * PAGE_SIZE)
        store.read_slots(10, 4, back)
        assert bytes(back.view) == pattern[:4 * PAGE_SIZE]
    assert (MARKER in on_disk) == (not encrypt)
    slots = on_disk[11 * PAGE_SIZE:15 * PAGE_SIZE]
    assert (slots == pattern[:4 * PAGE_SIZE]) == (not encrypt)


def test_sealed_slot_replayed_on_disk_is_caught(store_path):
    """An older ciphertext of a slot put back behind the store's back fails authentication."""
    with SwapStore.open(store_path) as store:
        buf = AlignedBuffer(PAGE_SIZE)
        fill(buf, 1, 1)
        store.write_slots(30, 1, buf)
        with open(store_path, "rb") as f:
            f.seek(31 * PAGE_SIZE)
            old = f.read(PAGE_SIZE)
        fill(buf, 1, 2)
        store.write_slots(30, 1, buf)
        with open(store_path, "r+b") as f:
            f.seek(31 * PAGE_SIZE)
            f.write(old)
            f.flush()
            os.fsync(f.fileno())
        with pytest.raises(ChecksumError) as info:
            store.read_slots(30, 1, AlignedBuffer(PAGE_SIZE))
        assert info.value.errno == errno.EBADMSG and info.value.slot == 30
        assert "slot 30 failed authentication (aes-256-gcm)" in str(info.value)


@pytest.mark.parametrize("encrypt,message", [(False, "checksum mismatch in slot 22"),
                                             (True, "slot 22 failed authentication (aes-256-gcm)")])
def test_flipped_bit_on_disk_is_caught(store_path, encrypt, message):
    """Negative control: corrupt a slot behind the store's back."""
    with SwapStore.open(store_path, encrypt=encrypt) as store:
        buf = AlignedBuffer(4 * PAGE_SIZE)
        fill(buf, 4, 1)
        store.write_slots(20, 4, buf)
        with open(store_path, "r+b") as f:
            offset = (22 + 1) * PAGE_SIZE + 777
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x04]))
            f.flush()
            os.fsync(f.fileno())  # O_DIRECT reads see written-back data
        back = AlignedBuffer(4 * PAGE_SIZE)
        with pytest.raises(ChecksumError) as info:
            store.read_slots(20, 4, back)
        assert info.value.errno == errno.EBADMSG
        assert info.value.slot == 22
        assert message in str(info.value)
        store.read_slots(20, 2, back)  # the healthy neighbours still read
        fill(buf, 2, 1)
        assert bytes(back.view[:2 * PAGE_SIZE]) == bytes(buf.view[:2 * PAGE_SIZE])


def test_rewrite_replaces_checksum(store_path):
    with SwapStore.open(store_path) as store:
        buf = AlignedBuffer(PAGE_SIZE)
        fill(buf, 1, 1)
        store.write_slots(3, 1, buf)
        fill(buf, 1, 2)
        store.write_slots(3, 1, buf)
        back = AlignedBuffer(PAGE_SIZE)
        store.read_slots(3, 1, back)
        fill(buf, 1, 2)
        assert bytes(back.view) == bytes(buf.view)


@pytest.mark.parametrize("first,count", [(-1, 1), (SLOTS, 1), (SLOTS - 2, 3), (0, 0)])
def test_slots_outside_the_store_are_refused(store_path, first, count):
    with SwapStore.open(store_path) as store:
        buf = AlignedBuffer(4 * PAGE_SIZE)
        with pytest.raises(ValueError, match="outside the store"):
            store.write_slots(first, count, buf)
    assert os.path.getsize(store_path) == (SLOTS + 1) * PAGE_SIZE  # never extended


def test_buffer_too_small_is_refused(store_path):
    with SwapStore.open(store_path) as store:
        with pytest.raises(ValueError, match="cannot hold"):
            store.write_slots(0, 2, AlignedBuffer(PAGE_SIZE))


def test_unwritten_and_freed_slots_cannot_be_read(store_path):
    from uswap.daemon.slots import SlotAllocator
    with SwapStore.open(store_path) as store:
        slots = SlotAllocator(store.slot_count, store.codec)   # a freed slot is forgotten by the codec
        buf = AlignedBuffer(PAGE_SIZE)
        with pytest.raises(ValueError, match="nothing written"):
            store.read_slots(0, 1, buf)
        assert slots.allocate(1) == (0, 1)
        store.write_slots(0, 1, buf)
        store.read_slots(0, 1, buf)
        slots.free(0)
        with pytest.raises(ValueError, match="nothing written"):
            store.read_slots(0, 1, buf)


def test_second_user_in_this_process_is_refused(store_path):
    with SwapStore.open(store_path):
        with pytest.raises(StoreBusy) as info:
            SwapStore.open(store_path)
        assert f"in use by PID {os.getpid()}" in str(info.value)
        assert info.value.errno == errno.EBUSY
    SwapStore.open(store_path).close()  # free again once closed


def test_second_user_in_another_process_is_named(store_path):
    with store_held_elsewhere(store_path) as holder:
        assert lock_holder(store_path) == holder.pid
        with pytest.raises(StoreBusy, match=f"in use by PID {holder.pid}"):
            SwapStore.open(store_path)
        with pytest.raises(StoreBusy):
            mkswap(store_path, 8 * PAGE_SIZE)  # no re-mkswap under a user either
    with SwapStore.open(store_path) as store:
        assert store.slot_count == SLOTS  # mkswap did not touch it
