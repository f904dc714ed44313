#!/usr/bin/env bash
# Make sure the image s2i/Dockerfile starts FROM, python:3.12-slim-bookworm, exists locally.
#
# Python 3.12 is the one version seldon-core 1.19 (>= 3.12) and MLServer 1.7 (< 3.13) share,
# so the base is 3.12 and stays so. Where the image is absent and cannot be pulled (a
# machine with no registry, like CI's), this builds a stand-in of it and tags it with the same
# name: Debian bookworm (debootstrap, minbase) with the runtime libraries CPython links, and
# the CPython 3.12 given as $1 (`make image` passes the interpreter `make setup` uses) copied
# to /usr/local, as the official image has it, with pip from its ensurepip. The stand-in is
# labelled io.seldon-caffe.stand-in; docs/deploy.md says what differs from the official one.
#
#   SELDON_CAFFE_DEBIAN_MIRROR   Debian mirror (default: debootstrap's own)
set -euo pipefail
SCRIPT_NAME=python-base
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/image/podman.sh
. "$here/podman.sh"
# shellcheck source=scripts/rootfs.sh
. "$here/../rootfs.sh"

IMAGE=docker.io/library/python:3.12-slim-bookworm
PYTHON=${1:?usage: python-base.sh PYTHON3.12}
# What CPython's extension modules link (ldd of lib-dynload), plus what the official image has.
PACKAGES=ca-certificates,netbase,tzdata,libssl3,libffi8,libsqlite3-0,zlib1g,libbz2-1.0,liblzma5,libreadline8,libncursesw6,libuuid1,libgdbm6

[ "$(id -u)" -eq 0 ] || die "needs root (podman's root store, debootstrap)"
need_podman
if podman image exists "$IMAGE"; then
    exit 0
fi
say "$IMAGE is not here; trying to pull it"
if timeout 60 podman pull -q "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi

prefix=$("$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version; print(sys.base_prefix)') ||
    die "$PYTHON is not a Python 3.12"
command -v debootstrap >/dev/null || {
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
}
root=$(mktemp -d /var/tmp/python-base.XXXXXX)
cleanup() {
    unmount_under "$root"
    rm -rf --one-file-system "$root"
}
trap cleanup EXIT

say "no registry: building a stand-in (debootstrap bookworm + the CPython in $prefix), about 2 minutes"
start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" ${SELDON_CAFFE_DEBIAN_MIRROR:+"$SELDON_CAFFE_DEBIAN_MIRROR"} \
    >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2
    die "debootstrap failed (log: $root.log)"
}
rm -f "$root.log"
unmount_under "$root"

# CPython as the official image lays it out: /usr/local, no tests, no caches, no site-packages
# but pip (ensurepip's), its shared library found through ld.so.cache.
tar -C "$prefix" --exclude='lib/python3.12/test' --exclude='lib/python3.12/idlelib/idle_test' \
    --exclude='lib/python3.12/site-packages/*' --exclude='__pycache__' --exclude='*.pyc' \
    --exclude='bin/pip*' --exclude='libpython*.a' --exclude='bin/2to3*' --exclude='bin/idle*' -cf - bin include lib share 2>/dev/null |
    tar -C "$root/usr/local" -xf -
chroot "$root" /sbin/ldconfig
PIP_ROOT_USER_ACTION=ignore chroot "$root" /usr/local/bin/python3.12 -m ensurepip --default-pip >/dev/null
find "$root/usr/local" -depth -name __pycache__ -exec rm -rf {} +
# As Debian's container images have it: apt keeps no package caches or .debs and fetches no
# translations, so an `apt-get install` in a Dockerfile leaves only what it installed.
cat >"$root/etc/apt/apt.conf.d/90slim" <<'APT'
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
Acquire::Languages "none";
APT::AutoRemove::SuggestsImportant "false";
APT
# A slim image: no docs, man pages, locales or apt caches.
rm -rf "$root"/usr/share/{doc,man,info,locale}/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
version=$(chroot "$root" /usr/local/bin/python3 -c 'import platform; print(platform.python_version())')

tar --numeric-owner -C "$root" -cf - . | podman import -q \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change "ENV PYTHON_VERSION=$version" \
    --change "LABEL io.seldon-caffe.stand-in=debootstrap bookworm + CPython $version from $prefix" \
    --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
say "made $IMAGE (a stand-in: CPython $version on bookworm) in $(($(date +%s) - start)) s"
