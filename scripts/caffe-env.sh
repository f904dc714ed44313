#!/usr/bin/env bash
# Build, once, the real-Caffe reference root: Debian bullseye with python3-caffe (BVLC
# Caffe 1.0, CPU, OpenBLAS) and python3-numpy. Tests and benchmarks use it as the oracle
# (`chroot ROOT python3`), and it can serve as a pycaffe worker's interpreter.
#
#   SELDON_CAFFE_REFERENCE_ROOT   where the root lives (default: $XDG_CACHE_HOME or
#                                 ~/.cache, then seldon-caffe/caffe-root), outside the clone
#   SELDON_CAFFE_DEBIAN_MIRROR    Debian mirror (default: none given, so debootstrap uses
#                                 its own default for the suite)
#
# Idempotent: a finished root is reused. The root is built in ROOT.tmp and renamed when it
# imports caffe, so an interrupted build never looks finished; the next run starts over.
# Needs root (debootstrap and chroot); installs debootstrap with apt-get when missing.
set -euo pipefail

ROOT="${SELDON_CAFFE_REFERENCE_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/seldon-caffe/caffe-root}"
MIRROR="${SELDON_CAFFE_DEBIAN_MIRROR:-}"
SUITE=bullseye
PACKAGES=python3-caffe,python3-numpy
TMP="$ROOT.tmp"

say() { echo "caffe-env: $*"; }
die() { echo "caffe-env: error: $*" >&2; exit 1; }

# shellcheck source=scripts/rootfs.sh
. "$(dirname "$0")/rootfs.sh"

imports_caffe() { chroot "$1" /usr/bin/env -i PATH=/usr/bin:/bin GLOG_minloglevel=2 python3 -c 'import caffe' 2>/dev/null; }


if [ -d "$ROOT" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        # The tests reach real Caffe through chroot: a root this user cannot enter is no oracle.
        die "found $ROOT, but using it needs root (chroot): run 'sudo make test'"
    fi
    imports_caffe "$ROOT" || die "$ROOT exists but 'chroot $ROOT python3 -c \"import caffe\"' fails; remove it and run again"
    say "reusing $ROOT (real Caffe: chroot $ROOT python3)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    die "building the real-Caffe root needs root (debootstrap, chroot): run 'sudo make caffe-env',
or point SELDON_CAFFE_REFERENCE_ROOT at an existing root. Without it the conformance tests skip."
fi

if ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || die "debootstrap is missing and there is no apt-get to install it"
    say "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

if [ -e "$TMP" ]; then
    say "removing the unfinished build $TMP"
    unmount_under "$TMP"
    rm -rf --one-file-system "$TMP"
fi
mkdir -p "$(dirname "$ROOT")"

say "building $ROOT: debootstrap $SUITE with $PACKAGES (about 2 minutes and 1 GB)"
start=$(date +%s)
# The mirror argument only when one was asked for: debootstrap's default otherwise.
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$TMP" ${MIRROR:+"$MIRROR"} >"$TMP.log" 2>&1; then
    tail -n 20 "$TMP.log" >&2
    unmount_under "$TMP"
    die "debootstrap failed (full log: $TMP.log)"
fi
unmount_under "$TMP"
imports_caffe "$TMP" || die "the new root does not import caffe (see $TMP.log)"
rm -rf "$TMP/var/cache/apt/archives/"*.deb
mv "$TMP" "$ROOT"
rm -f "$TMP.log"
say "done in $(($(date +%s) - start)) s: chroot $ROOT python3 imports caffe"
