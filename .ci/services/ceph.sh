#!/usr/bin/env bash
# CI service: a one-monitor, one-OSD Ceph cluster (memstore) for the rados:// tests.
#   ceph.sh start DIR   prints THINSTORE_TEST_CEPH_CONF=DIR/ceph.conf, THINSTORE_TEST_CEPH_POOL=thinstore
#   ceph.sh stop DIR
# The monitor listens on 127.0.0.1:17100 (THINSTORE_CI_CEPH_PORT), its OSD in the 99 ports above (tools/ceph_cluster.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
    start) exec python3 tools/ceph_cluster.py start "$2" --port "${THINSTORE_CI_CEPH_PORT:-17100}" --size 4G --pool thinstore ;;
    stop)  exec python3 tools/ceph_cluster.py stop "$2" ;;
    *)     echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
