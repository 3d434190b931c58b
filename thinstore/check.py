"""Consistency check of a pool: what thin_check verifies, and a little more.

What must hold, and is verified here:

- both superblock slots are valid (a damaged one is reported even when the other works);
- every metadata block the committed tree reaches passes its checksum, magic and
  location test, and no block is claimed twice (salvage.py reads them all);
- every map entry names a chunk inside the pool (never the reserved chunk 0);
- the stored reference count of every data chunk equals the number of map entries
  naming it: more is a leak, fewer means a chunk is owned more often than counted
  (it would be freed while still mapped);
- with data checksums on, every mapped chunk has a checksum.

Each class of damage has its own exit code (salvage.DAMAGE_CODES); a report names
devices, byte offsets, chunks and metadata blocks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .datasums import INTENT_NAME, IntentLog
from .kernels import ST_REF_CHANGED, ST_WRITTEN
from .pool import POOL_FLAG_DATA_CHECKSUMS
from .salvage import DAMAGE_CODES, Problem, owners, salvage
from .storage import FileIO, locked_store
from .synclog import log_records

MAX_LISTED = 20            # problems of one class named one by one; the rest are counted


@dataclasses.dataclass
class Report:
    path: str
    problems: list
    info: dict

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        """0 when clean, else the code of the most severe class of damage found."""
        kinds = {p.kind for p in self.problems}
        return next((code for kind, code in DAMAGE_CODES.items() if kind in kinds), 0)

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> "Report":
        """The inverse of to_dict (an online check's answer); `path` as the user gave it."""
        return cls(path or d["path"], [Problem(**p) for p in d["problems"]], d["info"])

    def to_dict(self) -> dict:
        return {"path": self.path, "clean": self.clean, "exit_code": self.exit_code,
                "info": self.info, "problems": [p.to_dict() for p in self.problems]}


def expected_refcounts(md) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Refcounts recomputed from every live map page, sparse: (chunk ids, sorted; how
    many map entries name each; the entries naming chunks outside the pool)."""
    maps, space = md.maps, md.space
    live = np.flatnonzero(maps.ref > 0)
    maps.ensure_loaded(live)
    ents = maps.pages[live].ravel()
    ents = ents[ents != 0].astype(np.int64)
    cap = len(space.refs.arr)
    ids, counts = np.unique(ents[ents < cap], return_counts=True)
    return ids, counts, ents[ents >= cap]


def stored_nonzero(md) -> np.ndarray:
    """Chunk ids whose stored refcount is nonzero, sorted: from the refcount leaves
    that hold any, and the chunks an open transaction changed (marked only at commit),
    never a pass over the pool's capacity."""
    refs = md.space.refs
    ids = refs.nonzero_slots()
    changed = md.space.flagged(ST_REF_CHANGED)
    if len(changed):
        ids = np.union1d(ids, changed[refs.arr[changed] != 0])
    return ids


def refcount_differences(md):
    """(chunks whose stored refcount differs from the maps', their stored counts, their
    expected counts, the chunks the maps name, entries naming chunks outside the pool)."""
    ids, counts, outside = expected_refcounts(md)
    cand = np.union1d(ids, stored_nonzero(md))
    stored = md.space.refs.arr[cand].astype(np.int64)
    expect = np.zeros(len(cand), dtype=np.int64)
    expect[np.searchsorted(cand, ids)] = counts
    diff = stored != expect
    return cand[diff], stored[diff], expect[diff], ids, outside


def check_metadata(md, committed: bool = True) -> list[Problem]:
    """Map, refcount and checksum-table checks of a loaded (or salvaged) tree.

    `committed` adds what holds only between transactions: no page is stored that no
    directory names (an open transaction frees such pages at its commit). Costs what
    is mapped, not the pool's capacity.
    """
    problems: list[Problem] = []
    if committed:
        problems += _leaked_pages(md)
    chunks, stored, expect, mapped, outside = refcount_differences(md)
    cap = len(md.space.refs.arr)
    if len(outside):
        problems += _name_chunks(md, "range", outside, "names chunk {c}, outside the pool "
                                 f"({cap} chunks)")
    if len(mapped) and mapped[0] == 0:
        problems += _name_chunks(md, "range", [0], "names reserved chunk 0")
    problems += _refcount_problems(md, chunks, stored, expect)
    if md.flags & POOL_FLAG_DATA_CHECKSUMS:
        pending = (md.space.state[mapped] & ST_WRITTEN) != 0     # the next commit hashes these
        missing = mapped[(md.space.sums.arr[mapped] == 0) & ~pending & (mapped != 0)]
        problems += _listed("checksum", missing, lambda c: Problem(
            "checksum", f"chunk {c}: mapped but has no checksum (reads cannot verify it)",
            chunk=c))
    return problems


def _leaked_pages(md) -> list[Problem]:
    maps = md.maps
    n = min(len(maps.ref), len(maps.locations.arr))
    locs = maps.locations.arr[:n]
    leaked = np.flatnonzero((locs != 0) & (maps.ref[:n] == 0))
    return _listed("leak", leaked, lambda p: Problem(
        "leak", f"map page {p} is stored in metadata block {int(locs[p])} but no device "
        "names it", block=int(locs[p])))


def _refcount_problems(md, chunks, stored, expect) -> list[Problem]:
    out = []
    st = dict(zip(chunks.tolist(), stored.tolist()))
    ex = dict(zip(chunks.tolist(), expect.tolist()))
    under = chunks[stored < expect]
    own = owners(md, under[:MAX_LISTED])
    out += _listed("refcount", under, lambda c: Problem(
        "refcount", f"chunk {c}: stored refcount {st[c]}, but {ex[c]} map entries name "
        f"it ({_where(own.get(c, []))}): it could be freed while still mapped", chunk=c))
    leak = chunks[stored > expect]
    out += _listed("leak", leak, lambda c: Problem(
        "leak", f"chunk {c}: stored refcount {st[c]}, but {ex[c]} map entries name it "
        "(space leaked until repair)", chunk=c))
    return out


def _name_chunks(md, kind: str, chunks, template: str) -> list[Problem]:
    """One problem per map entry naming one of `chunks`, with its device and offset."""
    out = []
    for c, where in owners(md, list(chunks)[:MAX_LISTED]).items():
        for name, off in where[:MAX_LISTED]:
            out.append(Problem(kind, f"device {name!r} at byte {off}: map entry "
                               + template.format(c=c), device=name, offset=off, chunk=c))
    return out


def _listed(kind: str, ids: np.ndarray, make) -> list[Problem]:
    out = [make(int(c)) for c in ids[:MAX_LISTED].tolist()]
    if len(ids) > MAX_LISTED:
        out.append(Problem(kind, f"... and {len(ids) - MAX_LISTED} more chunk(s) like these"))
    return out


def _where(places) -> str:
    shown = ", ".join(f"{n}@{off}" for n, off in places[:4])
    return shown + (f" and {len(places) - 4} more" if len(places) > 4 else "")


def check_pool(pool) -> list[Problem]:
    """Check an open pool's in-memory tree (consistent at any moment, committed or not)."""
    with pool.lock:
        return check_metadata(pool.md, committed=False)


def check_path(path: str, fileio=FileIO) -> Report:
    """Check the committed metadata of the pool at `path`, read-only, under its lock."""
    with locked_store(path, fileio) as store:
        return _check_store(path, store)


def _check_store(path: str, store) -> Report:
    meta = store.open("meta", readonly=True)
    data = store.open("data", readonly=True)
    try:
        return _check_files(path, meta, data, lambda md: _intent_regions(store, md),
                            lambda md: log_records(store, md.sb))
    finally:
        meta.close()
        data.close()


def check_served(pool) -> Report:
    """Check the committed metadata of an open pool (a server's) while it keeps going.

    Reads ``meta`` as check_path does, through the pool's own open file (whatever
    backend holds it), but the generation committed at the start is pinned
    (Pool.pinned_generation): later commits cannot reuse its blocks, and the superblock
    slots are those read at the pin, so no commit is seen half-written. The
    write-intent count and the intent log's record count are 0: the regions a running
    server has marked and the log it appends to are in use, not left over from a crash.
    """
    with pool.pinned_generation() as slots:
        meta = PinnedMeta(pool.md.meta_fio, slots)
        return _check_files(pool.path, meta, pool.md.data_fio, lambda md: 0, lambda md: 0)


def _check_files(path: str, meta, data, intent_regions, log_count) -> Report:
    sv = salvage(meta, data)
    problems = list(sv.problems)
    info = {"slots": sv.slots}
    if sv.md is not None:
        problems += check_metadata(sv.md)
        info.update(_summary(sv.md))
        info["unclean_regions"] = intent_regions(sv.md)
        info["log_records"] = log_count(sv.md)      # intent log records the next open replays
    return Report(path, problems, info)


class PinnedMeta:
    """The pool's ``meta``, read-only, with the superblock slots as they were at the pin.

    The tree those slots name stays intact while pinned; the live slots may be
    rewritten by a commit at any moment, so they are served from the copy. Only
    reads go through; the file stays the pool's (close does nothing).
    """

    def __init__(self, fio, slots: list[bytes]):
        self._fio, self._head = fio, b"".join(slots)

    def close(self) -> None:
        pass

    def pread(self, length: int, offset: int) -> bytes:
        if offset >= len(self._head):
            return self._fio.pread(length, offset)
        head = self._head[offset:offset + length]
        if len(head) == length:
            return head
        return head + self._fio.pread(length - len(head), offset + len(head))

    def size(self) -> int:
        return self._fio.size()

    def __getattr__(self, name):
        if name in ("path", "readonly"):
            return getattr(self._fio, name)
        raise AttributeError(f"{name}: the pinned meta file is read-only")


def _intent_regions(store, md) -> int:
    """How many write-intent regions the next open will re-checksum (0 after a clean
    close): not damage, but what an unclean shutdown left to do."""
    if not store.has(INTENT_NAME) or not md.flags & POOL_FLAG_DATA_CHECKSUMS:
        return 0
    fio = store.open(INTENT_NAME, readonly=True)
    try:
        return len(IntentLog(fio, len(md.space.refs), md.chunk_shift)
                   .read_marked(len(md.space.refs)))
    finally:
        fio.close()


def _summary(md) -> dict:
    return {"generation": md.generation, "format": md.loaded_version,
            "chunk_size": md.chunk_size,
            "capacity_chunks": len(md.space.refs) - 1,
            "mapped_chunks": len(stored_nonzero(md)),
            "map_pages": int(np.count_nonzero(md.maps.ref)),
            "metadata_blocks": int(np.count_nonzero(md.store.used)),
            "devices": sorted(d.name for d in md.devices.values()),
            "data_checksums": bool(md.flags & POOL_FLAG_DATA_CHECKSUMS)}
