"""Container images for the containerd tests, made offline: a docker-archive tarball.

The layout ``docker save`` writes and ``ctr images import`` reads::

    manifest.json       [{"Config": "<hex>.json", "RepoTags": [REF], "Layers": ["<i>/layer.tar"]}]
    <hex>.json          image config: rootfs.diff_ids (sha256 of each layer tar), Cmd, Env
    <i>/layer.tar       an uncompressed tar of the files that layer adds or changes

Layer 1 is busybox-static as /bin/busybox with links for the applets the tests call, and
the directories a runtime expects; layer 2 adds /etc files; further layers are the caller's
(``extra``: path -> bytes, or path -> int for that many bytes of non-zero filler).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "cat", "echo", "ls", "sleep", "true", "sync", "dd", "md5sum", "rm", "mkdir")


def busybox_path() -> str | None:
    """Debian's busybox-static (a static binary runs in any rootfs), if installed."""
    for path in (BUSYBOX, "/usr/bin/busybox"):
        if os.path.isfile(path):
            return path
    return shutil.which("busybox")


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o644,
         kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.linkname = kind, mode, 1700000000, link
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


class _Filler(io.RawIOBase):
    """``size`` bytes of a fixed non-zero pattern, streamed (a 1 GiB layer stays on disk)."""

    def __init__(self, size: int, seed: int):
        self.left = size
        self.block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)   # 1 MiB

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left, len(self.block))
        buf[:n] = self.block[:n]
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


def _layer(path: str, files: dict) -> str:
    """Write one layer tar; its sha256 (the diff_id)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, spec in files.items():
            if spec is None:
                _add(tar, name, kind=tarfile.DIRTYPE, mode=0o755)
            elif isinstance(spec, tuple):                       # ("symlink", target)
                _add(tar, name, kind=tarfile.SYMTYPE, mode=0o777, link=spec[1])
            elif isinstance(spec, int):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = spec, 0o644, 1700000000
                tar.addfile(info, io.BufferedReader(_Filler(spec, hash(name) & 0xffff)))
            else:
                _add(tar, name, spec, mode=0o755 if name.startswith("bin/") else 0o644)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_layers(hostname: str = "thinstore-image") -> list[dict]:
    with open(busybox_path(), "rb") as f:
        busybox = f.read()
    first = {d: None for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "root")}
    first["bin/busybox"] = busybox
    first.update({f"bin/{a}": ("symlink", "busybox") for a in APPLETS})
    second = {"etc/hostname": hostname.encode() + b"\n",
              "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
              "etc/group": b"root:x:0:\n"}
    return [first, second]


def make_image(path: str, ref: str, extra: list[dict] = (), hostname: str = "thinstore-image"
               ) -> dict:
    """Write a docker-archive tarball of busybox + /etc + ``extra`` layers to ``path``.

    Returns {"ref": ref, "layers": n, "diff_ids": [...]}.
    """
    work = path + ".d"
    os.makedirs(work, exist_ok=True)
    layers, diff_ids = [], []
    for i, files in enumerate([*base_layers(hostname), *extra]):
        os.makedirs(os.path.join(work, str(i)), exist_ok=True)
        name = f"{i}/layer.tar"
        diff_ids.append("sha256:" + _layer(os.path.join(work, name), files))
        layers.append(name)
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": f"thinstore test layer {i}"} for i in range(len(layers))]}
    raw = json.dumps(config).encode()
    config_name = hashlib.sha256(raw).hexdigest() + ".json"
    with open(os.path.join(work, config_name), "wb") as f:
        f.write(raw)
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": layers}]
    with open(os.path.join(work, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with tarfile.open(path, "w") as tar:
        for name in ["manifest.json", config_name, *layers]:
            tar.add(os.path.join(work, name), arcname=name)
    shutil.rmtree(work)
    return {"ref": ref, "layers": len(layers), "diff_ids": diff_ids}
