#!/usr/bin/env bash
# A two-node Ray cluster on this machine (head + 1 worker node, 1 CPU each) for trying `updetr submit`.
#   cluster/local.sh up   [--dir /tmp/updetr-ray-local] [--port P] [--dashboard-port D]
#   cluster/local.sh status|down [--dir ...]
# `down` stops only this cluster's processes (never `ray stop`, which kills every Ray on the host).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3
cd "$here"
exec "$py" -m updetr.orchestration.local_cluster "$@"
