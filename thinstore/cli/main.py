"""Entry point of the ``thinstore`` command: parse, dispatch, turn errors into exit codes.

Every command lives in a module named in :data:`COMMANDS`; each module has
``register(subparsers)``, which adds its parsers with ``set_defaults(func=handler)``, and a
handler takes the parsed args and returns the exit code.  Adding a command group means
adding a module and its name here, nothing else.

Exit codes: 0 success; 2 usage errors (argparse's and :class:`UsageError`); a
:class:`ThinstoreError` returns its ``exit_code`` after ONE line ``thinstore: <message>`` on
stderr; 1 for an OS error on a file the user named; 70 for a bug; 130 on Ctrl-C.
Tracebacks appear only with ``THINSTORE_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys

from thinstore.errors import ThinstoreError

COMMANDS = ["pool_cmds", "device_cmds", "image_cmds", "serve", "replication", "integrity",
            "bench", "iostat", "holds"]

EXIT_INTERNAL = 70  # EX_SOFTWARE from sysexits.h: a bug, not the user's mistake

PROG = "thinstore"


class _Parser(argparse.ArgumentParser):
    """argparse, but ``-5G`` after an option is that option's value, as ``-5`` is: a
    negative size then gets parse_size's "size must be positive", not "--size: expected
    one argument". (No thinstore option looks like a number; subparsers inherit this.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+(\.\d*)?|\.\d+)[A-Za-z]*$")

    # A command's unknown option was reported by the top parser ("unrecognized
    # arguments", with thinstore's usage, not the command's), or not at all when an
    # argument was missing too ('create -x' said only "--size is required"): a command
    # refuses an unknown option itself, first, and every usage error is one line in the
    # CLI's form (thinstore: COMMAND: ...; see '... --help') followed by the usage.
    def parse_known_args(self, args=None, namespace=None):
        command = self.prog != PROG
        if command and args is not None:
            unknown = self._unknown_option(args)
            if unknown is not None:
                self.error(f"unknown option {unknown!r}{self._name_hint(unknown)}")
        namespace, extras = super().parse_known_args(args, namespace)
        if command and extras:
            self.error(f"unexpected argument{'s' if len(extras) > 1 else ''} "
                       f"{' '.join(map(repr, extras))}")
        return namespace, extras

    def _unknown_option(self, args) -> str | None:
        """The first argument that looks like an option this parser does not have."""
        for arg in args:
            if arg == "--":
                return None
            # (argparse's own lookup: abbreviations, -fH, --opt=value, negative numbers)
            found = self._parse_optional(arg) if isinstance(arg, str) else None
            if found is not None and found[0] is None:
                return arg
        return None

    def _name_hint(self, unknown: str) -> str:
        """Where the command takes a name, '-x' may have been meant as one."""
        if not unknown.startswith("--") and any(not a.option_strings and a.dest != "help" for a in self._actions):
            return " (a device name that starts with '-' goes after '--')"
        return ""

    def error(self, message: str):
        where = self.prog.removeprefix(PROG).strip()
        print(f"{PROG}: {where + ': ' if where else ''}{_usage_words(message)}; see "
              f"'{self.prog} --help'", file=sys.stderr)
        self.print_usage(sys.stderr)
        self.exit(2)


def _usage_words(message: str) -> str:
    """argparse's messages in the CLI's words (the rest pass unchanged)."""
    m = re.fullmatch(r"argument COMMAND: invalid choice: '(.*?)' \(choose from (.*)\)", message)
    if m:
        import difflib
        choices = re.findall(r"'([^']*)'", m.group(2))
        close = difflib.get_close_matches(m.group(1), choices, n=1)
        return f"unknown command {m.group(1)!r}" + (f" (did you mean {close[0]!r}?)"
                                                     if close else "")
    m = re.fullmatch(r"unrecognized arguments: (.*)", message)
    if m:
        return f"unknown option or argument {m.group(1)!r}"
    m = re.fullmatch(r"the following arguments are required: (.*)", message)
    if m:
        return f"missing {m.group(1).replace(', ', ' and ')}"
    m = re.fullmatch(r"argument (\S+): expected one argument", message)
    if m:
        return f"{m.group(1)} needs a value"
    m = re.fullmatch(r"argument (\S+): (.*)", message, re.S)
    if m:
        return f"{m.group(1)}: {m.group(2)}"
    return message


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global options, then one subparser per command of every module."""
    parser = _Parser(
        prog=PROG, description="Thin-provisioned copy-on-write block store: volumes, "
        "snapshots, clones.", epilog="Run 'thinstore COMMAND --help' for a command's options.")
    parser.add_argument("--pool", metavar="DIR", default=os.environ.get("THINSTORE_POOL"),
                        help="pool directory (default: $THINSTORE_POOL)")
    _add_wait_options(parser, default_wait())
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    _accept_pool_after_command(subparsers)
    _describe_commands(subparsers)
    return parser


def default_wait() -> float:
    from thinstore.cli.context import DEFAULT_WAIT
    return DEFAULT_WAIT


def _add_wait_options(parser, default) -> None:
    """``--wait SECONDS`` / ``--no-wait``: how long to wait for a pool another process
    (not a server: commands go through that) holds, as LVM waits for its lock.  After
    the command (default SUPPRESS) they are accepted but not listed, like --pool."""
    after = default is argparse.SUPPRESS
    parser.add_argument("--wait", type=_seconds, default=default, metavar="SECONDS",
                        help=argparse.SUPPRESS if after else "wait this long for a pool "
                        f"another command holds (default {default_wait():g}; 0: fail at "
                        "once, exit 5)")
    parser.add_argument("--no-wait", dest="wait", action="store_const", const=0.0,
                        default=default, help=argparse.SUPPRESS if after else
                        "fail at once (exit 5) if another command holds the pool")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid wait {text!r}: give seconds, e.g. 30 "
                                         "(0: do not wait)")
    return value


def _describe_commands(subparsers) -> None:
    """'thinstore COMMAND -h' opens with the line 'thinstore -h' lists for the command,
    where the command gives no longer description of its own."""
    # argparse keeps each command's help only in this (private) list: without it, no
    # descriptions, and nothing else changes
    for action in getattr(subparsers, "_choices_actions", ()):
        sub = subparsers.choices.get(action.dest)
        if sub is not None and not sub.description and action.help:
            sub.description = action.help[:1].upper() + action.help[1:] + "."


def _version() -> str:
    """``thinstore --version``: what a bug report and a packaging script ask for first."""
    from thinstore import __version__
    return f"{PROG} {__version__}"


def _accept_pool_after_command(subparsers) -> None:
    """Let ``thinstore create vm1 --size 1G --pool DIR`` work as well as the global form.

    SUPPRESS leaves the global value (or $THINSTORE_POOL) alone when the option is absent.
    """
    for sub in set(subparsers.choices.values()):
        try:
            sub.add_argument("--pool", metavar="DIR", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
        except argparse.ArgumentError:  # the command defines --pool itself
            pass
        try:
            _add_wait_options(sub, argparse.SUPPRESS)
        except argparse.ArgumentError:  # the command has a --wait of its own
            pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (the console script exits with it)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return _exit_status(exit_.code)
    except ThinstoreError as err:  # raised by an argument type: a bad size or name
        return _report(err, err.exit_code)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Call the handler, mapping failures to one line on stderr and an exit code."""
    if getattr(args.func, "__name__", "") != "cmd_serve":  # serve (and each frontend's
        # command, which is serve) configures its own log lines
        _log_like_errors()
    from thinstore.cli.context import lock_wait
    try:
        with lock_wait(args.wait):
            return args.func(args) or 0
    except ThinstoreError as err:
        return _report(err, err.exit_code, _waited_words(err))
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as err:
        return _report(err, 1, _os_message(err, getattr(args, "pool", None)))
    except KeyboardInterrupt:
        return _report(None, 130, "interrupted")
    except Exception as err:  # librados' own errors: the cluster, not a bug of ours
        if type(err).__module__ == "rados":
            from thinstore.errors import StorageUnavailable
            return _report(err, StorageUnavailable.exit_code,
                           f"Ceph: {err} (is the cluster up, and the RADOS pool not full? "
                           "'ceph -s', 'ceph df')")
        return _report(err, EXIT_INTERNAL, f"internal error: {type(err).__name__}: {err} "
                       "(rerun with THINSTORE_DEBUG=1 for a traceback and report it)")


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


def _log_like_errors() -> None:
    """The core's warnings (a pool past its low-water mark, an unclean shutdown) went out
    bare through logging's last-resort handler; prefix them like every other line on
    stderr (``thinstore: warning: ...``) so a script can tell them from data."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelFormatter())
    logging.getLogger().addHandler(handler)


def _report(err: BaseException | None, code: int, message: str | None = None) -> int:
    if os.environ.get("THINSTORE_DEBUG") == "1" and err is not None:
        import traceback

        traceback.print_exception(err)
    print(f"{PROG}: {_cli_words(message or str(err))}", file=sys.stderr)
    return code


def _waited_words(err: ThinstoreError) -> str | None:
    """A pool lock waited for in vain: the message, and how to wait longer."""
    if getattr(err, "waited", 0) >= 1:
        return f"{err}; wait longer with --wait SECONDS"
    return None


_API_ARGUMENT = re.compile(r"\b(shrink|force)=True\b")


def _cli_words(message: str) -> str:
    """The core's errors name its API's arguments ('pass shrink=True'); on the command
    line the same advice is the option ('pass --shrink')."""
    return _API_ARGUMENT.sub(lambda m: f"--{m.group(1)}", message)


def _os_message(err: OSError, pool: str | None = None) -> str:
    """``FILE: reason``, the way cp and dd word it. A bare ENOSPC is the file system
    that holds the pool's own files (metadata, intent log): "No space left on device"
    alone read as the pool being full while 'status' showed it nearly empty."""
    if err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    if err.errno == errno.ENOSPC and pool and "://" not in pool:
        return (f"no space left on the file system that holds pool {pool}: its metadata or "
                f"intent log could not be written (the pool's own free space, 'thinstore "
                f"status', is another matter); free space there ('df {pool}'), then retry "
                f"(through a running server the change was kept in its memory: it is "
                f"committed once there is room, and lost if the server stops first)")
    return err.strerror or str(err)


def _quiet_broken_pipe() -> int:
    """The reader went away (``thinstore list | head``): stop without a second error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def _exit_status(code) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 2
