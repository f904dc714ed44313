# shellcheck shell=sh
# Sourced by assemble and run: helpers shared by the s2i scripts.

# load_defaults FILE: export each VARIABLE=value line of FILE whose VARIABLE is not set yet,
# so that what the build, `docker run -e` or the pod sets always wins over the file.
load_defaults() {
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in
            '' | '#'*) continue ;;
        esac
        key=${line%%=*}
        value=${line#*=}
        case $key in
            '' | [0-9]* | *[!A-Za-z0-9_]*)
                echo "error: $1: not a VARIABLE=value line: $line" >&2
                return 1
                ;;
        esac
        if eval "[ -z \"\${$key+set}\" ]"; then
            export "$key=$value"
        fi
    done <"$1"
}

# fail MESSAGE...: one clear line on stderr, then exit 1.
fail() {
    echo "error: $*" >&2
    exit 1
}

# require_count NAME...: each variable must hold a positive integer (ports, workers, threads).
require_count() {
    for name in "$@"; do
        eval "value=\${$name:-}"
        case $value in
            '' | *[!0-9]* | 0) fail "$name=$value: expected a positive integer" ;;
        esac
    done
}
