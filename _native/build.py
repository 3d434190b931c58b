"""cffi build script for thinstore's native kernels (API mode, out-of-line).

It only declares and builds: the declarations are the cdef block of
thinstore_native.h (the documented contract), the implementation is
thinstore_native.c (the kernels), intentlog.c (the intent log's gathering and sync thread)
and nbd_fast.c (the NBD request loop, declared in nbd_fast.h's cdef block),
compiled into the extension ``thinstore._thinstore_native``.
Nothing from thinstore is imported, so this runs in a bare build environment.

    python setup.py build_ext --inplace   # development build, next to thinstore/
    pip install .                         # setup.py: cffi_modules=["_native/build.py:ffibuilder"]
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "thinstore_native.h")
NBD_HEADER = os.path.join(HERE, "nbd_fast.h")      # the NBD request loop (same module)
SOURCES = [os.path.join(HERE, name) for name in ("thinstore_native.c", "intentlog.c",
                                                 "nbd_fast.c")]


def _cdef_block(path: str) -> str:
    """The part of the header between the cdef markers: what cffi can parse
    (no include guards or #include lines)."""
    with open(path) as f:
        text = f.read()
    start = text.index("/* cdef-begin")
    start = text.index("*/", start) + 2
    return text[start:text.index("/* cdef-end */")]


ffibuilder = FFI()
ffibuilder.cdef(_cdef_block(HEADER) + _cdef_block(NBD_HEADER))
ffibuilder.set_source(
    "thinstore._thinstore_native",
    '#include "thinstore_native.h"\n#include "nbd_fast.h"',
    # relative to the project root: setuptools builds from there, and the
    # sdist must not record absolute paths
    sources=[os.path.relpath(p) for p in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)
