"""Only what pyproject.toml cannot say: the cffi extension (see _native/build.py)."""

from setuptools import setup

setup(cffi_modules=["_native/build.py:ffibuilder"])
