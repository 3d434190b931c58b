"""Backend choice for the kernels (placeholder until the native build lands).

THINSTORE_PURE_PYTHON=1 forces the Python twins; the native helper replaces this
module with the cffi-backed selection. The core reaches kernels only through `K`.
"""

from . import kernels as K  # noqa: N812

BACKEND = "python"
