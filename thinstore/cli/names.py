"""Device names as the CLI accepts them: ``volume`` or ``volume@snapshot``.

The core validates names too; checking here first lets a typo fail before the pool is
opened and lets the message say which part of ``NAME@SNAP`` is wrong.
"""

from __future__ import annotations

import re

from thinstore.errors import InvalidName, UsageError

MAX_NAME_BYTES = 255
_PART_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


def check_part(part: str, whole: str) -> str:
    """Return ``part`` if it is a valid name component of ``whole``, else raise InvalidName."""
    if not _PART_RE.match(part) or part in (".", "..") or len(whole.encode()) > MAX_NAME_BYTES:
        raise InvalidName(f"invalid device name {whole[:64]!r}: use letters, digits and _ . : - "
                          f"(at most {MAX_NAME_BYTES} bytes in all)")
    return part


def device_name(text: str) -> str:
    """``NAME`` or ``NAME@SNAP``: any device."""
    volume, at, snap = text.partition("@")
    check_part(volume, text)
    if at:
        check_part(snap, text)
    return text


def volume_name(text: str) -> str:
    """``NAME`` without ``@``: a volume or clone, something a command may create or write."""
    if "@" in text:
        raise InvalidName(f"invalid volume name {text!r}: '@' separates a snapshot name; "
                          "give a plain NAME")
    return check_part(text, text)


def snapshot_name(text: str) -> str:
    """``NAME@SNAP``: a snapshot, which the command requires."""
    if "@" not in text:
        raise UsageError(f"{text!r} is not a snapshot: write NAME@SNAP, e.g. vm1@monday")
    return device_name(text)
