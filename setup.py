# Metadata lives in pyproject.toml; this file only builds the C core.
from setuptools import setup

setup(cffi_modules=["csrc/build.py:ffi"])
