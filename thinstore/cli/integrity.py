"""Integrity commands: ``check``, ``repair``, ``dump``, ``restore`` and ``scrub``.

Exit codes (docs/integrity.md): check returns 0 when clean, else the code of the most
severe class of damage found (20 unreadable, 21 metadata, 22 range, 23 refcount,
24 leak, 25 superblock, 26 checksum); scrub returns 0, or 11 (DataChecksumError) when
a chunk is damaged; repair returns 0, or 10 (CorruptMetadata) when something was left
unfixed. While a server holds the pool, check, dump and scrub run inside it
(thinstore/online.py) with the same output and exit codes; repair and restore refuse
(exit 5, PoolLocked).
"""

from __future__ import annotations

import json
import os
import sys

from thinstore.cli.context import needs_pool_itself, pool_path, served_pool
from thinstore.cli.output import print_json
from thinstore.errors import CorruptMetadata, DataChecksumError, ThinstoreError, UsageError
from thinstore.format import VERSION as FORMAT_VERSION
from thinstore.units import parse_size


def register(subparsers) -> None:
    check = subparsers.add_parser(
        "check", help="verify the pool's metadata (like thin_check)",
        description="Verify both superblocks, every metadata block, every map entry and "
        "every reference count. Exit 0 when clean, else a code per class of damage.")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.set_defaults(func=cmd_check)

    repair = subparsers.add_parser(
        "repair", help="rebuild reference counts and free space from the maps",
        description="Rebuild reference counts and free space from the block maps, drop map "
        "entries and pages that cannot be read or point outside the pool, and report every "
        "change. Data chunks are never written.")
    repair.add_argument("--dry-run", action="store_true", help="report, change nothing")
    repair.add_argument("--json", action="store_true", help="machine-readable report")
    repair.set_defaults(func=cmd_repair)

    dump = subparsers.add_parser(
        "dump", help="print the metadata in readable form (like thin_dump)",
        description="Print the committed metadata: text for reading, --json for editing "
        "and 'restore'.")
    dump.add_argument("--json", action="store_true", help="the JSON form restore reads")
    dump.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")
    dump.set_defaults(func=cmd_dump)

    restore = subparsers.add_parser(
        "restore", help="replace the metadata from a JSON dump (like thin_restore)",
        description="Write new metadata from a JSON dump; the old meta file is kept as "
        "meta.old (meta.old.1, ... after later restores). Data chunks are never written.")
    restore.add_argument("input", metavar="FILE", help="the dump ('-' for stdin)")
    restore.add_argument("-f", "--force", action="store_true",
                         help="restore even a dump of another pool (its maps then name "
                         "this pool's data chunks)")
    restore.set_defaults(func=cmd_restore)

    scrub = subparsers.add_parser(
        "scrub", help="read and verify every mapped chunk",
        description="Read every mapped chunk once, verify its checksum, and name each "
        "damaged chunk with every device and offset that uses it.")
    scrub.add_argument("--json", action="store_true", help="machine-readable report")
    scrub.add_argument("--progress", action="store_true",
                       help="draw the progress bar even when stderr is not a terminal")
    scrub.add_argument("--rate", type=parse_size, metavar="SIZE", default=None,
                       help="read at most SIZE bytes per second (e.g. 50M; 0: no limit); "
                       "default: no limit on a pool no one serves, 64M through a server")
    scrub.set_defaults(func=cmd_scrub)


def cmd_check(args) -> int:
    from thinstore.check import Report, check_path
    with served_pool(args) as remote:
        if remote is not None:       # the server checks its committed generation, pinned
            report = Report.from_dict(remote.stream("check"), pool_path(args))
        else:
            with needs_pool_itself(args, "check"):
                report = check_path(pool_path(args))
    if args.json:
        print_json(report.to_dict())
    else:
        _print_check(report)
    return report.exit_code


def _print_check(report) -> None:
    info = report.info
    print(f"pool {report.path}: " + "; ".join(info.get("slots", [])))
    if "generation" in info:
        print(f"generation {info['generation']}: {len(info['devices'])} device(s), "
              f"{info['mapped_chunks']} mapped chunk(s), {info['map_pages']} map page(s), "
              f"{info['metadata_blocks']} metadata block(s)")
    if info.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        print(f"on-disk format {info['format']}: this thinstore opens it after "
              f"'thinstore --pool {report.path} upgrade' (format {FORMAT_VERSION})")
    if info.get("unclean_regions"):
        print(f"not shut down cleanly: the next open re-checksums {info['unclean_regions']} "
              "write-intent region(s)")
    if info.get("log_records"):
        print(f"not shut down cleanly: the next open replays {info['log_records']} intent "
              "log record(s) of flushed writes")
    for p in report.problems:
        print(p)
    if report.clean:
        print("clean")
    else:
        todo = ("'thinstore restore' puts back the metadata from a dump"
                if any(p.kind == "unreadable" for p in report.problems)
                else "'thinstore repair' rebuilds what the maps allow")
        print(f"damaged: {len(report.problems)} problem(s) (exit {report.exit_code}); {todo}")


def cmd_repair(args) -> int:
    from thinstore.repair import repair_path
    with needs_pool_itself(args, "repair"):
        report = repair_path(pool_path(args), dry_run=args.dry_run)
    if args.json:
        print_json(report.to_dict())
    else:
        verb = "would change" if args.dry_run else "changed"
        for line in report.changes:
            print(f"{verb}: {line}")
        for line in report.unfixable:
            print(f"not fixed: {line}")
        if not report.changes and not report.unfixable:
            print("nothing to repair")
    return CorruptMetadata.exit_code if report.unfixable else 0


def cmd_dump(args) -> int:
    from thinstore.dump import dump_path, dump_text
    with served_pool(args) as remote:
        if remote is not None:
            answer = remote.stream("dump")
            doc, problems = answer["doc"], answer["problems"]
        else:
            with needs_pool_itself(args, "dump"):
                doc, problems = dump_path(pool_path(args))
    for p in problems:
        print(f"thinstore: warning: {p}", file=sys.stderr)
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n" if args.json else dump_text(doc)
    if args.output and args.output != "-":  # '-' is stdout, as for export and restore
        from thinstore.cli import files
        with files.output(args.output, "a dump", "use -o FILE") as f:  # whole or not at all
            f.write(text.encode())
    else:
        sys.stdout.write(text)
    return 0


def cmd_restore(args) -> int:
    from thinstore.dump import load_dump, newest_kept_metadata, restore_path
    from thinstore.cli import files
    files.check_input(args.input)
    if args.input == "-":
        text = sys.stdin.read()
    else:
        with open(args.input) as f:
            text = f.read()
    if text.startswith("pool "):
        raise UsageError(f"restore: {args.input} is the text form of a dump; restore reads "
                         "the JSON form ('thinstore dump --json -o FILE')")
    doc = load_dump(text)
    if not args.force:
        _refuse_another_pools_dump(pool_path(args), doc)
        _refuse_pending_log(pool_path(args))
    with needs_pool_itself(args, "restore"):
        gen = restore_path(pool_path(args), doc)
    kept = newest_kept_metadata(pool_path(args))
    print(f"restored metadata at generation {gen}"
          + (f"; the previous meta file is {kept}" if kept else ""))
    return 0


def _refuse_pending_log(path: str) -> None:
    """Writes a client flushed after the last commit live only in the intent log, which
    names the committed tree; a restored tree makes the log stale, so they would be gone
    (a dump, read without replaying, does not hold them either). Say so first."""
    from thinstore.salvage import read_slots
    from thinstore.storage import open_store
    from thinstore.synclog import log_records
    try:
        store = open_store(path)
        meta = store.open("meta", readonly=True)
    except (OSError, ThinstoreError):
        return
    try:
        found, _ = read_slots(meta)
        pending = log_records(store, found[0]) if found else 0
    except (OSError, ThinstoreError):
        return
    finally:
        meta.close()
    if pending:
        raise UsageError(f"restore: {path} holds {pending} intent log record(s) of flushed "
                         "writes not yet committed, which a restore would discard: open the "
                         f"pool once ('thinstore --pool {path} status') to replay them, then "
                         "dump again; or pass --force to discard them")


def _refuse_another_pools_dump(path: str, doc: dict) -> None:
    """A dump names its pool's UUID; restoring it over another pool (the replica beside the
    primary, say) points every volume at chunks of the wrong data file, silently: scrub is
    the first to notice.  A pool whose superblocks are both unreadable cannot be checked,
    which is when restore is most needed, so that case goes on."""
    from thinstore.format import BLOCK_SIZE, unpack_superblock
    try:
        wanted = bytes.fromhex(doc["pool"]["uuid"])
        with open(os.path.join(path, "meta"), "rb") as f:
            slots = [f.read(BLOCK_SIZE), f.read(BLOCK_SIZE)]
    except (OSError, KeyError, TypeError, ValueError):
        return
    held = set()
    for slot, raw in enumerate(slots):
        try:
            held.add(unpack_superblock(raw, slot).pool_uuid)
        except ThinstoreError:
            continue
    if held and wanted not in held:
        raise UsageError(f"restore: the dump is of pool {wanted.hex()}, but {path} holds pool "
                         f"{held.pop().hex()}: its volumes would read the wrong data; "
                         "use --force if that is really meant")


def cmd_scrub(args) -> int:
    from thinstore.scrub import ScrubReport
    with served_pool(args) as remote:
        if remote is not None:       # the server scrubs beside its clients, paced
            bar = _ScrubBar(args.progress)
            report = ScrubReport.from_dict(remote.stream("scrub", on_event=bar, rate=args.rate))
        else:
            report = _scrub_local(args)
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"scrub: {report.verified} chunk(s) verified, {report.skipped} without a "
              f"checksum, {report.bytes_read} bytes read in {report.seconds:.1f}s")
        for d in report.damaged:
            print(f"damaged: {d.describe()}")
        print("no damage found" if not report.damaged else
              f"{len(report.damaged)} damaged chunk(s): restore the devices named above "
              "from a replica or backup")
    return DataChecksumError.exit_code if report.damaged else 0


def _scrub_local(args):
    from thinstore import Pool
    from thinstore.scrub import Progress, scrub_pool
    with needs_pool_itself(args, "scrub"), Pool.open(pool_path(args)) as pool:
        with pool.lock:
            total = int((pool.md.space.refs.arr != 0).sum())
        return scrub_pool(pool, Progress(total, force=args.progress), rate=args.rate or None)


class _ScrubBar:
    """Draws an online scrub's progress events as the offline bar does."""

    def __init__(self, force: bool):
        self.force, self.bar = force, None

    def __call__(self, event: dict) -> None:
        from thinstore.scrub import Progress
        done, total = event.get("progress", (0, 0))
        if self.bar is None:
            self.bar = Progress(total, force=self.force)
        self.bar(done)
