"""The frontends' state files (attach, Docker volumes, containerd snapshots, CSI state):
one layout (docs/statefile.md), written privately and atomically, older files still
read, and any damage refused with an error that names the file."""

from __future__ import annotations

import json
import os
import zlib

import mmh3
import pytest

from thinstore.errors import CorruptMetadata
from thinstore.frontends import statefile
from thinstore.frontends.attach import AttachError
from thinstore.frontends.attach.state import Attachment, StateFile as AttachState
from thinstore.frontends.containerd.store import Store
from thinstore.frontends.csi.state import State as CSIState, StateError
from thinstore.frontends.docker.registry import Registry


class Attach:
    magic, error, legacy_key, legacy_sum = "thinstore-attach-state", AttachError, \
        "attachments", "crc32"

    def __init__(self, d):
        self.path = os.path.join(d, "attach.json")

    def write(self):
        AttachState(self.path).save({"v": Attachment("v", "nbdfuse-loop", "/dev/loop7",
                                                     owners={"c1": "mount"})})

    def read(self):
        return {k: a.to_dict() for k, a in AttachState(self.path).load().items()}

    def payload(self):
        return {"v": Attachment("v", "nbdfuse-loop", "/dev/loop7",
                                owners={"c1": "mount"}).to_dict()}


class Docker:
    magic, error, legacy_key, legacy_sum = "thinstore-docker-volumes", AttachError, \
        "volumes", "crc32"

    def __init__(self, d):
        self.path = os.path.join(d, "volumes.json")

    def write(self):
        Registry(self.path).put("web", fs="xfs", state="ready", **{"from": "base@s"})

    def read(self):
        return Registry(self.path).volumes

    def payload(self):
        return {"web": {"fs": "xfs", "state": "ready", "from": "base@s"}}


class Containerd:
    magic, error, legacy_key, legacy_sum = "thinstore-containerd-snapshots", \
        CorruptMetadata, "body", "checksum"

    def __init__(self, d):
        self.dir, self.path = d, os.path.join(d, "snapshots.json")

    def write(self):
        with Store(self.dir).transaction() as body:
            body["snapshots"]["sha256:ab c"] = {"id": 1, "kind": "committed", "parent": "",
                                                "device": "ctd-1@c", "labels": {},
                                                "created": 5, "updated": 5}

    def read(self):
        return Store(self.dir).body

    def payload(self):
        return {"generation": 1, "next_id": 1, "intents": [], "snapshots": {
            "sha256:ab c": {"id": 1, "kind": "committed", "parent": "", "device": "ctd-1@c",
                            "labels": {}, "created": 5, "updated": 5}}}


class CSI:
    magic, error, legacy_key, legacy_sum = "thinstore-csi-state", StateError, None, "line"

    def __init__(self, d):
        self.dir, self.path = d, os.path.join(d, "state")

    def write(self):
        CSIState(self.dir).put("volumes", "pvc-1", {"id": "csi.pvc-1", "size": 4096})

    def read(self):
        return CSIState(self.dir).data

    def payload(self):
        return {"volumes": {"pvc-1": {"id": "csi.pvc-1", "size": 4096}}, "snapshots": {}}


KINDS = [Attach, Docker, Containerd, CSI]


@pytest.fixture(params=KINDS, ids=lambda k: k.__name__.lower())
def kind(request, tmp_path):
    return request.param(str(tmp_path / "state-dir"))


def test_every_frontend_writes_the_documented_layout_privately(kind):
    old = os.umask(0)           # whatever the umask: the file is its owner's alone
    try:
        kind.write()
    finally:
        os.umask(old)
    assert oct(os.stat(kind.path).st_mode & 0o777) == "0o600"
    raw = open(kind.path, "rb").read()
    head, newline, body = raw.partition(b"\n")
    magic, version, length, checksum = head.decode("ascii").split(" ")
    assert newline and magic == kind.magic and version == "2"
    assert int(length) == len(body)
    assert checksum == f"{mmh3.hash(body, 0, signed=False):08x}"
    assert json.loads(body) == kind.payload() == kind.read()
    assert os.listdir(os.path.dirname(kind.path)) == [os.path.basename(kind.path)]


def legacy_bytes(kind) -> bytes:
    """The file as the frontend wrote it before the shared layout (version 1)."""
    payload = kind.payload()
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    if kind.legacy_sum == "line":
        return f"{kind.magic} 1 {mmh3.hash(canonical, 0, signed=False):08x}\n".encode() \
            + canonical
    doc = {"magic": kind.magic, "version": 1, kind.legacy_key: payload}
    doc[kind.legacy_sum] = zlib.crc32(canonical) if kind.legacy_sum == "crc32" else \
        "%032x" % mmh3.hash128(canonical, 0, True, signed=False)
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def test_a_file_an_older_thinstore_wrote_is_read_and_rewritten(kind):
    os.makedirs(os.path.dirname(kind.path))
    with open(kind.path, "wb") as f:
        f.write(legacy_bytes(kind))
    assert kind.read() == kind.payload()
    kind.write()                          # the next change writes the new layout
    assert open(kind.path, "rb").read().startswith(f"{kind.magic} 2 ".encode())
    assert kind.read()                    # ... which reads back
    bad = legacy_bytes(kind).replace(b"4096", b"4097").replace(b"loop7", b"loop8") \
        .replace(b"xfs", b"ext").replace(b"ctd-1@c", b"ctd-2@c")
    with open(kind.path, "wb") as f:
        f.write(bad)
    with pytest.raises(kind.error, match="checksum"):
        kind.read()


def damaged(kind) -> dict[str, tuple[bytes, str]]:
    raw = open(kind.path, "rb").read()
    head = raw.index(b"\n")
    flip = bytearray(raw)
    flip[head + 5] ^= 0x01
    cases = {"flip": (bytes(flip), "checksum"),
             "extra": (raw + b"{}", "bytes after its body"),
             "newer": (raw.replace(b" 2 ", b" 3 ", 1), "version 3"),
             "other kind": (raw.replace(kind.magic.encode(), b"thinstore-other", 1),
                            f"not a {kind.magic} file"),
             "empty": (b"", "")}
    for cut in range(1, len(raw)):        # a file cut short anywhere
        cases[f"cut at {cut}"] = (raw[:cut], "")
    return cases


def test_any_damage_is_refused_naming_the_file_and_the_file_is_kept(kind):
    kind.write()
    for name, (raw, why) in damaged(kind).items():
        with open(kind.path, "wb") as f:
            f.write(raw)
        with pytest.raises(kind.error) as caught:
            kind.read()
        message = str(caught.value)
        assert kind.path in message and why in message, (name, message)
        assert open(kind.path, "rb").read() == raw, name       # never silently replaced


def test_cut_short_after_the_header_says_so(kind):
    kind.write()
    raw = open(kind.path, "rb").read()
    with open(kind.path, "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(kind.error, match="cut short"):
        kind.read()


def test_a_temporary_file_a_crash_left_is_ignored_then_replaced(kind):
    kind.write()
    tmp = kind.path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"half a new state")
    os.chmod(tmp, 0o666)
    assert kind.read() == kind.payload()  # the file the rename would have replaced
    kind.write()
    assert not os.path.exists(tmp)
    assert oct(os.stat(kind.path).st_mode & 0o777) == "0o600"


def test_decode_is_the_inverse_of_encode_for_any_json_value():
    for value in ({}, [], {"a": [1, 2.5, None, "é\n"]}, "text", 0):
        raw = statefile.encode("thinstore-x", value)
        assert statefile.decode(raw, "thinstore-x", "f") == value


def test_the_documented_example_is_a_valid_file():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "statefile.md")).read()
    example = doc.split("```\n")[1]           # the first fenced block: the Docker example
    assert statefile.decode(example.encode(), "thinstore-docker-volumes", "example") == \
        {"web": {"from": None, "fs": "ext4", "state": "ready"}}
