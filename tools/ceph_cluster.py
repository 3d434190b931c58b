#!/usr/bin/env python3
"""A throw-away single-node Ceph cluster for tests and benchmarks: one monitor, one OSD.

    python tools/ceph_cluster.py start DIR [--port 6789] [--store memstore|bluestore]
                                           [--pool thinstore] [--size 4G]
    python tools/ceph_cluster.py stop DIR

``start`` prints ``THINSTORE_TEST_CEPH_CONF=DIR/ceph.conf`` and
``THINSTORE_TEST_CEPH_POOL=NAME`` on stdout (the environment the tests find the
cluster by) once a client can write to the pool; ``stop`` stops the OSD, then the
monitor (the other order leaves the OSD retrying a monitor that is gone), using the
pid files under DIR only: it never touches a daemon it did not start.

Everything lives under DIR (config, monitor store, OSD store, logs, sockets, pid files).
The settings are what makes it start in about three seconds and serve with one OSD:
no cephx, no manager, msgr v1 only on 127.0.0.1, pools of size 1 (min size 1) allowed,
the OSD added to the CRUSH map by hand (``osd crush update on start`` and
``osd class update on start`` off, so the OSD does not wait on the monitor to place
itself), ``chooseleaf type`` 0 (replicas across OSDs, not hosts) and no PG autoscaling.
The monitor listens on ``--port``; the OSD's messengers bind in the 100 ports above it,
so two clusters with ports 100 apart do not collide.

``--store memstore`` (the default) keeps objects in the OSD's memory and loses them
when the OSD stops; ``--store bluestore`` puts them on a sparse file of ``--size``
under DIR, which survives a restart (``restart-osd``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid

CONF = """\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{port}
mon initial members = a
public addr = 127.0.0.1
ms bind msgr2 = false
ms bind msgr1 = true
ms bind port min = {port_lo}
ms bind port max = {port_hi}
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd crush update on start = false
osd class update on start = false
run dir = {d}/run
pid file = {d}/run/$name.pid
mon data = {d}/mon.$id
osd data = {d}/osd.$id
keyring = {d}/keyring
osd objectstore = {store}
memstore device bytes = {size}
bluestore block path = {d}/osd.$id/block.file
bluestore block size = {size}
bluestore block create = true
bluestore fsck on mount = false
osd journal size = 0
osd op num shards = 2
osd op num threads per shard = 1
mon osd down out interval = 0
osd max object size = 134217728

[mon]
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log

[osd]
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log

[client]
# one admin socket per client process: a shared name makes every new client wait ~10 s
# for an old one that is paused (SIGSTOP) to answer on it before giving up the socket
admin socket = {d}/run/$name.$pid.asok
log file = /dev/null
"""


def _ceph(d: str, *args: str, check: bool = True) -> str:
    cmd = ["ceph", "-c", os.path.join(d, "ceph.conf"), "--connect-timeout", "15", *args]
    for attempt in range(10):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        # a monitor that has just formed its quorum can answer EPERM "problem getting
        # command descriptions" for a moment (seen on a loaded 2-core machine): try again
        if res.returncode == 0 or "command descriptions" not in res.stderr:
            break
        time.sleep(0.5)
    if check and res.returncode:
        raise SystemExit(f"ceph_cluster: {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode:
        raise SystemExit(f"ceph_cluster: {cmd[0]} failed: {res.stderr.strip() or res.stdout}")


def _size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    text = text.strip().upper().rstrip("B").rstrip("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * (1 << units[text[-1]]))
    return int(text)


def start(d: str, port: int, store: str, pool: str, size: int) -> None:
    d = os.path.abspath(d)
    if os.path.exists(os.path.join(d, "ceph.conf")):
        raise SystemExit(f"ceph_cluster: {d} holds a cluster already (stop it, then remove)")
    for sub in ("run", "log", "mon.a", "osd.0"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    fsid = str(uuid.uuid4())
    conf = os.path.join(d, "ceph.conf")
    with open(conf, "w") as f:
        f.write(CONF.format(fsid=fsid, port=port, port_lo=port + 1, port_hi=port + 99, d=d,
                            store=store, size=size))
    c = ["-c", conf]
    _run("ceph-authtool", "--create-keyring", os.path.join(d, "keyring"), "--gen-key",
         "-n", "mon.", "--cap", "mon", "allow *")
    _run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v1:127.0.0.1:{port}]",
         os.path.join(d, "monmap"))
    _run("ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", os.path.join(d, "monmap"))
    _run("ceph-mon", *c, "-i", "a")
    osd_uuid = str(uuid.uuid4())
    osd_id = _ceph(d, "osd", "create", osd_uuid).strip()
    _run("ceph-osd", *c, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
    _ceph(d, "osd", "crush", "add", f"osd.{osd_id}", "1.0", "root=default")
    _run("ceph-osd", *c, "-i", osd_id)
    _ceph(d, "osd", "pool", "create", pool, "8", "8", "replicated", "--autoscale-mode=off")
    _wait_writable(d, pool)
    print(f"THINSTORE_TEST_CEPH_CONF={conf}")
    print(f"THINSTORE_TEST_CEPH_POOL={pool}")


def _wait_writable(d: str, pool: str, timeout: float = 60) -> None:
    """Until a client's write to `pool` completes (the OSD up and its PGs active)."""
    deadline = time.monotonic() + timeout
    conf = os.path.join(d, "ceph.conf")
    while True:
        res = subprocess.run(["rados", "-c", conf, "-p", pool, "put", "ceph_cluster.probe",
                              "/dev/null"], capture_output=True, text=True, timeout=60)
        if res.returncode == 0:
            subprocess.run(["rados", "-c", conf, "-p", pool, "rm", "ceph_cluster.probe"],
                           capture_output=True, timeout=60)
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"ceph_cluster: pool {pool} not writable after {timeout:.0f} s: "
                             f"{res.stderr.strip()} (see {d}/log)")
        time.sleep(0.2)


def _stop_daemon(d: str, name: str, timeout: float = 20) -> None:
    pidfile = os.path.join(d, "run", f"{name}.pid")
    try:
        pid = int(open(pidfile).read().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(d: str) -> None:
    d = os.path.abspath(d)
    for name in sorted(n[:-4] for n in os.listdir(os.path.join(d, "run"))
                       if n.startswith("osd.") and n.endswith(".pid")):
        _stop_daemon(d, name)
    _stop_daemon(d, "mon.a")


def restart_osd(d: str, pool: str) -> None:
    """Stop and start the OSD (its data survives only with --store bluestore)."""
    d = os.path.abspath(d)
    _stop_daemon(d, "osd.0")
    _run("ceph-osd", "-c", os.path.join(d, "ceph.conf"), "-i", "0")
    _wait_writable(d, pool)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["start", "stop", "restart-osd"])
    ap.add_argument("dir", help="directory for all of the cluster's state")
    ap.add_argument("--port", type=int, default=6789, help="monitor port (OSD: the 99 above)")
    ap.add_argument("--store", choices=["memstore", "bluestore"], default="memstore")
    ap.add_argument("--pool", default="thinstore", help="RADOS pool to create")
    ap.add_argument("--size", default="4G", help="OSD capacity (memstore RAM / bluestore file)")
    args = ap.parse_args(argv)
    if args.action == "start":
        start(args.dir, args.port, args.store, args.pool, _size(args.size))
    elif args.action == "stop":
        stop(args.dir)
    else:
        restart_osd(args.dir, args.pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
