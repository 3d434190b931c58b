#!/usr/bin/env bash
# Build the NBD project's reference test client, nbd-tester-client, into a cache directory.
#
#   tools/build_nbd_tester.sh DIR       prints DIR/bin/nbd-tester-client on success
#
# The client is not part of thinstore and none of its code is kept here: this is only the
# recipe. It downloads one pinned release of NetworkBlockDevice/nbd (3.26.1, the tarball
# Debian ships as nbd_3.26.1.orig.tar.xz), refuses it unless its sha256 matches, builds the
# one test program (tests/run/nbd-tester-client) and copies it to DIR/bin beside the
# release's two integrity traces (integrity-test.tr, integrityhuge-test.tr), which the
# tests and benchmarks/nbd_tester.py read from the binary's directory. A second run with the
# same DIR reuses the build. Needs gcc, make, pkg-config, bison, xz and libglib2.0-dev;
# with libgnutls28-dev the client has TLS (-C/-K/-A), which the TLS tests need.
#
# On failure: exit 1, with one line on stderr saying why (CI exports it as the reason
# tests/test_nbd_tester.py skips).
set -euo pipefail

VERSION=3.26.1
SHA256=f0cf509fa5b20b1a07f7904eb637e9b47d3e30b6ed6f00075af5d8b701c78fef
URLS=(
    "http://deb.debian.org/debian/pool/main/n/nbd/nbd_${VERSION}.orig.tar.xz"
    "https://github.com/NetworkBlockDevice/nbd/releases/download/nbd-${VERSION}/nbd-${VERSION}.tar.xz"
    "https://downloads.sourceforge.net/project/nbd/nbd/${VERSION}/nbd-${VERSION}.tar.xz"
)

die() { echo "build_nbd_tester: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
BIN="$DIR/bin"
STAMP="$BIN/.built-$VERSION-$SHA256"
if [ -x "$BIN/nbd-tester-client" ] && [ -e "$STAMP" ]; then
    echo "$BIN/nbd-tester-client"
    exit 0
fi
for tool in gcc make pkg-config bison python3 sha256sum tar xz; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
pkg-config --exists glib-2.0 || die "glib-2.0 development files are missing (libglib2.0-dev)"

TARBALL="$DIR/nbd-$VERSION.tar.xz"
if [ ! -e "$TARBALL" ] || ! echo "$SHA256  $TARBALL" | sha256sum -c --status; then
    rm -f "$TARBALL" "$DIR/download.log"
    for url in "${URLS[@]}"; do
        # python3's urllib: present wherever thinstore runs, unlike curl or wget
        if python3 - "$url" "$TARBALL.part" <<'EOF' 2>>"$DIR/download.log"
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)
EOF
        then
            if echo "$SHA256  $TARBALL.part" | sha256sum -c --status; then
                mv "$TARBALL.part" "$TARBALL"
                break
            fi
            echo "sha256 mismatch from $url" >>"$DIR/download.log"
        fi
        rm -f "$TARBALL.part"
    done
    [ -e "$TARBALL" ] || die "could not download nbd-$VERSION with sha256 $SHA256" \
        "($(tail -n 1 "$DIR/download.log" 2>/dev/null))"
fi

SRC="$DIR/src"
rm -rf "$SRC"
mkdir -p "$SRC"
tar -xJf "$TARBALL" -C "$SRC" --strip-components=1
cd "$SRC"
# DB2M=true: this release's configure stops with "don't know what to do here" when
# docbook2man is absent, even with --disable-manpages; the man pages are never built here
# (only tests/run is made), so any non-empty DB2M gets past the check.
DB2M=true ./configure -q --without-libnl >"$DIR/build.log" 2>&1 ||
    die "configure failed (see $DIR/build.log)"
make -C tests/run nbd-tester-client >>"$DIR/build.log" 2>&1 ||
    die "make failed (see $DIR/build.log)"
mkdir -p "$BIN"
cp tests/run/nbd-tester-client tests/run/integrity-test.tr tests/run/integrityhuge-test.tr "$BIN/"
touch "$STAMP"
echo "$BIN/nbd-tester-client"
