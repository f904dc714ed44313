#!/usr/bin/env bash
# Build seldon-caffe's images with podman, as root, on a machine with no registry.
#
#   build.sh builder [cpu|gpu] IMAGE [--build-arg ...]  the s2i builder from s2i/Dockerfile(.gpu)
#   build.sh model MODEL_DIR BUILDER IMAGE              a model image, as `s2i build` makes it
#
# `model` writes what `s2i build MODEL_DIR BUILDER IMAGE --as-dockerfile` writes (the source
# copied to the builder's io.openshift.s2i.destination + /src, owned by the builder's user,
# the model's .s2i/environment as ENV, `assemble` run as that user, `run` as the command, the
# source's own .s2i/bin scripts in place of the builder's where it has them),
# then builds it: the same image s2i would make, with no s2i binary and no Docker daemon.
set -euo pipefail
SCRIPT_NAME=image
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=scripts/image/podman.sh
. "$here/podman.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (podman's root store)"
need_podman

# shellcheck disable=SC2046  # the flags are words on purpose
build() { podman build --pull=never --runtime runc $(ulimit_flags) $(trust_flags) "$@"; }

build_builder() {
    local kind=$1 image=$2
    shift 2
    local dockerfile=$repo/s2i/Dockerfile
    [ "$kind" = gpu ] && dockerfile=$repo/s2i/Dockerfile.gpu
    bash "$here/python-base.sh" "${SELDON_CAFFE_BASE_PYTHON:?the Python 3.12 a stand-in base copies}"
    say "building $image from ${dockerfile#"$repo"/}"
    build -f "$dockerfile" --ignorefile "$dockerfile.dockerignore" -t "$image" "$@" "$repo"
}

# The ENV lines of a model directory's .s2i/environment (VARIABLE=value lines), as s2i adds them.
environment_lines() {
    local file=$1/.s2i/environment line
    [ -f "$file" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in '' | '#'*) continue ;; esac
        printf 'ENV %s=%q\n' "${line%%=*}" "${line#*=}"
    done <"$file"
}

# The builder's script NAME, or the source's own .s2i/bin/NAME when it has one (as s2i does).
script() {
    local source=$1 destination=$2 name=$3
    if [ -f "$source/.s2i/bin/$name" ]; then
        echo "$destination/src/.s2i/bin/$name"
    else
        echo "/s2i/bin/$name"
    fi
}

build_model() {
    local source=$1 builder=$2 image=$3
    [ -d "$source" ] || die "no model directory $source"
    podman image exists "$builder" || die "no builder image $builder: run 'make image' first"
    local user destination context
    user=$(podman image inspect -f '{{.Config.User}}' "$builder")
    destination=$(podman image inspect -f '{{index .Config.Labels "io.openshift.s2i.destination"}}' "$builder")
    context=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: the context is this call's
    trap "rm -rf '$context'" RETURN
    mkdir -p "$context/upload"
    cp -R "$source" "$context/upload/src" # s2i copies the source as it is, .cache/ included
    {
        echo "FROM $builder"
        echo "LABEL io.openshift.s2i.build.image=\"$builder\" io.openshift.s2i.build.source-location=\"$source\""
        environment_lines "$source"
        echo "USER root"
        echo "COPY upload/src $destination/src"
        echo "RUN chown -R $user:0 $destination/src"
        echo "USER $user"
        echo "RUN $(script "$source" "$destination" assemble)"
        echo "CMD $(script "$source" "$destination" run)"
    } >"$context/Dockerfile"
    say "building $image from $source on $builder"
    build -t "$image" "$context"
}

case ${1:-} in
    builder) shift && build_builder "$@" ;;
    model) shift && build_model "$@" ;;
    *) die "usage: build.sh builder cpu|gpu IMAGE [build args] | build.sh model MODEL_DIR BUILDER IMAGE" ;;
esac
