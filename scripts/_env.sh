# Sourced by the front-door scripts: create or update the project virtualenv, idempotently.
# The virtualenv lives in .venv beside pyproject.toml; a stamp of the dependency files decides
# whether pip has anything to do, so a second run costs well under a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"   # the CPU build; a looser range pulls a multi-GB CUDA build

lmaas_env() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "lmaas: creating virtualenv in $VENV" >&2
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.lmaas-stamp-$extras"
    local want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh" | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        local log="$VENV/pip.log"
        echo "lmaas: installing dependencies ($extras) into $VENV (a few minutes the first time; log: $log)" >&2
        if ! { "$VENV/bin/python" -m pip install --upgrade pip \
                && "$VENV/bin/python" -m pip install "$TORCH_PIN" -e "$ROOT[$extras]"; } >"$log" 2>&1; then
            grep -v "^WARNING: Location" "$log" | tail -n 40 >&2
            echo "lmaas: dependency installation failed (full log: $log)" >&2
            return 1
        fi
        echo "$want" > "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}
