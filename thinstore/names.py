"""Device names: `vol`, `vol@snap`. Letters, digits and _ . : - ; at most 255 bytes.

A name given to a new volume or clone (create, clone, import, rename, a full receive)
also may not start with '-' (a command line would read it as an option, as LVM refuses
for its names) or '.' (kept for thinstore's own names: older pools hid a receive's
workspace as '.receive.VOL'). Names made before this rule keep working in every command:
only `check_new_name` applies it, `check_name` (every lookup) does not.
"""

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


#: First characters a new volume's name may not have (see the module docstring).
RESERVED_FIRST = "-."


def check_new_name(name: str) -> str:
    """Validate the name of a volume or clone about to be made (or renamed to): the
    rules of `check_name`, and no '-' or '.' first. A snapshot's own part (after '@')
    is free: the volume's name comes first on every command line."""
    check_name(name, snapshot=False)
    if name[0] in RESERVED_FIRST:
        why = "a command line would read it as an option" if name[0] == "-" else \
            "such names are kept for thinstore's own devices"
        raise InvalidName(f"invalid device name {name!r}: a new name may not start with "
                          f"{name[0]!r} ({why}); start it with a letter, digit, _ or :")
    return name


def split(name: str) -> tuple[str, str | None]:
    base, _, snap = name.partition("@")
    return base, (snap or None)
