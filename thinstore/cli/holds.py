"""``thinstore holds``, and the holds the device commands respect on a pool no server holds.

A frontend holds the devices its records name (thinstore/frontends/holds.py). While a
server holds the pool its control socket refuses what a hold forbids; on a pool the CLI
opens itself, :func:`guard` reads the frontends' state files under the pool's directory
and refuses the same way, so stopping the plugin does not open a gap.
"""

from __future__ import annotations

import sys

from thinstore.cli.context import open_pool
from thinstore.cli.names import device_name
from thinstore.cli.output import print_json, print_table
from thinstore.errors import DeviceBusy, ProtocolError


def register(subparsers) -> None:
    p = subparsers.add_parser("holds", help="devices a frontend (Docker, containerd, CSI) "
                              "holds, which destroy and rename refuse")
    p.add_argument("names", type=device_name, nargs="*", metavar="NAME",
                   help="only these devices")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-H", "--no-headers", dest="headers", action="store_false",
                   help="scripted mode: no header, tab-separated")
    p.set_defaults(func=cmd_holds)


def cmd_holds(args) -> int:
    with open_pool(args) as pool:
        for name in args.names:
            pool.info(name)                       # a missing device: exit 3, named
        held = holds_of(pool)
    if args.names:
        held = [h for h in held if h.device in args.names]
    if args.json:
        print_json({"holds": [h.to_dict() for h in held]})
        return 0
    rows = [[h.device, h.holder, h.what, ",".join(h.blocks)] for h in held]
    print_table(["NAME", "HOLDER", "AS", "REFUSES"], rows, right=set(), header=args.headers)
    return 0


def holds_of(pool) -> list:
    """The holds on ``pool``'s devices: the server's answer, or the frontends' records
    read here (a damaged record file is said on stderr and holds nothing)."""
    from thinstore.control import RemotePool
    if isinstance(pool, RemotePool):
        try:
            return pool.holds()
        except ProtocolError:          # a server of an older thinstore: it knows no holds
            return []
    from thinstore.frontends.holds import recorded
    devices = {d.name: d.uuid for d in pool.list()}
    found, problems = recorded(pool.local_dir, devices)
    for problem in problems:
        print(f"thinstore: warning: a frontend's records cannot be read, so the devices "
              f"they name are not known to be held: {problem}", file=sys.stderr)
    return found


def guard(pool, names, op: str, force: bool = False):
    """On a pool this process opened: DeviceBusy if a hold on one of ``names`` refuses
    ``op``, as the control socket would; returns a hold ``force`` overrode, else None.
    Through a server, the server checks (nothing to do here)."""
    from thinstore.control import RemotePool
    if isinstance(pool, RemotePool):
        return None
    from thinstore.frontends.holds import blocking
    held = holds_of(pool)
    for name in names:
        hold = blocking(held, name, op)
        if hold is not None and not (force and hold.forceable):
            raise DeviceBusy(hold.refusal(op))
        if hold is not None:
            return hold
    return None


def summary(held) -> str:
    """'2 (the docker volume plugin 1, the CSI plugin 1): thinstore holds'."""
    from thinstore.frontends.holds import HOLDERS
    counts: dict[str, int] = {}
    for h in held:
        counts[h.holder] = counts.get(h.holder, 0) + 1
    parts = ", ".join(f"{HOLDERS.get(k, k)} {n}" for k, n in counts.items())
    return f"{len(held)} device{'s' if len(held) != 1 else ''} ({parts}): 'thinstore holds'"
