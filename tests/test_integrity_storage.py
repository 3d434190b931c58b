"""The storage layer's punch must not spawn processes: a forked child would inherit the
pool's descriptors (its lock among them) and outlive a crash of the pool's process."""

from __future__ import annotations

import subprocess

from thinstore import storage


def test_punch_spawns_no_process(tmp_path, monkeypatch):
    def no_spawn(*a, **k):
        raise AssertionError("the storage layer started a subprocess")
    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    monkeypatch.setattr(storage, "_LIBC", None)
    f = storage.FileIO(str(tmp_path / "f"), create=True)
    f.pwrite(b"x" * 65536, 0)
    f.punch(4096, 8192)
    assert f.pread(16384, 0) == b"x" * 4096 + bytes(8192) + b"x" * 4096
    f.close()
