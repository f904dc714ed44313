# shellcheck shell=bash
# Sourced by the scripts/image scripts: podman set up for this machine. Needs root (no registry
# is reachable, images are made and kept locally in root's store).

say() { echo "${SCRIPT_NAME:-image}: $*"; }
die() {
    echo "${SCRIPT_NAME:-image}: error: $*" >&2
    exit 1
}

here_build=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Ours unless the caller gave one: runc, cgroupfs (why: containers.conf here).
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here_build/containers.conf}"

# podman, buildah and runc are Debian packages; netavark (with aardvark-dns) is podman's
# network stack, and iptables what it needs to publish ports (-p).
need_podman() {
    command -v podman >/dev/null && command -v runc >/dev/null && command -v iptables >/dev/null &&
        [ -x /usr/lib/podman/netavark ] && return
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        die "podman, runc and iptables are needed: apt-get install podman buildah runc iptables (as root)"
    fi
    say "installing podman, buildah, runc, netavark and iptables"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman buildah runc netavark aardvark-dns iptables uidmap >/dev/null
}

# --ulimit flags within what this machine allows. podman's defaults (nofile 1048576) exceed
# root's hard limits here, and runc cannot raise a container's nproc past kernel.pid_max
# either (seen: ulimit -Hu 96367, pid_max 32768, runc refused anything above 32768).
ulimit_flags() {
    local files procs pid_max
    files=$(ulimit -Hn)
    procs=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)
    [ "$files" = unlimited ] && files=1048576
    if [ "$procs" = unlimited ] || [ "$procs" -gt "$pid_max" ]; then procs=$pid_max; fi
    echo "--ulimit nofile=$files:$files --ulimit nproc=$procs:$procs"
}

# A build's RUN steps trust what this machine trusts: its CA bundle, mounted read-only with a
# pip.conf that points pip at it, for the build only (nothing of it stays in the image).
# Machines that reach PyPI through a TLS-terminating proxy need that; elsewhere it is
# Mozilla's roots again.
trust_flags() {
    local bundle=/etc/ssl/certs/ca-certificates.crt
    [ -f "$bundle" ] || return 0
    echo "--volume $bundle:/run/build-ca.crt:ro --volume $here_build/build-pip.conf:/etc/pip.conf:ro"
}
