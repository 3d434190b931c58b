"""Create's options (``docker volume create -o KEY=VALUE``), checked before anything is made.

    size=SIZE     virtual size (binary suffixes: 512M, 10G); default --docker-default-size
    fs=ext4|xfs   the file system made at the first mount (default ext4); a size too small
                  for it, or whose metadata would not fit the pool, is refused (the attach
                  module's :mod:`~thinstore.frontends.attach.fsbounds`)
    from=VOL@SNAP a writable O(1) clone of that snapshot (its file system comes along)

Every refusal is a :class:`DriverError`, whose message the server sends as the Err.
"""

from __future__ import annotations

from thinstore import names
from thinstore.errors import NoSuchDevice, UsageError
from thinstore.frontends.attach import fsbounds
from thinstore.units import format_size, parse_size

OPTIONS = ("size", "fs", "from")
FSTYPES = ("ext4", "xfs")


class DriverError(Exception):
    """A request the driver refuses; the message is the protocol's Err."""


def parse(opts, pool, plugin_name: str, default_size: int) -> dict:
    """Create's Opts (None on auto-create) -> {"size": bytes, "fs", "from"} as given."""
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise DriverError("Opts must be an object of option=value strings")
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise DriverError(f"unknown option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}: {plugin_name} takes "
                          f"{', '.join(OPTIONS)}")
    out = {}
    for key, value in opts.items():
        if not isinstance(value, str):
            raise DriverError(f"option {key!r} must be a string")
    if "size" in opts:
        try:
            out["size"] = parse_size(opts["size"])
        except UsageError as exc:
            raise DriverError(f"option size: {exc}") from None
        if out["size"] <= 0:
            raise DriverError("option size: a volume needs a size above 0")
    if "fs" in opts:
        if opts["fs"] not in FSTYPES:
            raise DriverError(f"option fs={opts['fs']!r}: use {' or '.join(FSTYPES)}")
        if "from" in opts:
            raise DriverError("options fs and from exclude each other: a clone has its "
                              "snapshot's file system")
        out["fs"] = opts["fs"]
    if "from" in opts:
        out["from"] = _snapshot(pool, opts["from"])
    if "from" not in out:
        fs, size = out.get("fs", "ext4"), out.get("size", default_size)
        if fsbounds.too_small(fs, size):
            raise DriverError(f"option size={format_size(size)}: {fs} needs at least "
                              f"{format_size(fsbounds.MINIMUM[fs])} (set a larger size"
                              f"{', or use ext4' if fs == 'xfs' else ''})")
        check_fits(pool, fs, size)
    return out


def check_fits(pool, fs: str, size: int, base: int = 0) -> None:
    """Refuse a size whose file system metadata would not fit the pool's free space
    (:func:`fsbounds.too_large`)."""
    why = fsbounds.too_large(pool.status(), fs, size, base)
    if why:
        raise DriverError(f"option size={format_size(size)}: {why}")


def _snapshot(pool, text: str) -> str:
    try:
        names.check_name(text, snapshot=True)
        info = pool.info(text)
    except UsageError:
        raise DriverError(f"option from={text!r}: name a snapshot as VOLUME@SNAPSHOT") \
            from None
    except NoSuchDevice:
        raise DriverError(f"option from={text!r}: there is no snapshot {text!r} "
                          "(take one with 'thinstore snapshot VOLUME@SNAPSHOT')") from None
    if info.kind != "snapshot":
        raise DriverError(f"option from={text!r} is not a snapshot")
    return text
