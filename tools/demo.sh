#!/usr/bin/env bash
# The main job: a pool with a volume and a snapshot, served over NBD until Ctrl-C.
#
#   tools/demo.sh [POOL_DIR]        (default ./demo-pool; THINSTORE_DEMO_SECONDS=N stops after N s)
#
# Connect from another terminal with the URIs it prints, e.g.
#   nbdinfo --list 'nbd+unix:///?socket=demo-pool/nbd.sock'
#   qemu-img info 'nbd+unix:///vol@first?socket=demo-pool/nbd.sock'
set -euo pipefail
POOL=${1:-demo-pool}
TS=(python3 -m thinstore --pool "$POOL")
command -v thinstore >/dev/null && TS=(thinstore --pool "$POOL")

if [ ! -e "$POOL/meta" ]; then
    "${TS[@]}" init --capacity 4G --chunk-size 64K
    # some real content: a text file's worth of bytes at the start, a random run further in
    img=$(mktemp)
    trap 'rm -f "$img"' EXIT
    truncate -s 1G "$img"
    { echo "thinstore demo volume, written $(date -u +%FT%TZ)"; seq 1 100000; } |
        dd of="$img" conv=notrunc status=none
    head -c 8M /dev/urandom | dd of="$img" bs=1M seek=256 conv=notrunc status=none
    "${TS[@]}" import vol "$img"
    "${TS[@]}" snapshot vol@first
    "${TS[@]}" clone vol@first scratch
fi
"${TS[@]}" list
"${TS[@]}" status
echo
if [ -n "${THINSTORE_DEMO_SECONDS:-}" ]; then
    exec timeout --signal=INT --preserve-status "$THINSTORE_DEMO_SECONDS" "${TS[@]}" serve
fi
exec "${TS[@]}" serve
