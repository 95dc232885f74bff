"""cffi build script for the uswap C core (uswap._core).

The constants (cdef.h), the declarations (the headers' CDEF sections) and the
implementation are separate files; this script only wires them together: the
C core (common/), the client the Python client calls (client/), the daemon's
engines, page table, slots, sealing and compressed pool (daemon/) and the run protocol's struct
(preload/uswap_run.h).  setup.py names it in ``cffi_modules``.
"""

import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent



def declarations(header: str) -> str:
    """The structs and prototypes of a header, between its CDEF markers."""
    text = next(HERE.glob("*/" + header)).read_text()   # headers by name, as #include finds them
    return text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]


ffi = cffi.FFI()
ffi.cdef((HERE / "cdef.h").read_text() + declarations("uswap_core.h") + declarations("uswap_slots.h")
          + declarations("uswap_storeset.h")
          + declarations("uswap_engine.h") + declarations("uswap_pool.h") + declarations("uswap_pt.h")
          + declarations("uswap_runeng.h")
          # the run protocol's struct: array lengths from the compiler, like the constants
          + declarations("uswap_run.h").replace("[USWAP_RUN_MAX_SPANS]", "[...]"))
ffi.set_source(
    "uswap._core",
    '#include <fcntl.h>\n#include "uswap_core.h"\n#include "uswap_slots.h"\n#include "uswap_storeset.h"\n#include "uswap_engine.h"\n#include "uswap_pool.h"\n#include "uswap_pt.h"\n#include "uswap_runeng.h"\n#include "uswap_run.h"\n#include "uswap.h"\n',
    sources=["csrc/common/uswap_core.c", "csrc/client/uswap_client.c", "csrc/common/uswap_daemon_peer.c",
             "csrc/daemon/uswap_seal.c", "csrc/daemon/uswap_slots.c", "csrc/daemon/uswap_storeset.c",
             "csrc/daemon/uswap_engine.c",
             "csrc/daemon/uswap_pool.c", "csrc/daemon/uswap_pt.c", "csrc/daemon/uswap_runeng.c",
             "csrc/daemon/uswap_probe.c"],
    include_dirs=["csrc/common", "csrc/daemon", "csrc/preload", "uswap/include"],
    libraries=["crypto",    # OpenSSL libcrypto: AES-256-GCM for sealed slots (uswap_seal.c)
               "uring",     # liburing: the fault engine's readahead reads (uswap_engine.c)
               "lz4",       # liblz4: the compressed pool's default compressor (uswap_pool.c)
               "zstd"],     # libzstd: the compressed pool's other compressor, denser and slower (uswap_pool.c)
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
