"""Commands that replicate: diff, send, receive (thinstore/replication.py does the work).

    thinstore --pool DIR diff A [B] [--json]
    thinstore --pool DIR send NAME@SNAP [--from NAME@BASE] [-o FILE] | ssh host \\
        thinstore --pool DIR receive NAME [--resume | --abort] [-F]

The stream goes to stdout / comes from stdin unless -o / -i name a file; a terminal is
refused on either end (binary on a tty helps nobody).  Progress bars go to stderr and
only when stderr is a terminal, so pipes and scripts stay clean.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from types import SimpleNamespace

from thinstore import replication as RP
from thinstore.errors import ServerGone
from thinstore.cli import files, holds
from thinstore.cli.context import open_local_pool, served_pool
from thinstore.cli.names import device_name, snapshot_name, volume_name
from thinstore.cli.output import print_json, print_table, size_cell
from thinstore.errors import UsageError
from thinstore.progress import Progress


def register(subparsers) -> None:
    p = subparsers.add_parser("diff", help="byte ranges where two devices differ")
    p.add_argument("a", type=device_name, metavar="A")
    p.add_argument("b", type=device_name, metavar="B", nargs="?",
                   help="omit for everything allocated in A")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-p", "--parsable", action="store_true", help="exact bytes")
    p.set_defaults(func=cmd_diff)

    p = subparsers.add_parser("send", help="write a snapshot as a stream (full or incremental)")
    p.add_argument("snapshot", type=snapshot_name, metavar="NAME@SNAP")
    p.add_argument("--from", dest="base", metavar="NAME@BASE",
                   help="incremental from this snapshot (@BASE: of the same volume)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    p.add_argument("-v", "--verbose", action="store_true", help="summary on stderr")
    p.set_defaults(func=cmd_send)

    p = subparsers.add_parser("receive", aliases=["recv"],
                              help="read a stream into NAME@SNAP and bring NAME to it")
    p.add_argument("name", type=volume_name, metavar="NAME")
    p.add_argument("-i", "--input", metavar="FILE", help="read FILE (default: stdin)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted receive (whole stream or its remainder)")
    mode.add_argument("--abort", action="store_true", help="drop an interrupted receive")
    p.add_argument("-F", "--force", action="store_true",
                   help="discard changes made to NAME since the stream's base")
    p.add_argument("-v", "--verbose", action="store_true", help="summary on stderr")
    p.set_defaults(func=cmd_receive)


def cmd_diff(args) -> int:
    with served_pool(args) as remote:
        if remote is not None:
            result = RP.DiffResult.from_dict(remote.stream("diff", a=args.a, b=args.b))
        else:
            with open_local_pool(args, "diff") as pool:
                result = RP.diff(pool, args.a, args.b)
    if args.json:
        print_json(result.to_dict())
        return 0
    if not result.ranges:           # a bare header reads like a failure to print anything
        print(f"no differences between {args.a} and {args.b}" if args.b is not None
              else f"nothing allocated in {args.a}")
        return 0
    rows = [[size_cell(r.offset, args.parsable), size_cell(r.length, args.parsable),
             "data" if r.a_mapped else "hole", "data" if r.b_mapped else "hole"]
            for r in result.ranges]
    print_table(["OFFSET", "LENGTH", "A", "B"], rows, right={0, 1})
    return 0


def cmd_send(args) -> int:
    base = _base_name(args.snapshot, args.base)
    with served_pool(args) as remote, Bar(f"send {args.snapshot}") as bar:
        if remote is not None:       # the server writes the stream to our output itself
            with _output(args.output) as out:
                out.flush()
                stats = SimpleNamespace(**remote.stream(
                    "send", fds=[out.fileno()], on_event=bar.event,
                    snapshot=args.snapshot, base=base))
        else:
            with open_local_pool(args, "send") as pool, _output(args.output) as out:
                stats = RP.send(pool, args.snapshot, out, base, progress=bar)
    if args.verbose:
        print(f"sent {args.snapshot}: {stats.changed_bytes} bytes changed, "
              f"{stats.stream_bytes} stream bytes, {stats.records} records", file=sys.stderr)
    return 0


def cmd_receive(args) -> int:
    with served_pool(args) as remote:
        if remote is not None:
            return _receive_served(remote, args)
        with open_local_pool(args, "receive") as pool:
            if args.abort:
                if not RP.abort_receive(pool, args.name):
                    raise UsageError(f"no interrupted receive into {args.name!r}")
                return 0
            holds.guard(pool, [args.name], "receive")   # a frontend's volume: as rollback
            with _input(args.input) as inp, Bar(f"receive {args.name}") as bar, \
                    RP.full_pool_hint(pool, args.name):
                stats = RP.receive(pool, args.name, inp, resume=args.resume, force=args.force,
                                   progress=bar, stream_size=_regular_size(inp))
    _received(args, stats)
    return 0


def _receive_served(remote, args) -> int:
    """The server reads the stream from our input itself and publishes into its pool."""
    if args.abort:
        if not remote.stream("abort_receive", name=args.name):
            raise UsageError(f"no interrupted receive into {args.name!r}")
        return 0
    with _input(args.input) as inp, Bar(f"receive {args.name}") as bar:
        try:
            stats = SimpleNamespace(**remote.stream(
                "receive", fds=[inp.fileno()], on_event=bar.event, name=args.name,
                resume=args.resume, force=args.force, stream_size=_regular_size(inp)))
        except ServerGone as e:         # the server went away in the middle
            raise ServerGone(f"{e}; what was received is kept: once the pool is "
                                f"served or free again, 'thinstore receive --resume "
                                f"{args.name}' goes on from there (or '--abort "
                                f"{args.name}' drops it)") from None
    _received(args, stats)
    return 0


def _received(args, stats) -> None:
    if args.verbose:
        print(f"received {stats.snapshot}: {stats.records} records applied, "
              f"{stats.skipped} skipped, {stats.stream_bytes} stream bytes", file=sys.stderr)


def _base_name(snapshot: str, base: str | None) -> str | None:
    """``--from @mon`` or ``--from mon`` mean the same volume's snapshot."""
    if base is None or "@" in base[1:]:
        return base
    volume = snapshot.partition("@")[0]
    return snapshot_name(f"{volume}@{base.lstrip('@')}")


def _output(path):
    return files.output(path if path is not None else "-", "a binary stream",
                        "pipe it (| ssh host thinstore receive ...) or use -o FILE")


@contextlib.contextmanager
def _input(path):
    if path is not None:
        files.check_input(path)
        with open(path, "rb") as f:
            yield f
        return
    if sys.stdin.isatty():
        raise UsageError("stdin is a terminal: pipe a stream in or use -i FILE")
    yield sys.stdin.buffer


def _regular_size(f) -> int | None:
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class Bar:
    """A progress callback (delta, total) that draws a bar once the total is known."""

    def __init__(self, label: str):
        self.label = label
        self.bar: Progress | None = None

    def __call__(self, delta: int, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(total, self.label)
        self.bar.advance(delta)

    def event(self, event: dict) -> None:
        """A progress event of an online command: {"progress": [done, total]}."""
        done, total = event.get("progress", (0, 0))
        seen = self.bar.done if self.bar is not None else 0
        if total and done > seen:
            self(done - seen, total)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
