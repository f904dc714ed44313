# shellcheck shell=bash
# Sourced by the scripts that debootstrap a root (caffe-env.sh, image/python-base.sh).
# They define die().

# Unmount whatever an interrupted debootstrap left mounted (proc, sys...) under $1, deepest
# first, so that removing the directory can never reach into the host's /proc or /sys.
unmount_under() {
    local dir
    dir="$(realpath -m "$1")"
    awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r mnt; do umount -l "$mnt" || die "cannot unmount $mnt; remove $1 by hand"; done
}
