#!/usr/bin/env bash
# Start lmaas with its demo models, offline (installs what it needs into .venv first).
# Extra args go to `lmaas serve`.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
lmaas_env "worker,demo"
exec lmaas serve "$@"
