"""Open the store a user named, by its URL scheme: a local file (a plain path) or a file on an NFS server.

The kinds of store are named here once, by module path, so that uswap.store
never imports a backend it does not need (uswap.nfs loads libnfs).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator

import trio

from uswap.store.base import Store, StoreOptions

STORES = {
    "file": "uswap.store.swapfile:SwapStore",
    "nfs": "uswap.nfs.store:NfsStore",
}


def store_class(spec: str) -> type[Store]:
    """The class for ``spec``'s scheme (``scheme://...``; a plain path is ``file``)."""
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else "file"
    if scheme not in STORES or (scheme == "file" and "://" in spec):
        raise ValueError(f"unknown store scheme {scheme!r} in {spec!r} (a path, or one of: "
                         f"{', '.join(s + '://' for s in STORES if s != 'file')})")
    module, name = STORES[scheme].split(":")
    return getattr(importlib.import_module(module), name)


@contextlib.asynccontextmanager
async def opened_stores(specs: list, options: StoreOptions) -> AsyncIterator[Store]:
    """The stores ``specs`` names (uswap.store.storeset.StoreSpec): one is opened as it is, several as a
    store set (uswap.store.storeset), each locked for us while the block runs."""
    if len(specs) == 1 and options.copies == 1:
        async with opened_store(specs[0].url, options) as store:
            yield store
        return
    from uswap.store.storeset import StoreSet
    store = await StoreSet.open_for_use(specs, options)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


@contextlib.asynccontextmanager
async def opened_store(spec: str, options: StoreOptions) -> AsyncIterator[Store]:
    """The store ``spec`` names, locked for us while the block runs."""
    store = await store_class(spec).open_for_use(spec, options)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(options.nfs_timeout):
            await store.aclose()
