#!/usr/bin/env bash
# A private Docker daemon for the Docker volume plugin tests.
#
#   dockerd.sh start DIR   start dockerd with everything under DIR (data root, exec root,
#                          socket, pid file, log) and import a busybox image made offline;
#                          print THINSTORE_TEST_DOCKER_HOST=unix://DIR/docker.sock and
#                          THINSTORE_TEST_DOCKER_IMAGE=NAME
#   dockerd.sh stop DIR    stop it and remove what it left under DIR
#   dockerd.sh restart DIR stop it and start it again on the same data root
#
# The daemon touches no host networking (--iptables=false --ip6tables=false
# --bridge=none: containers run with --network none) and uses the vfs storage driver,
# which needs no kernel support. It starts its own containerd under DIR's exec root, so a
# containerd the machine already runs is never used. Needs: docker.io, containerd,
# busybox-static.
set -euo pipefail

IMAGE=thinstore-test/busybox:latest

start() {
    local dir=$1
    mkdir -p "$dir/data" "$dir/exec"
    echo '{}' > "$dir/daemon.json"
    dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
        --data-root "$dir/data" --exec-root "$dir/exec" -H "unix://$dir/docker.sock" \
        --pidfile "$dir/docker.pid" --config-file "$dir/daemon.json" --log-level warn \
        > "$dir/dockerd.log" 2>&1 &
    local i
    for i in $(seq 240); do               # bounded: 120 s (a loaded fresh machine is slow)
        if docker -H "unix://$dir/docker.sock" version >/dev/null 2>&1; then
            break
        fi
        if ! kill -0 $! 2>/dev/null; then
            echo "dockerd exited:" >&2; tail -20 "$dir/dockerd.log" >&2; exit 1
        fi
        sleep 0.5
    done
    docker -H "unix://$dir/docker.sock" version >/dev/null || {
        echo "dockerd did not answer on $dir/docker.sock:" >&2; tail -20 "$dir/dockerd.log" >&2
        exit 1; }
    docker -H "unix://$dir/docker.sock" image inspect "$IMAGE" >/dev/null 2>&1 ||
        make_image "$dir"
    echo "THINSTORE_TEST_DOCKER_HOST=unix://$dir/docker.sock"
    echo "THINSTORE_TEST_DOCKER_IMAGE=$IMAGE"
}

# A busybox root file system (the static busybox and a link per applet), imported.
make_image() {
    local dir=$1 rootfs=$1/rootfs
    local busybox
    busybox=$(command -v busybox)
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/data" "$rootfs/etc"
    cp "$busybox" "$rootfs/bin/busybox"
    chroot "$rootfs" /bin/busybox --install -s /bin
    echo 'root:x:0:0:root:/:/bin/sh' > "$rootfs/etc/passwd"
    tar -C "$rootfs" -cf - . | docker -H "unix://$dir/docker.sock" import \
        --change 'CMD ["/bin/sh"]' - "$IMAGE" >/dev/null
    rm -rf "$rootfs"
}

stop() {
    stop_daemon "$1"
    rm -rf "$1/data" "$1/exec"
}

stop_daemon() {
    local dir=$1 pid i
    if [ -f "$dir/docker.pid" ]; then
        pid=$(cat "$dir/docker.pid")
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 60); do            # bounded: 30 s
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # mounts dockerd left below DIR (container roots, netns files), deepest first
    { grep -F " $dir/" /proc/mounts || true; } | awk '{print $2}' | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
}

case "${1:-}" in
    start) start "$2" ;;
    stop) stop "$2" ;;
    restart) stop_daemon "$2"; start "$2" ;;   # keeps the data root: volumes, images
    *) echo "usage: $0 start|stop|restart DIR" >&2; exit 2 ;;
esac
