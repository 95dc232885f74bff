"""cffi build script for uswap._nfs: libnfs (the userspace NFS client),
uswap's request shim over its asynchronous API (uswap_nfs.c), and the
blocking, thread-safe store I/O for the daemon's C threads (uswap_nfs_io.c).
A module of its own so that the C core does not link libnfs."""

import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent


HEADERS = ("uswap_nfs.h", "uswap_nfs_io.h")


def declarations(header: str) -> str:
    """The part of a header in csrc/nfs between CDEF-BEGIN and CDEF-END."""
    text = (HERE / "nfs" / header).read_text()
    return text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]


ffi = cffi.FFI()
ffi.cdef((HERE / "nfs_cdef.h").read_text() + "".join(declarations(h) for h in HEADERS))
ffi.set_source(
    "uswap._nfs",
    '#include <sys/time.h>\n#include <nfsc/libnfs.h>\n' + "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=["csrc/nfs/uswap_nfs.c", "csrc/nfs/uswap_nfs_io.c"],
    include_dirs=["csrc/nfs"],
    libraries=["nfs"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
