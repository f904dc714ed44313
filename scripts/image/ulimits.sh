#!/usr/bin/env bash
# Print the --ulimit flags podman run needs on this machine (podman.sh's ulimit_flags says
# why): podman run $(scripts/image/ulimits.sh) ...
set -euo pipefail
# shellcheck source=scripts/image/podman.sh
. "$(dirname "$0")/podman.sh"
ulimit_flags
