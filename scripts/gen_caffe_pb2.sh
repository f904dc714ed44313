#!/usr/bin/env bash
# Regenerate seldon_caffe/caffe/caffe_pb2.py from seldon_caffe/caffe/caffe.proto.
#
# The generated module is committed, so users never need protoc. It has to import on every
# protobuf runtime the two Seldon lanes bring (3.20.3 with seldon-core 1.17.1, 5.x with 1.19),
# which pins the compiler: protoc older than 3.20 emits code that 4.x/5.x runtimes reject,
# and protoc 26 or newer emits a runtime version check that 3.20 fails. Debian bookworm's
# `apt-get install protobuf-compiler` (3.21.12) is the one this file was generated with.
#
# Usage: scripts/gen_caffe_pb2.sh [PROTOC]     (default: protoc on PATH, or $PROTOC)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
protoc="${1:-${PROTOC:-protoc}}"
pkg="seldon_caffe/caffe"

command -v "$protoc" >/dev/null || {
    echo "gen_caffe_pb2: '$protoc' not found; install protoc 3.20-25 (apt-get install protobuf-compiler)" >&2
    exit 1
}
version="$("$protoc" --version | awk '{print $2}')"
major="${version%%.*}"
rest="${version#*.}"
minor="${rest%%.*}"
if ! { { [ "$major" -eq 3 ] && [ "$minor" -ge 20 ]; } || { [ "$major" -ge 4 ] && [ "$major" -le 25 ]; }; }; then
    echo "gen_caffe_pb2: protoc $version makes code that does not run on protobuf 3.20 through 5.x;" \
        "use protoc 3.20 to 25 (e.g. Debian bookworm's 3.21.12)" >&2
    exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# Run from the repository root so the descriptor records the file as seldon_caffe/caffe/caffe.proto
# whatever directory the script was started from: the output is byte-for-byte reproducible.
(cd "$here" && "$protoc" --proto_path=. --python_out="$out" "$pkg/caffe.proto")
# Register the file in a pool of its own, not protobuf's default pool: real pycaffe (or any
# other copy of Caffe's proto) defines the same `caffe.*` symbols, and two files defining one
# symbol in one pool make the second import fail ("duplicate symbol 'caffe.BlobShape'").
gen="$out/$pkg/caffe_pb2.py"
default_pool='_descriptor_pool.Default().AddSerializedFile('
own_pool='_descriptor_pool.DescriptorPool().AddSerializedFile('
[ "$(grep -cF "$default_pool" "$gen")" -eq 1 ] || {
    echo "gen_caffe_pb2: unexpected protoc output (no single default-pool registration)" >&2
    exit 1
}
sed -i "s/_descriptor_pool\.Default()\.AddSerializedFile(/$own_pool/" "$gen"
sed -i "3a # Post-processed by scripts/gen_caffe_pb2.sh: registered in a private descriptor pool." "$gen"
mv "$gen" "$here/$pkg/caffe_pb2.py"
echo "gen_caffe_pb2: wrote $pkg/caffe_pb2.py with protoc $version"
