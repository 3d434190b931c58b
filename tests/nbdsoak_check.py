"""The NBD kill soak's checker (tests/nbdsoak.py): tagged sectors and the rule.

Every sector a soak client writes holds one 16-byte tag repeated 32 times: a magic,
the sector's own index on its export, and the write's id (unique in the soak). Read
back, a sector therefore names the write it came from (0: zeros), and a sector torn
inside or holding another sector's tag is caught. :func:`verify` applies the rule
stated in tests/nbdsoak.py's docstring to one export's sectors.
"""

from __future__ import annotations

import numpy as np

from thinstore.nbd import protocol as P

SECTOR = 512
TAG_MAGIC = 0x6B696C6C                  # "kill"
TAG = np.dtype([("magic", "<u4"), ("sector", "<u4"), ("id", "<u8")])
TRIM, ZEROES = -1, -2                   # kinds besides WRITE in an op's record
_KIND = {TRIM: "TRIM", ZEROES: "WRITE_ZEROES"}


def payload(op_id: int, first: int, n: int) -> bytes:
    """The bytes of write `op_id` over sectors [first, first + n): each sector its
    16-byte tag (magic, sector index, id) repeated 32 times."""
    tags = np.zeros(n, TAG)
    tags["magic"] = TAG_MAGIC
    tags["sector"] = np.arange(first, first + n, dtype=np.uint32)
    tags["id"] = op_id
    return np.repeat(tags.view(np.uint8).reshape(n, 1, 16), 32, axis=1).tobytes()


def observe(data: bytes) -> tuple[np.ndarray, list[int]]:
    """(per sector: the id of the write it holds, 0 for zeros; sectors holding
    neither a whole tag of their own index nor zeros)."""
    n = len(data) // SECTOR
    raw = np.frombuffer(data, np.uint8).reshape(n, 32, 16)
    whole = (raw == raw[:, :1, :]).all(axis=(1, 2))
    tags = raw[:, 0, :].copy().view(TAG).reshape(n)
    zero = whole & ~raw[:, 0, :].any(axis=1)
    tagged = whole & (tags["magic"] == TAG_MAGIC) & (tags["sector"] == np.arange(n))
    ids = np.where(tagged, tags["id"].astype(np.int64), 0)
    bad = np.flatnonzero(~(zero | tagged))
    return ids, bad.tolist()


class Op:
    """One request: kind (P.Cmd.WRITE, TRIM, ZEROES or P.Cmd.FLUSH), its export and
    sectors, FUA, the event numbers when it was sent and when its reply was read."""

    __slots__ = ("id", "kind", "export", "first", "n", "fua", "sent", "acked", "error")

    def __init__(self, op_id, kind, export, first=0, n=0, fua=False):
        self.id, self.kind, self.export, self.first, self.n = op_id, kind, export, first, n
        self.fua, self.sent, self.acked, self.error = fua, None, None, None

    @property
    def value(self) -> int:
        return self.id if self.kind == P.Cmd.WRITE else 0


def make_exports(path: str, capacity: int, chunk: int, size: int) -> None:
    """A pool at `path` of `capacity` bytes and `chunk`-byte chunks with the soaks' three
    exports of `size` bytes: ``fresh`` (zeros), ``base`` (every sector tagged with id 1,
    snapshotted as ``base@s``) and ``clone`` (of ``base@s``); committed and closed."""
    from thinstore import Pool
    pool = Pool.create(path, capacity, chunk, commit_interval=0)
    try:
        for name in ("fresh", "base"):
            pool.create_volume(name, size)
        with pool.open_device("base") as dev:
            dev.pwrite(payload(1, 0, size // 512), 0)
        pool.snapshot("base@s")
        pool.clone("base@s", "clone")
        pool.commit()
    finally:
        pool.close()


def verify(name: str, start: np.ndarray, ops: list[Op], data: bytes) -> tuple[list, np.ndarray]:
    """The rule of the module docstring for export `name` (`ops`: the round's, on every
    export): (failures, what it holds)."""
    got, bad = observe(data)
    errors = [f"{name}: sector {s} holds neither zeros nor a whole tag of its own"
              for s in bad[:5]]
    mine = sorted((o for o in ops if o.export == name and o.sent is not None),
                  key=lambda o: o.sent)
    last_flush = max((o.sent for o in ops if o.kind == P.Cmd.FLUSH and o.acked is not None),
                     default=0)
    must = start.copy()
    since = np.full(len(start), -1, np.int64)     # order of the last durable request
    later: list[tuple[int, Op]] = []
    for order, o in enumerate(mine):
        if o.kind == P.Cmd.FLUSH or o.error:
            continue
        if o.acked is not None and (o.fua or o.acked < last_flush):     # durable
            must[o.first:o.first + o.n] = o.value
            since[o.first:o.first + o.n] = order
        later.append((order, o))
    zeroes = [(order, o) for order, o in later if o.value == 0]
    by_id = {o.id: (order, o) for order, o in later}
    lost: dict = {}                 # the durable request (or -1: the start) -> sectors
    for s in np.flatnonzero(got != must).tolist():
        v = int(got[s])
        found = [by_id[v]] if v in by_id else zeroes if v == 0 else []
        if s in bad or any(order > since[s] and o.first <= s < o.first + o.n
                           for order, o in found):
            continue
        key = mine[since[s]] if since[s] >= 0 else None
        lost.setdefault(key, []).append((s, v))
    for o, sectors in list(lost.items())[:10]:
        s, v = sectors[0]
        what = "the round's starting contents" if o is None else \
            (f"{'FUA ' if o.fua else ''}{_KIND.get(o.kind, 'WRITE')} {o.id} of sectors "
             f"{o.first}+{o.n}, answered{'' if o.fua else ' before a FLUSH was sent'}")
        errors.append(f"{name}: {len(sectors)} sector(s) lost {what}: sector {s} "
                      f"(byte {s * SECTOR}) holds value {v} instead of {int(must[s])}")
    return errors, got
