# Metadata lives in pyproject.toml.  This file builds the C parts:
#   uswap._core          the cffi module (csrc/build.py)
#   uswap._nfs           libnfs and the request shim over it (csrc/nfs_build.py)
#   uswap/lib/libuswap.so  the C client library for programs (uswap config --cflags --libs)
#   uswap/lib/libuswaprun.so  the preload library of `uswap run` (issue 12, docs/RUN-DESIGN.md)
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

LIBUSWAP = "uswap.lib.libuswap"
LIBUSWAPRUN = "uswap.lib.libuswaprun"
PLAIN_LIBS = (LIBUSWAP, LIBUSWAPRUN)


class BuildExt(build_ext):
    """Names libuswap and libuswaprun plain shared libraries (lib*.so), not Python modules."""

    def get_ext_filename(self, fullname):
        # called with the full dotted name and, by get_ext_fullpath, with its last part
        for lib in PLAIN_LIBS:
            if fullname == lib:
                return os.path.join(*lib.split(".")) + ".so"
            if fullname == lib.rsplit(".", 1)[1]:
                return fullname + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        return [] if ext.name in PLAIN_LIBS else super().get_export_symbols(ext)


setup(
    cffi_modules=["csrc/build.py:ffi", "csrc/nfs_build.py:ffi"],
    ext_modules=[
        Extension(LIBUSWAP, sources=["csrc/client/uswap_client.c", "csrc/common/uswap_daemon_peer.c",
                                     "csrc/common/uswap_core.c"],
                  include_dirs=["csrc/common", "uswap/include"],
                  extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
                  extra_link_args=["-pthread", "-Wl,-soname,libuswap.so"]),
        # bound at load (-z now): the agent thread must never enter the dynamic linker later
        Extension(LIBUSWAPRUN, sources=["csrc/preload/uswap_run.c", "csrc/common/uswap_daemon_peer.c"],
                  include_dirs=["csrc/common", "csrc/preload"],
                  extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
                  extra_link_args=["-pthread", "-Wl,-z,now", "-Wl,-soname,libuswaprun.so"]),
    ],
    cmdclass={"build_ext": BuildExt},
)
