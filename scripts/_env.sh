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
        echo "lmaas: installing dependencies ($extras) into $VENV" >&2
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
        if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
            "$VENV/bin/python" -m pip install --quiet "$TORCH_PIN" >&2
        fi
        "$VENV/bin/python" -m pip install --quiet "$TORCH_PIN" -e "$ROOT[$extras]" >&2
        echo "$want" > "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}
