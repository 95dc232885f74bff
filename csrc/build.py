"""cffi build script for the uswap C core (uswap._core).

The constants (cdef.h), the declarations (uswap_core.h) and the
implementation (uswap_core.c) are separate files; this script only wires them
together.  setup.py names it in
``cffi_modules``.
"""

import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent



def core_declarations() -> str:
    """The structs and prototypes of uswap_core.h, between its CDEF markers."""
    header = (HERE / "uswap_core.h").read_text()
    return header.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]


ffi = cffi.FFI()
ffi.cdef((HERE / "cdef.h").read_text() + core_declarations())
ffi.set_source(
    "uswap._core",
    '#include <fcntl.h>\n#include "uswap_core.h"\n#include "uswap.h"\n',
    sources=["csrc/uswap_core.c", "csrc/uswap_client.c"],
    include_dirs=["csrc", "uswap/include"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
