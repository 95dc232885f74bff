"""Run in the NFS test server's network namespace by test_nfs: 16 reads at
once through the store's slot I/O (worker threads on its one C connection);
prints how many were in flight at most, and checks every page read back."""

import sys

import trio

from uswap.core import PAGE_SIZE, AlignedBuffer
from uswap.nfs.store import NfsStore


async def main(url: str) -> None:
    store = await NfsStore.open(url)
    try:
        buf = AlignedBuffer(64 * PAGE_SIZE)
        for page in range(64):
            buf.view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = bytes([page + 1]) * PAGE_SIZE
        io = store.slot_io("sync")
        await io.write(0, 64, buf)

        async def read(first: int) -> None:
            out = AlignedBuffer(4 * PAGE_SIZE)
            await io.read(first, 4, out)
            for i in range(4):
                assert bytes(out.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) == bytes([first + i + 1]) * PAGE_SIZE

        async with trio.open_nursery() as nursery:
            for first in range(0, 64, 4):
                nursery.start_soon(read, first)
        print(f"in flight at most: {store.nfs_status()['most_in_flight']}")
    finally:
        await store.aclose()


trio.run(main, sys.argv[1])
