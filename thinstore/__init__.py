"""thinstore: a block-level copy-on-write snapshot store (thin pool, snapshots, clones, NBD)."""

from .device import Device, DeviceInfo
from .errors import ThinstoreError
from .native import BACKEND
from .pool import Pool

__version__ = "0.1.0"
__all__ = ["Pool", "Device", "DeviceInfo", "ThinstoreError", "BACKEND", "__version__"]
