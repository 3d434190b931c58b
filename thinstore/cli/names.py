"""Device names as the CLI accepts them: ``volume`` or ``volume@snapshot``.

The rules are the core's (thinstore.names: letters, digits and _ . : -, one @, at most
255 bytes); checking while parsing lets a typo fail before the pool is opened and lets
each argument say which form it wants.
"""

from __future__ import annotations

from thinstore.errors import UsageError
from thinstore.names import check_name, check_new_name


def device_name(text: str) -> str:
    """``NAME`` or ``NAME@SNAP``: any device."""
    return check_name(text)


def volume_name(text: str) -> str:
    """``NAME`` without ``@``: a volume or clone, something a command may create or write."""
    return check_name(text, snapshot=False)


def new_volume_name(text: str) -> str:
    """``NAME`` of a volume or clone a command makes: no '-' or '.' first (names.py)."""
    return check_new_name(text)


def snapshot_name(text: str) -> str:
    """``NAME@SNAP``: a snapshot, which the command requires."""
    if "@" not in text:
        raise UsageError(f"{text!r} is not a snapshot: write NAME@SNAP, e.g. vm1@monday")
    return check_name(text, snapshot=True)
