"""CSI names and ids <-> pool device names.

A CSI name (CreateVolume's and CreateSnapshot's ``name``) is any Unicode string of up to
128 bytes without control characters (spec.md "Size Limits", CreateVolumeRequest.name);
a pool device name is ``[A-Za-z0-9_.:-]+`` (thinstore/names.py), one ``@`` between a
volume and its snapshot, at most 255 bytes.  The mapping, one way and back:

    volume   name N            ->  csi.<enc(N)>                 the CSI volume_id
    snapshot name S of vol V   ->  <V's device>@csi.<enc(S)>     the CSI snapshot_id

``enc`` keeps ``A-Z a-z 0-9 _ . -`` and writes every other UTF-8 byte (``:`` included) as
``:`` and two lowercase hex digits, so it is reversible (:func:`decode`).  An encoding
longer than :data:`MAX_PART` bytes (names of many non-ASCII characters) is replaced by
``:h`` and 40 hex digits of the name's SHA-256: ``h`` is no hex digit, so such a part is
told apart from an escape, and its name is found in the plugin's state (state.py) instead.

The ``csi.`` prefix keeps the plugin's devices apart from the ones an administrator
makes with the CLI: the plugin lists, adopts and sweeps only its own.  A volume clone
passes through a transient snapshot ``<source>@tmp.<enc(N)>`` (:func:`clone_temp`).
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "csi."
TEMP_PREFIX = "tmp."
MAX_PART = 120            # a volume part and a snapshot part together stay under 255 bytes
MAX_CSI_NAME = 128        # bytes (spec.md "Size Limits": strings)
_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_BANNED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class BadName(ValueError):
    """A CSI name the spec does not allow (empty, too long, control characters)."""


def check_csi_name(name: str, what: str = "name") -> str:
    """Raise :class:`BadName` unless ``name`` is a valid CSI name (spec.md, CreateVolume)."""
    if not name:
        raise BadName(f"{what} is required")
    if len(name.encode()) > MAX_CSI_NAME:
        raise BadName(f"{what} is {len(name.encode())} bytes; CSI allows {MAX_CSI_NAME}")
    if _BANNED.search(name):
        raise BadName(f"{what} {name!r} holds a control character")
    return name


def encode(name: str) -> str:
    """One part of a device name for a CSI name (see the module docstring)."""
    out = []
    for byte in name.encode():
        out.append(chr(byte) if byte in _KEEP else f":{byte:02x}")
    text = "".join(out)
    if len(text) > MAX_PART - len(PREFIX):
        text = ":h" + hashlib.sha256(name.encode()).hexdigest()[:40]
    return text


def decode(part: str) -> str | None:
    """The CSI name an encoded part stands for; None for a hashed part."""
    if part.startswith(":h"):
        return None
    return bytes(_unescape(part)).decode()


def _unescape(part: str):
    i = 0
    while i < len(part):
        if part[i] == ":":
            yield int(part[i + 1:i + 3], 16)
            i += 3
        else:
            yield ord(part[i])
            i += 1


def volume_device(name: str) -> str:
    """The device name (= CSI volume_id) of the volume CSI calls ``name``."""
    return PREFIX + encode(name)


def snapshot_device(volume_id: str, name: str) -> str:
    """The device name (= CSI snapshot_id) of snapshot ``name`` of volume ``volume_id``."""
    return f"{volume_id}@{PREFIX}{encode(name)}"


def clone_temp(source_volume_id: str, name: str) -> str:
    """The transient snapshot a clone of ``source_volume_id`` named ``name`` passes through."""
    return f"{source_volume_id}@{TEMP_PREFIX}{encode(name)}"


def is_volume_id(text: str) -> bool:
    return text.startswith(PREFIX) and "@" not in text


def is_snapshot_id(text: str) -> bool:
    base, sep, snap = text.partition("@")
    return bool(sep) and base.startswith(PREFIX) and snap.startswith(PREFIX)


def csi_name_of(device: str) -> str | None:
    """The CSI name a plugin device was made for (None: hashed, or not the plugin's)."""
    part = device.partition("@")[2] or device
    if not part.startswith(PREFIX):
        return None
    return decode(part[len(PREFIX):])
