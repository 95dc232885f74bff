"""The Python client: ``uswap.Region``, memory served by the uswap daemon.

    with uswap.Region(1 << 30) as region:
        a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)
        ...
        del a                  # every view goes before the region closes

It is the C client (csrc/client/uswap_client.c) underneath, so Python and C programs
behave alike: regions are not inherited across fork(), and if the daemon dies
a touch of a page it held raises SIGBUS instead of reading zeros.

Lifetime, as ``mmap``'s: :meth:`Region.close` (and so the end of a ``with``
block) refuses with ``BufferError`` while anything still holds ``buffer`` (a
NumPy array or memoryview over it, or the buffer object itself): unmapping
under a live view would make its next access a segfault.  The mapping belongs
to the buffer object, so a region nobody closed is released when the last
holder of its buffer goes.
"""

from __future__ import annotations

import sys

from uswap._core import ffi, lib


class Region:
    """``length`` bytes (a multiple of the page size) served by the daemon at ``socket``
    ($USWAP_SOCKET or the default socket when None)."""

    def __init__(self, length: int, *, socket: str | None = None):
        self.length = length
        out = ffi.new("void **")
        path = ffi.NULL if socket is None else socket.encode()
        ret = lib.uswap_map_socket(path, length, out)
        if ret < 0:
            why = ffi.string(lib.uswap_last_error()).decode(errors="replace")
            raise OSError(-ret, why or "uswap_map failed")
        self.address = int(ffi.cast("uintptr_t", out[0]))
        # Invariant: the cffi buffer keeps ``_mapping`` alive, and only the buffer and this object
        # refer to it; every view (numpy array, memoryview) holds a reference to the buffer.  So
        # the memory stays mapped while anything can still reach it, and is unmapped when the last
        # holder goes if close() never ran.
        self._mapping = ffi.gc(out[0], lambda p: lib.uswap_unmap(p, length))
        self._buffer = ffi.buffer(self._mapping, length)

    @property
    def buffer(self):
        """A writable buffer over the region (numpy.frombuffer works on it)."""
        if self._buffer is None:
            raise ValueError("region is closed")
        return self._buffer

    def holders(self) -> int:
        """References to ``buffer`` besides the region's own: views and names that can still reach the memory."""
        # getrefcount counts its own argument and self._buffer.
        return 0 if self._buffer is None else sys.getrefcount(self._buffer) - 2

    def close(self) -> None:
        """Release the region.  BufferError (nothing released) while anything still holds ``buffer``."""
        if self._buffer is None:
            return
        held = self.holders()
        if held:
            raise BufferError(f"cannot close the uswap region at {self.address:#x}: {held} reference(s) to its "
                              f"buffer remain (NumPy arrays or memoryviews over region.buffer): delete them "
                              f"(del a) before the region closes")
        mapping, self._buffer, self._mapping = self._mapping, None, None
        ffi.gc(mapping, None)    # closed here, with errors reported: no unmap at collection
        if lib.uswap_unmap(mapping, self.length) < 0:
            raise OSError(ffi.errno, "uswap_unmap failed")

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # An exception on its way out keeps its views alive in its traceback: it is not masked by a
        # BufferError; the region is then released when the last of them goes.
        if exc_type is not None and self.holders():
            self._buffer = self._mapping = None
            return
        self.close()
