"""Open the store a user named: a local file (path) or a file on an NFS server (nfs:// URL)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from uswap.nfs.url import is_nfs_url
from uswap.store.swapfile import SwapStore


@contextlib.asynccontextmanager
async def opened_store(spec: str, *, nfs_timeout: float, nfs_stable: str, encrypt: bool = True) -> AsyncIterator:
    """A SwapStore or an NfsStore, locked for us while the block runs; ``encrypt``: slots sealed
    with AES-256-GCM under a key of this process (uswap.store.sealing), else crc32c only."""
    if not is_nfs_url(spec):
        with SwapStore.open(spec, encrypt=encrypt) as store:
            yield store
        return
    from uswap.nfs.store import NfsStore
    store = await NfsStore.open(spec, timeout=nfs_timeout, stable=nfs_stable, encrypt=encrypt)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(nfs_timeout):
            await store.aclose()
