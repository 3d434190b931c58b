#!/usr/bin/python3
"""4 KiB random writes, every one with FUA, at a queue depth, through libnbd.

fio's nbd engine has no way to set NBD_CMD_FLAG_FUA (qemu's writethrough cache mode
sends it on every write), so fio_compare.py runs this for that workload. It runs under
the system Python, which has Debian's python3-libnbd:

    /usr/bin/python3 benchmarks/nbd_fua.py URI QUEUE_DEPTH SECONDS SIZE_BYTES

and prints {"iops": N} (writes completed per second) as JSON.
"""

import json
import os
import random
import sys
import time

import nbd


def main() -> int:
    uri, depth, seconds, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    h = nbd.NBD()
    h.connect_uri(uri)
    if not h.can_fua():
        raise SystemExit(f"{uri} does not accept FUA")
    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(4096)))
    blocks = size // 4096
    rng = random.Random(1)
    done = [0]

    def completed(error) -> int:
        if error.value:
            raise SystemExit(f"write failed: {error.value}")
        done[0] += 1
        return 1                     # retire the command

    warm = time.monotonic() + 1.0
    end = warm + seconds
    counted_from = None
    while True:
        now = time.monotonic()
        if counted_from is None and now >= warm:
            counted_from, done[0] = now, 0
        if now >= end:
            break
        while h.aio_in_flight() < depth:
            h.aio_pwrite(buf, rng.randrange(blocks) * 4096, completion=completed,
                         flags=nbd.CMD_FLAG_FUA)
        h.poll(-1)
    elapsed = time.monotonic() - counted_from
    while h.aio_in_flight():
        h.poll(-1)
    h.shutdown()
    print(json.dumps({"iops": done[0] / elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
