# Sourced by the scripts: finds Python >= 3.12 and keeps the project's venv in .venv up to date.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${HUBCACHE_VENV:-$ROOT/.venv}"

find_python() {
    local candidates=(python3.13 python3.12 python3)
    local root
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    for c in "$root"/versions/3.1[2-9]*/bin/python3; do candidates+=("$c"); done
    for c in "${candidates[@]}"; do
        if command -v "$c" >/dev/null 2>&1 &&
            "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$c"
            return 0
        fi
    done
    echo "hubcache needs Python >= 3.12 (mitmproxy 12 does); none was found on PATH or under pyenv" >&2
    return 1
}

# Runs pip with its output (setuptools' warnings included) in the log file $1, so the first screen
# is hubcache's own; the log's path is printed only when the install fails.
pip_logged() {  # $1: the log file, then pip's arguments
    local log="$1"
    shift
    if ! "$(dirname "$log")/bin/pip" "$@" >>"$log" 2>&1; then
        echo "hubcache: pip install failed; its log: $log" >&2
        return 1
    fi
}

ensure_venv() {  # $1: pip extras, e.g. "[test]"
    local extras="${1:-}" stamp log="$VENV/pip-install.log"
    if [ ! -x "$VENV/bin/python" ]; then
        "$(find_python)" -m venv "$VENV"
    fi
    # Reinstall only when pyproject.toml changed: the stamp holds its hash and the extras.
    stamp="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)$extras"
    if [ "$(cat "$VENV/.hubcache-stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "hubcache: setting up $VENV" >&2
        : >"$log"
        pip_logged "$log" install --upgrade pip
        pip_logged "$log" install -e "$ROOT$extras"
        echo "$stamp" >"$VENV/.hubcache-stamp"
    fi
}

SWIFT_VENV="${HUBCACHE_SWIFT_VENV:-$ROOT/.venv-swift}"
SWIFT_VERSION=2.38.3

ensure_swift_venv() {  # OpenStack Swift for the shared-store tests, apart from the project's venv
    if [ "$(cat "$SWIFT_VENV/.hubcache-stamp" 2>/dev/null)" != "$SWIFT_VERSION" ]; then
        [ -x "$SWIFT_VENV/bin/python" ] || "$(find_python)" -m venv "$SWIFT_VENV"
        : >"$SWIFT_VENV/pip-install.log"
        pip_logged "$SWIFT_VENV/pip-install.log" install --upgrade pip
        pip_logged "$SWIFT_VENV/pip-install.log" install "swift==$SWIFT_VERSION"
        echo "$SWIFT_VERSION" >"$SWIFT_VENV/.hubcache-stamp"
    fi
}
