# Metadata lives in pyproject.toml.  This file builds the C parts:
#   uswap._core          the cffi module (csrc/build.py)
#   uswap._nfs           libnfs and the request shim over it (csrc/nfs_build.py)
#   uswap/lib/libuswap.so  the C client library for programs (uswap config --cflags --libs)
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

LIBUSWAP = "uswap.lib.libuswap"


class BuildExt(build_ext):
    """Names libuswap a plain shared library (libuswap.so), not a Python module."""

    def get_ext_filename(self, fullname):
        # called with the full dotted name and, by get_ext_fullpath, with its last part
        if fullname == LIBUSWAP:
            return os.path.join("uswap", "lib", "libuswap.so")
        if fullname == LIBUSWAP.rsplit(".", 1)[1]:
            return "libuswap.so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        return [] if ext.name == LIBUSWAP else super().get_export_symbols(ext)


setup(
    cffi_modules=["csrc/build.py:ffi", "csrc/nfs_build.py:ffi"],
    ext_modules=[
        Extension(LIBUSWAP, sources=["csrc/uswap_client.c", "csrc/uswap_core.c"],
                  include_dirs=["csrc", "uswap/include"],
                  extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"],
                  extra_link_args=["-pthread", "-Wl,-soname,libuswap.so"]),
    ],
    cmdclass={"build_ext": BuildExt},
)
