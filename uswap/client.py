"""The Python client: ``uswap.Region``, memory served by the uswap daemon.

    with uswap.Region(1 << 30) as region:
        a = numpy.frombuffer(region.buffer, dtype=numpy.uint64)

It is the C client (csrc/uswap_client.c) underneath, so Python and C programs
behave alike: regions are not inherited across fork(), and if the daemon dies
a touch of a page it held raises SIGBUS instead of reading zeros.
"""

from __future__ import annotations

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
        self._buffer = ffi.buffer(out[0], length)

    @property
    def buffer(self):
        """A writable buffer over the region (numpy.frombuffer works on it)."""
        if self._buffer is None:
            raise ValueError("region is closed")
        return self._buffer

    def close(self) -> None:
        """Release the region; any view of ``buffer`` must be gone by now."""
        if self._buffer is None:
            return
        self._buffer = None
        if lib.uswap_unmap(ffi.cast("void *", self.address), self.length) < 0:
            raise OSError(ffi.errno, "uswap_unmap failed")

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
