#!/usr/bin/env python3
"""Regenerate thinstore/frontends/containerd/snapshots_pb2.py from snapshots.proto.

The generated module is checked in (beside its .proto), so that installing thinstore needs
no protoc and no grpcio-tools; only the protobuf runtime.  Run this after editing the .proto
(needs grpcio-tools); tests/test_containerd_store.py compares the checked-in module's
descriptor with the .proto's and fails when they drift apart.

    python tools/gen_containerd_proto.py           # rewrite snapshots_pb2.py
    python tools/gen_containerd_proto.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = "thinstore/frontends/containerd/snapshots.proto"
OUT = "thinstore/frontends/containerd/snapshots_pb2.py"


def descriptor_set(proto_root: str = ROOT) -> bytes:
    """The serialized FileDescriptorSet protoc makes of the .proto (no source info)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        _protoc(["-I", proto_root, f"--descriptor_set_out={out}", PROTO], proto_root)
        with open(out, "rb") as f:
            return f.read()


def generate(into: str) -> None:
    _protoc(["-I", ROOT, f"--python_out={into}", PROTO], ROOT)


def _protoc(args: list[str], cwd: str) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    if protoc.main(["protoc", "-I", include, *args]) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        with open(os.path.join(tmp, OUT), "rb") as f:
            fresh = f.read()
    target = os.path.join(ROOT, OUT)
    if "--check" in argv:
        with open(target, "rb") as f:
            stale = f.read() != fresh
        print(f"{OUT}: {'stale' if stale else 'up to date'}")
        return int(stale)
    with open(target, "wb") as f:
        f.write(fresh)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
