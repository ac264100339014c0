#!/usr/bin/env bash
# A Ray cluster on this machine (head + worker nodes, 1 CPU each, on 127.0.0.1) for trying `updetr submit`
# and rehearsing the loss of a node (docs/cluster-operations.md).
#   cluster/local.sh up   [--nodes 2] [--dir /tmp/updetr-ray-local] [--port P] [--dashboard-port D]
#   cluster/local.sh stop-node --node 1 [--hard] | add-node [--cpus 1]
#   cluster/local.sh status|down [--dir ...]
# `down` stops only this cluster's processes (never `ray stop`, which kills every Ray on the host).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3
cd "$here"
exec "$py" -m updetr.orchestration.local_cluster "$@"
