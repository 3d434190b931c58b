#!/usr/bin/env bash
# containerd for the snapshotter's integration tests (tests/test_containerd.py).
#
#   containerd.sh start DIR   a containerd with its own root, state and sockets under DIR,
#                             with the proxy snapshotter "thinstore" at DIR/snapshotter.sock
#                             (the tests start thinstore's snapshotter there); prints
#                             THINSTORE_TEST_CONTAINERD_ADDRESS and
#                             THINSTORE_TEST_SNAPSHOTTER_SOCKET
#   containerd.sh stop DIR    stops it (and the containers it still runs)
#
# containerd dials a proxy plugin lazily, so the snapshotter may start after containerd.
set -euo pipefail
cmd=${1:?usage: containerd.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: containerd.sh start|stop DIR}")

start() {
    command -v containerd >/dev/null || { echo "containerd.sh: containerd is not installed" >&2; exit 1; }
    mkdir -p "$dir/root" "$dir/state"
    cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  address = "$dir/debug.sock"

[proxy_plugins.thinstore]
  type = "snapshot"
  address = "$dir/snapshotter.sock"
TOML
    containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
    echo $! > "$dir/containerd.pid"
    for _ in $(seq 600); do               # bounded: 60 s (a loaded fresh machine is slow)
        if ctr --address "$dir/containerd.sock" version >/dev/null 2>&1; then
            echo "THINSTORE_TEST_CONTAINERD_ADDRESS=$dir/containerd.sock"
            echo "THINSTORE_TEST_SNAPSHOTTER_SOCKET=$dir/snapshotter.sock"
            return 0
        fi
        if ! kill -0 "$(cat "$dir/containerd.pid")" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "containerd.sh: containerd did not start; its log:" >&2
    cat "$dir/containerd.log" >&2
    exit 1
}

stop() {
    [ -f "$dir/containerd.pid" ] || return 0
    local pid
    pid=$(cat "$dir/containerd.pid")
    if kill -0 "$pid" 2>/dev/null; then
        # tasks first: their shims outlive containerd otherwise
        for ns in $(ctr --address "$dir/containerd.sock" namespaces ls -q 2>/dev/null); do
            for t in $(ctr --address "$dir/containerd.sock" -n "$ns" tasks ls -q 2>/dev/null); do
                ctr --address "$dir/containerd.sock" -n "$ns" tasks kill -s KILL "$t" >/dev/null 2>&1 || true
                ctr --address "$dir/containerd.sock" -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 || true
            done
        done
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/containerd.pid"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: containerd.sh start|stop DIR" >&2; exit 2 ;;
esac
