#!/usr/bin/env python3
"""Regenerate thinstore/frontends/containerd/snapshots_pb2.py from snapshots.proto.

The generated module is checked in (beside its .proto), so that installing thinstore needs
no protoc and no grpcio-tools; only the protobuf runtime.  Run this after editing the .proto
(needs grpcio-tools); tests/test_containerd_store.py compares the checked-in module's
descriptor with the .proto's and fails when they drift apart.  The comparison is of the
file descriptor protoc makes (every message, field number, type and the service), not of
the module's text, which differs by protoc version for the same .proto.

    python tools/gen_containerd_proto.py           # rewrite snapshots_pb2.py
    python tools/gen_containerd_proto.py --check   # exit 1 if its descriptor is stale
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


def stale() -> bool:
    """Whether the checked-in module's descriptor differs from the .proto's."""
    from google.protobuf import descriptor_pb2

    sys.path.insert(0, ROOT)
    from thinstore.frontends.containerd import snapshots_pb2

    fresh = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set()).file[0]
    _drop_json_names(fresh.message_type)   # --descriptor_set_out adds them; gencode not
    current = descriptor_pb2.FileDescriptorProto.FromString(snapshots_pb2.DESCRIPTOR.serialized_pb)
    return fresh != current


def _drop_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def main(argv: list[str]) -> int:
    if "--check" in argv:
        old = stale()
        print(f"{OUT}: {'stale' if old else 'up to date'}")
        return int(old)
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        with open(os.path.join(tmp, OUT), "rb") as f:
            fresh = f.read()
    target = os.path.join(ROOT, OUT)
    with open(target, "wb") as f:
        f.write(fresh)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
