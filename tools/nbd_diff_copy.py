#!/usr/bin/python3
"""Bring a raw image up to date by copying only the ranges an NBD export changed.

    nbd_diff_copy.py URI BASE IMAGE

IMAGE holds the export's content as of snapshot BASE (a previous full backup: e.g.
'thinstore export vm@mon vm.img', or the last run of this script). The export at
URI is read only where the meta context 'thinstore:diff:BASE' flags it changed
(flag 1, docs/nbd.md), and those bytes are written into IMAGE at the same offsets;
IMAGE is then sized to the export. Prints the bytes copied and the export size.

Needs libnbd's Python binding (Debian: python3-libnbd), hence /usr/bin/python3.
"""

import sys

import nbd

CHANGED = 1
STEP = 1 << 30            # bytes asked about per BLOCK_STATUS request
PIECE = 4 << 20           # bytes per read


def changed_ranges(h, context: str, size: int):
    """(offset, length) of every range the server flags changed, ascending."""
    out = []
    pos = 0
    while pos < size:
        seen = []

        def extents(metacontext, offset, entries, err):
            if metacontext == context:
                seen.append((offset, entries))
            return 0

        h.block_status(min(STEP, size - pos), pos, extents)
        offset, entries = seen[0]
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            length = min(length, size - offset)
            if flags & CHANGED and length:
                out.append((offset, length))
            offset += length
        if offset <= pos:
            raise RuntimeError("the server made no progress in BLOCK_STATUS")
        pos = offset
    return out


def main(argv):
    if len(argv) != 4:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    uri, base, image = argv[1:]
    context = f"thinstore:diff:{base}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        sys.exit(f"the server does not offer {context} for this export")
    size = h.get_size()
    copied = 0
    with open(image, "r+b") as f:
        for offset, length in changed_ranges(h, context, size):
            for pos in range(offset, offset + length, PIECE):
                n = min(PIECE, offset + length - pos)
                f.seek(pos)
                f.write(h.pread(n, pos))
                copied += n
        f.truncate(size)
    h.shutdown()
    print(f"copied {copied} of {size} bytes")


if __name__ == "__main__":
    main(sys.argv)
