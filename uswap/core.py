"""Thin Python layer over the C core: errno checks, aligned buffers, page helpers.

Every C function returns ``-errno`` on failure; :func:`check` is the one place
that turns that into :class:`OSError`, so the rest of uswap never looks at a
raw return code.
"""

from __future__ import annotations

import os

from uswap._core import ffi, lib

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def check(ret: int, filename: str | None = None) -> int:
    """Return ``ret`` if it is not negative, else raise the matching OSError."""
    if ret < 0:
        err = -ret
        if filename is None:
            raise OSError(err, os.strerror(err))
        raise OSError(err, os.strerror(err), filename)
    return ret


class AlignedBuffer:
    """Zeroed memory aligned for O_DIRECT, freed when the object goes away.

    ``ptr`` is the cffi pointer for C calls; ``view`` a writable memoryview.
    Alignment defaults to the page size, which satisfies every logical block
    size up to it (512, 1K, 2K, 4K).
    """

    __slots__ = ("size", "align", "ptr", "view")

    def __init__(self, size: int, align: int = PAGE_SIZE):
        if size <= 0:
            raise ValueError(f"buffer size must be positive, not {size}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment must be a power of two, not {align}")
        raw = lib.uswap_map_buffer(align, size)   # a mapping of its own: unmapped when freed (uswap_core.h)
        if raw == ffi.NULL:
            raise MemoryError(f"cannot allocate {size} bytes aligned to {align}")
        self.ptr = ffi.gc(ffi.cast("char *", raw), lambda p: lib.uswap_unmap_buffer(p, size), size=size)
        self.size = size
        self.align = align
        self.view = memoryview(ffi.buffer(self.ptr, size))

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self.ptr))

    def page(self, index: int, page_size: int = PAGE_SIZE) -> memoryview:
        return self.view[index * page_size:(index + 1) * page_size]


def _as_pointer(data) -> tuple[object, int]:
    """A C pointer and length for bytes, a buffer object or an AlignedBuffer."""
    if isinstance(data, AlignedBuffer):
        return data.ptr, data.size
    return ffi.from_buffer(data), len(memoryview(data).cast("B"))


def crc32c(data, crc: int = 0) -> int:
    """crc32c (Castagnoli) of ``data``, chained from ``crc`` like zlib.crc32."""
    ptr, size = _as_pointer(data)
    return lib.uswap_crc32c(crc, ptr, size)


def is_zero(data) -> bool:
    ptr, size = _as_pointer(data)
    return bool(lib.uswap_is_zero(ptr, size))


def page_copy(dst_address: int, src_address: int, length: int) -> None:
    """memcpy between raw addresses, with the GIL released.

    Touching userfaultfd-registered memory must go through here (or other C
    code): a fault taken while holding the GIL would stall the very Python
    thread that has to serve it.
    """
    lib.uswap_page_copy(ffi.cast("void *", dst_address), ffi.cast("void *", src_address), length)
