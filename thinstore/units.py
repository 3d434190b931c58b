"""Sizes as people type them and as tables show them.

Suffixes are binary (K = 1024, like zfs, lvm and qemu-img): ``4096``, ``512K``, ``10G``,
``1.5G``, ``2T``; a trailing ``B`` or ``iB`` is accepted (``10GiB``) and case is ignored.
A size must come to a whole number of bytes: ``1.5K`` is 1536, ``1.3K`` is refused rather
than silently rounded, because a size that is not what was typed is worse than an error.
"""

from __future__ import annotations

import re
import functools
from fractions import Fraction

from thinstore.errors import UsageError

SUFFIXES = "KMGTPE"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTPE]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Return the byte count ``text`` names; raise UsageError saying what is accepted."""
    if isinstance(text, int):
        return _check_non_negative(text, str(text))
    if text.strip().startswith("-"):
        raise UsageError(f"invalid size {text!r}: size must be positive")
    match = _SIZE_RE.match(text)
    if match is None or (match.group(3) and match.group(3).lower() == "ib" and not match.group(2)):
        raise UsageError(f"invalid size {text!r}: use bytes or a K/M/G/T/P/E suffix, "
                         "e.g. 512K, 10G, 1.5G")
    number, suffix = Fraction(match.group(1)), match.group(2).upper()
    value = number * (1024 ** (SUFFIXES.index(suffix) + 1) if suffix else 1)
    if value.denominator != 1:
        raise UsageError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def _check_non_negative(value: int, text: str) -> int:
    if value < 0:
        raise UsageError(f"invalid size {text!r}: size must be positive")
    return value


#: The on-disk format allows a device of 2**60 bytes (a u64 size, kernel offsets signed);
#: what caps it is memory: a device's directory is held as one array of a u64 per 508
#: chunks, of which only the parts written are resident (the rest is address space the
#: kernel maps on first touch). 2**27 entries is 1 GiB of address space per device:
#: 3.97 PiB with 64 KiB chunks, 254 TiB with 4 KiB chunks, 63.5 PiB with 1 MiB chunks.
MAX_DIRECTORY_ENTRIES = 1 << 27


def max_device_size(chunk_size: int) -> int:
    return MAX_DIRECTORY_ENTRIES * 508 * chunk_size


def check_device_size(size, chunk_size: int | None = None) -> None:
    """A device size is an int from 0 up to what the chunk size allows (and 2**60:
    kernel offsets are signed 64-bit)."""
    if not isinstance(size, int) or size < 0:
        raise UsageError(f"invalid device size {size!r}")
    if size > 1 << 60:
        raise UsageError(f"a device of {format_size(size)} is larger than any device can be "
                         "(1E: kernel offsets are signed 64-bit)")
    if chunk_size and size > max_device_size(chunk_size):
        raise UsageError(f"a device of {format_size(size)} is larger than this pool supports "
                         f"with {format_size(chunk_size)} chunks (at most "
                         f"{format_size(max_device_size(chunk_size))}); use a pool with "
                         "larger chunks")


def check_volume_size(size, chunk_size: int | None = None) -> None:
    """The size a volume is created or resized to: `check_device_size`, and above 0.

    A 0-byte block device holds nothing and clients refuse it (losetup, mkfs; LVM and ZFS
    refuse size 0 too). A 0-byte device made by an older thinstore, or received from one,
    still opens, snapshots, clones and sends: only creation and resize check this."""
    check_device_size(size, chunk_size)
    if size == 0:
        raise UsageError("a volume of 0 bytes holds nothing and block-device clients "
                         "refuse it: give a size above 0, e.g. 1G")


@functools.lru_cache(maxsize=4096)     # a list of 10,000 snapshots repeats its sizes
def format_size(nbytes: int) -> str:
    """Return ``nbytes`` in the largest binary unit that keeps it >= 1, about 3 digits.

    Whole values print without decimals (``512K``, ``10G``) so that what ``create`` was
    given reads back the same; others keep at most three significant digits (``1.5G``,
    ``10.3M``, ``123K``).  The output parses back with :func:`parse_size` to within 1%.
    """
    if nbytes < 1024:
        return f"{nbytes}B"
    value, unit = Fraction(nbytes), ""
    for unit in SUFFIXES:
        value /= 1024
        if value < 1024 or unit == SUFFIXES[-1]:
            break
    return _three_digits(value, unit)


def _three_digits(value: Fraction, unit: str) -> str:
    if value.denominator == 1:
        return f"{value.numerator}{unit}"
    decimals = 2 if value < 10 else 1 if value < 100 else 0
    text = f"{float(value):.{decimals}f}"
    if float(text) >= 1024 and unit != SUFFIXES[-1]:
        return f"1{SUFFIXES[SUFFIXES.index(unit) + 1]}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}{unit}"


def format_duration(seconds: float) -> str:
    """Return ``seconds`` as ``M:SS`` or ``H:MM:SS`` for an ETA; ``--:--`` when unknown."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
