"""Device names: `vol`, `vol@snap`. Letters, digits and _ . : - ; at most 255 bytes."""

from __future__ import annotations

import re

from .errors import InvalidName

_PART = re.compile(r"[A-Za-z0-9_.:-]+")
MAX_NAME = 255


def check_name(name: str, *, snapshot: bool | None = None) -> str:
    """Validate a full device name; `snapshot` True/False demands that form."""
    if not isinstance(name, str) or not name:
        raise InvalidName("a device name must not be empty")
    if len(name.encode()) > MAX_NAME:
        raise InvalidName(f"device name is {len(name.encode())} bytes; the limit is {MAX_NAME}")
    parts = name.split("@")
    if len(parts) > 2 or not all(_PART.fullmatch(p) for p in parts):
        raise InvalidName(f"invalid device name {name!r}: use letters, digits and _ . : - "
                          "(and one @ between a volume and its snapshot)")
    if parts[0] in (".", ".."):
        raise InvalidName(f"invalid device name {name!r}")
    is_snap = len(parts) == 2
    if snapshot is True and not is_snap:
        raise InvalidName(f"{name!r} is not a snapshot name: use VOLUME@SNAPSHOT")
    if snapshot is False and is_snap:
        raise InvalidName(f"{name!r} is a snapshot name; give a volume name without @")
    return name


def split(name: str) -> tuple[str, str | None]:
    base, _, snap = name.partition("@")
    return base, (snap or None)
