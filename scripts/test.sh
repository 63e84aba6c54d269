#!/usr/bin/env bash
# Run the test suite (installs what it needs into .venv first). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
lmaas_env "worker,demo,postgres,dev"
cd "$ROOT"
exec python -m pytest -m "not gpu" "$@"
