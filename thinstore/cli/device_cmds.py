"""Commands on devices: create, snapshot, clone, list, destroy, rename, rollback, resize.

Each handler checks names (see names.py), opens the pool and makes one management call;
the core does the work and raises the error that says what went wrong.
"""

from __future__ import annotations

import argparse
import sys

from thinstore.cli import holds
from thinstore.cli.context import open_pool
from thinstore.cli.names import device_name, new_volume_name, snapshot_name, volume_name
from thinstore.cli.output import print_json, print_table, size_cell, time_cell
from thinstore.units import format_size, parse_size


def register(subparsers) -> None:
    p = subparsers.add_parser("create", help="create a thin volume")
    p.add_argument("name", type=new_volume_name, metavar="NAME")
    p.add_argument("--size", "-s", type=parse_size, required=True, metavar="SIZE",
                   help="virtual size, e.g. 10G (may exceed the pool's free space)")
    p.set_defaults(func=cmd_create)

    p = subparsers.add_parser("snapshot", help="take a read-only snapshot NAME@SNAP")
    p.add_argument("snapshot", type=snapshot_name, metavar="NAME@SNAP")
    p.set_defaults(func=cmd_snapshot)

    p = subparsers.add_parser("clone", help="create a writable volume from a snapshot")
    p.add_argument("snapshot", type=snapshot_name, metavar="NAME@SNAP")
    p.add_argument("new_name", type=new_volume_name, metavar="NEWNAME")
    p.set_defaults(func=cmd_clone)

    _register_list(subparsers)

    p = subparsers.add_parser("destroy", help="delete a volume, clone or snapshot")
    p.add_argument("name", type=device_name, metavar="NAME[@SNAP]")
    p.add_argument("--force", "-f", action="store_true",
                   help="destroy even while handles or clients have it open")
    p.set_defaults(func=cmd_destroy)

    p = subparsers.add_parser("rename", help="rename a device (a volume's snapshots follow)")
    p.add_argument("old", type=device_name, metavar="OLD")
    p.add_argument("new", type=device_name, metavar="NEW")
    p.set_defaults(func=cmd_rename)

    p = subparsers.add_parser("rollback", help="return a volume to a snapshot's content")
    p.add_argument("snapshot", type=snapshot_name, metavar="NAME@SNAP")
    p.set_defaults(func=cmd_rollback)

    p = subparsers.add_parser("resize", help="change a volume's virtual size")
    p.add_argument("name", type=volume_name, metavar="NAME")
    p.add_argument("size", type=parse_size, metavar="SIZE")
    p.add_argument("--shrink", action="store_true",
                   help="allow a smaller size (data past the new end is discarded)")
    p.set_defaults(func=cmd_resize)


def _register_list(subparsers) -> None:
    p = subparsers.add_parser("list", help="list devices with their space use")
    p.add_argument("names", type=device_name, nargs="*", metavar="NAME",
                   help="only these devices (exit 3 if one does not exist)")
    p.add_argument("-t", "--type", type=_kinds, metavar="KIND[,KIND]",
                   help="only these kinds: volume, snapshot, clone (or all)")
    p.add_argument("-o", "--output", type=_columns, metavar="COL[,COL]",
                   help="table columns: " + ",".join(LIST_COLUMNS))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-p", "--parsable", action="store_true", help="exact bytes and epoch times")
    p.add_argument("-H", "--no-headers", dest="headers", action="store_false",
                   help="scripted mode: no header, tab-separated")
    p.set_defaults(func=cmd_list)


def cmd_create(args) -> int:
    with open_pool(args) as pool:
        pool.create_volume(args.name, args.size)
        free = pool.status()["free"]
    note_partial_sector(args.name, args.size)
    if args.size > free:
        note(f"{args.name!r} ({format_size(args.size)}) is larger than the pool's free "
             f"space ({format_size(free)}): it is thin, so this is allowed, but writes fail "
             "once the pool is full; grow it first ('thinstore grow +SIZE') if it will fill")
    return 0


def note(text: str) -> None:
    """A remark that is not an error: on stderr, so stdout stays what scripts parse."""
    print(f"thinstore: note: {text}", file=sys.stderr)


SECTOR = 512


def note_partial_sector(name: str, size: int) -> None:
    """thinstore keeps a volume's size to the byte, but block devices count 512-byte
    sectors and round a partial one, each its own way: say so where it happens."""
    if size % SECTOR:
        up, down = -(-size // SECTOR) * SECTOR, size // SECTOR * SECTOR
        note(f"{name!r} is {size} bytes, not a whole number of {SECTOR}-byte sectors: QEMU "
             f"sees {up} bytes (zeros past the end), the kernel's loop device {down}; "
             "a multiple of 4K suits every client")


def cmd_snapshot(args) -> int:
    with open_pool(args) as pool:
        pool.snapshot(args.snapshot)
    return 0


def cmd_clone(args) -> int:
    with open_pool(args) as pool:
        pool.clone(args.snapshot, args.new_name)
    return 0


def cmd_destroy(args) -> int:
    with open_pool(args) as pool:
        overridden = holds.guard(pool, [args.name], "destroy", args.force)
        snapshot = "@" in args.name
        # a snapshot's clones are found before it goes: they name it only by its uuid
        clones = [i.name for i in pool.list() if i.kind == "clone" and i.origin == args.name] \
            if snapshot else []
        cut = pool.destroy(args.name, force=args.force)
        kept = clones if snapshot else \
            [i.name for i in pool.list() if i.name.startswith(args.name + "@")]
    if overridden is not None:
        cut = {"dropped": 0, "held": overridden.describe()}
    _warn_cut_off(args.name, cut)
    if kept:
        _note_kept(args.name, "clone" if snapshot else "snapshot", kept)
    return 0


def _warn_cut_off(name: str, cut) -> None:
    """A served pool's forced destroy says what it cut off: {"dropped": N, "users": [..],
    "held": WHO} (thinstore/control/guards.py; "held": the Docker hold it overrode); the
    user forced it, so it is done, but they should know."""
    if not isinstance(cut, dict):
        return
    dropped = cut.get("dropped")
    if not dropped:                 # (in use, the users named say who lost it)
        if cut.get("held"):
            print(f"thinstore: warning: {name!r} was {cut['held']} and is destroyed "
                  "(--force): the plugin lets go of it, and Docker no longer finds it",
                  file=sys.stderr)
        return
    users = "; ".join(cut.get("users") or [])
    print(f"thinstore: warning: {name!r} was in use and is destroyed (--force): its "
          f"{dropped} NBD connection{'s were' if dropped > 1 else ' was'} dropped"
          + (f"; {users}" if users else ""), file=sys.stderr)


def _note_kept(name: str, what: str, kept: list[str]) -> None:
    """'1 snapshot of 'vm1' remains (vm1@a); it is whole ...', or for several '3 snapshots
    ... remain (vm1@a, vm1@b, vm1@c); they are whole ...': the words agree with the count."""
    shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
    if len(kept) == 1:
        note(f"1 {what} of {name!r} remains ({shown}); it is whole on its own: destroy it "
             f"with 'thinstore destroy {kept[0]}'")
    else:
        note(f"{len(kept)} {what}s of {name!r} remain ({shown}); they are whole on their own: "
             f"destroy them with 'thinstore destroy {kept[0]}' and so on")


def cmd_rename(args) -> int:
    with open_pool(args) as pool:
        following = [] if "@" in args.old else \
            [i.name for i in pool.list() if i.name.startswith(args.old + "@")]
        holds.guard(pool, [args.old, *following], "rename")
        pool.rename(args.old, args.new)
    return 0


def cmd_rollback(args) -> int:
    with open_pool(args) as pool:
        pool.info(args.snapshot)                   # a missing snapshot: exit 3, not held
        holds.guard(pool, [args.snapshot.split("@", 1)[0]], "rollback")
        pool.rollback(args.snapshot)
    return 0


def cmd_resize(args) -> int:
    with open_pool(args) as pool:
        if args.shrink and args.size < pool.info(args.name).size:
            holds.guard(pool, [args.name], "shrink")
        pool.resize(args.name, args.size, shrink=args.shrink)   # its error names --shrink
    note_partial_sector(args.name, args.size)
    return 0


LIST_KEYS = ("name", "kind", "size", "used", "exclusive", "shared", "origin", "created",
             "read_only", "uuid")
LIST_HEADERS = ["NAME", "KIND", "SIZE", "USED", "EXCL", "SHARED", "ORIGIN", "CREATED"]
LIST_SIZES = ("size", "used", "exclusive", "shared")


def cmd_list(args) -> int:
    with open_pool(args) as pool:
        infos = [pool.info(name) for name in args.names] if args.names else pool.list()
        pending = pool.status().get("pending_receives") if not args.names else None
        held = holds.holds_of(pool) if not (args.names or args.json) else []
    _note_pending(pending)
    if held:
        note(f"held by frontends (destroy and rename refuse them): {holds.summary(held)}")
    devices = [device_dict(info) for info in infos]
    if args.type:
        devices = [d for d in devices if d["kind"] in args.type]
    devices.sort(key=_volume_then_snapshot)
    if args.json:
        print_json({"devices": devices})
        return 0
    columns = args.output or list(LIST_COLUMNS)
    rows = [_list_row(d, args.parsable) for d in devices]
    picked = [LIST_COLUMNS.index(c) for c in columns]
    print_table([LIST_HEADERS[i] for i in picked], [[row[i] for i in picked] for row in rows],
                right={n for n, i in enumerate(picked) if i in (2, 3, 4, 5)},
                header=args.headers)
    return 0


def _note_pending(pending) -> None:
    """Space held by interrupted receives is in no listed device: say where it went (on
    stderr, so a script reading the table or the JSON sees no change)."""
    if pending:
        from thinstore.cli.pool_cmds import pending_text
        note(f"not listed: interrupted receives into {pending_text(pending)}; finish with "
             "'thinstore receive --resume NAME' or drop with '--abort NAME'")


LIST_COLUMNS = ("name", "kind", "size", "used", "exclusive", "shared", "origin", "created")
_COLUMN_ALIASES = {"excl": "exclusive", "type": "kind"}
_KINDS = ("volume", "snapshot", "clone")


def _columns(text: str) -> list[str]:
    """``-o name,used``: zfs-style column choice; an unknown column is a usage error."""
    columns = [_COLUMN_ALIASES.get(c, c) for c in text.lower().split(",") if c]
    bad = [c for c in columns if c not in LIST_COLUMNS]
    if bad or not columns:
        raise argparse.ArgumentTypeError(
            f"unknown column {', '.join(bad) or text!r}: use {','.join(LIST_COLUMNS)}")
    return columns


_KIND_WORDS = {"volume": "volume", "volumes": "volume", "vol": "volume", "vols": "volume",
               "snapshot": "snapshot", "snapshots": "snapshot", "snap": "snapshot",
               "snaps": "snapshot", "clone": "clone", "clones": "clone"}


def _kinds(text: str) -> set[str]:
    """``-t snapshot`` or ``-t vols,clones`` (singular, plural or short); ``all`` is every
    kind.  An unknown word is quoted as typed ('vols' once came back as 'vol')."""
    words = [w for w in text.lower().split(",") if w]
    if "all" in words:
        return set(_KINDS)
    bad = [w for w in words if w not in _KIND_WORDS]
    if bad or not words:
        raise argparse.ArgumentTypeError(
            f"unknown kind {', '.join(map(repr, bad)) or repr(text)}: use "
            f"{','.join(_KINDS)} or all")
    return {_KIND_WORDS[w] for w in words}


def _origin_cell(device: dict) -> str:
    """A snapshot whose volume was destroyed still names it, marked gone: 'vm1 (gone)';
    a clone whose snapshot was destroyed says '(gone)' (only the uuid named it)."""
    if device["origin"]:
        return device["origin"]
    if device["kind"] == "snapshot":
        return device["name"].partition("@")[0] + " (gone)"
    if device["kind"] == "clone":
        return "(gone)"
    return "-"


def _volume_then_snapshot(device: dict) -> tuple[str, str]:
    """Sort key putting vm1, then vm1@a, vm1@b, before vm1-test (as zfs list does)."""
    volume, _, snap = device["name"].partition("@")
    return volume, snap


def device_dict(info) -> dict:
    """The stable JSON form of a DeviceInfo: exactly LIST_KEYS, sizes in bytes."""
    return {key: getattr(info, key, None) for key in LIST_KEYS}


def _list_row(device: dict, parsable: bool) -> list[str]:
    sizes = [size_cell(device[key], parsable) for key in LIST_SIZES]
    return [device["name"], device["kind"], *sizes, _origin_cell(device),
            time_cell(device["created"], parsable)]
