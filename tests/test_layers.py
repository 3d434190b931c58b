"""Imports flow one way: the storage core knows nothing of NBD, the CLI or replication."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "thinstore"
CORE = ["errors", "format", "storage", "kernels", "native", "paged", "metastore", "spacemap",
        "blockmap", "metadata", "datasums", "pool", "datapath", "hidden", "device", "names",
        "units", "rwlock", "readers", "synclog", "logroom", "recovery", "fastlane",
        "rados_store", "rados_lock", "queries", "reclaim", "management", "writeback",
        "mapkernels", "rados_file", "chunkhash"]
# the only modules that know where bytes live
STORAGE = {"storage", "rados_store", "rados_file", "rados_lock"}
ABOVE = ("nbd", "cli", "control", "replication", "stream", "diff", "resume", "frontends",
         "bench")


def imported(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                    # relative: from .x import y / from . import x
                found.update([base.split(".")[0]] if base else [a.name for a in node.names])
            elif base.startswith("thinstore."):
                found.add(base.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("thinstore."))
    return found


def test_storage_core_imports_nothing_above_it():
    for name in CORE:
        path = PKG / f"{name}.py"
        assert path.exists(), name
        bad = imported(path) & set(ABOVE)
        assert not bad, f"thinstore/{name}.py imports {sorted(bad)}"


def test_nbd_server_does_not_reach_into_the_cli():
    for path in (PKG / "nbd").glob("*.py"):
        assert "cli" not in imported(path), path.name


def test_only_the_storage_layer_knows_a_pool_may_be_rados_objects():
    """DESIGN §9: storage.py (and the backend it loads) alone know directory vs RADOS."""
    for path in PKG.rglob("*.py"):
        if path.stem in STORAGE:
            continue
        bad = imported(path) & (STORAGE - {"storage"})
        assert not bad, f"{path.relative_to(PKG)} imports {sorted(bad)}"
