"""cffi build script for uswap._nfs: libnfs (the userspace NFS client) and
uswap's request shim over its asynchronous API (uswap_nfs.c).  A module of
its own so that the C core does not link libnfs."""

import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent


def shim_declarations() -> str:
    header = (HERE / "nfs" / "uswap_nfs.h").read_text()
    return header.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]


ffi = cffi.FFI()
ffi.cdef((HERE / "nfs_cdef.h").read_text() + shim_declarations())
ffi.set_source(
    "uswap._nfs",
    '#include <sys/time.h>\n#include <nfsc/libnfs.h>\n#include "uswap_nfs.h"\n',
    sources=["csrc/nfs/uswap_nfs.c"],
    include_dirs=["csrc/nfs"],
    libraries=["nfs"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
