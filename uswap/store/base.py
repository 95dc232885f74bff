"""What every store is, whatever holds its slots: the interface the daemon and the FUSE store use.

A store (s3ql's backends are the model) is opened for use by the class its
URL scheme names (uswap.store.opening.STORES): ``file`` (a plain path, the
default) and ``nfs`` (uswap.nfs.store).  The daemon asks a store for its slot
I/O in a mode, for the local fd the fault engine may read through (-1: none,
every fault goes to Python), and for its status; it never asks what kind of
store it has.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from uswap.core import AlignedBuffer


@dataclass(frozen=True)
class StoreOptions:
    """How to open a store: the options every kind accepts (each uses those that apply to it)."""
    encrypt: bool = True            # slots sealed with AES-256-GCM (uswap.store.sealing), else crc32c
    nfs_timeout: float = 60.0       # nfs://: how long a request waits for a server that is down
    nfs_stable: str = "file_sync"   # nfs://: FILE_SYNC writes, or UNSTABLE + COMMIT
    copies: int = 1                 # a store set: how many of its stores hold each slot (uswap.store.storeset)
    own_codec: bool = True          # False: a member of a store set, whose codec covers the slots (its own none)


class SlotIO(abc.ABC):
    """Moving slots between a store and aligned buffers, the way one I/O mode does it."""

    mode: str                       # what `uswap status` shows as "io"
    overlapping: bool               # several writeback batches may be in flight at once
    write_ios: int                  # writes issued so far

    @abc.abstractmethod
    async def read(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """Contiguous slots into ``buf`` from its page ``buf_page``, decoded and checked."""

    @abc.abstractmethod
    async def write(self, first: int, count: int, buf: AlignedBuffer, buf_page: int = 0) -> None:
        """``count`` pages of ``buf`` to contiguous slots (the buffer is the codec's afterwards)."""

    @abc.abstractmethod
    async def write_batch(self, buf: AlignedBuffer, slots, count: int) -> None:
        """A reclaim batch: buffer page i to slot ``slots[i]`` (-1: not written), one write per slot run."""


class Store(abc.ABC):
    """A checked store, locked for this process while open."""

    path: str
    page_size: int
    slot_count: int
    codec: object                   # the slot codec (uswap.store.checksums.SlotCodec)
    codec_c: object                 # its one C view (struct uswap_codec *): engines, writeback, the pool
    slot_groups: tuple[int, ...] = ()   # a store set's priority groups' ends, highest first (none: one group)
    remote_up = None                # a remote store: int (*)(void *remote), 1 while its server is reachable
    # A read that waited the store's whole timeout (nfs://: the server did not answer) means a read of any of
    # its slots would: true of one server.  A set of several says False: a window that timed out may have
    # waited for another member than the faulting page's, whose slot is then read alone before it is poisoned.
    timeout_fails_every_slot: bool = True

    @classmethod
    @abc.abstractmethod
    async def open_for_use(cls, spec: str, options: StoreOptions) -> "Store":
        """Open, lock and check the store ``spec`` names; StoreError (one line) if it cannot be used."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Unlock and close; the codec's secrets are gone afterwards."""

    @property
    @abc.abstractmethod
    def local_fd(self) -> int:
        """An O_DIRECT fd on the slots for the fault engine's reads, or -1 (a remote store: ``codec_c`` names
        the functions that read and write its slots)."""

    @abc.abstractmethod
    def slot_io(self, mode: str) -> SlotIO:
        """The slot I/O for ``mode`` (sync or async; a store may have one way only)."""

    async def maintain(self) -> None:
        """Background work the store needs while the daemon serves (run in its nursery, cancelled at stop);
        none by default."""

    def slots_on_one_server(self, slot: int, count: int) -> int:
        """How many of the ``count`` slots from ``slot`` are where ``slot`` is (one server or file): all of
        them, but in a store set."""
        return count

    def status(self, slots=None) -> dict:
        """Entries for `uswap status` (top level): at least ``encryption``.  ``slots``: the daemon's slot
        allocator (uswap.daemon.slots), for a store set's use per member."""
        return {"encryption": self.codec.encryption}
