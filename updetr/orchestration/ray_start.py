"""`ray start` for a local cluster that stays on loopback: `python -m updetr.orchestration.ray_start ARGS`.

Why: Ray 2.60's `ray start` replaces a loopback `--node-ip-address` (and a loopback `--address`) with the
machine's own address (`ray._private.services.resolve_ip_for_localhost`, meant to make a node reachable
from other machines). The node's agents then listen on that address. A local cluster has no other machine,
so this entry point keeps 127.0.0.1 as given, and is otherwise Ray's own CLI. Such a node's GCS and raylet
then listen on 127.0.0.1 only, so every process joining it must keep the loopback address too.

The node's own processes (dashboard, its job agent, workers, job drivers) are other interpreters that the
in-process patch does not reach: the job agent's `ray.init("127.0.0.1:PORT")` turned into the machine's
address, never connected, and every job submission ended in HTTP 504. They inherit
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, with which Ray's `get_node_ip_address` answers 127.0.0.1 (its
single-machine mode); the variable's other effect, a refusal in the `ray start` CLI to start a worker
node, is lifted in this process only. Processes started elsewhere call `keep_loopback_for` (updetr's
drivers do; a plain `ray.init("127.0.0.1:PORT")` needs the same).
"""
from __future__ import annotations

import os
import sys


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def keep_loopback() -> None:
    """From now on, in this process, Ray keeps a loopback host as given (instead of the machine's address)."""
    from ray._private import services

    services.resolve_ip_for_localhost = lambda host: host


def keep_loopback_for(address: str) -> None:
    """Before `ray.init(address)` in a process that joins a cluster: a cluster on loopback (a local cluster
    started here) listens on 127.0.0.1 only, so its address must not be turned into the machine's."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
    host = address.rpartition(":")[0] if ":" in address else address
    if host in LOOPBACK_HOSTS:
        keep_loopback()


def main() -> None:
    from ray._private import ray_constants
    from ray.scripts.scripts import main as ray_main

    keep_loopback()
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"     # inherited by the node's processes
    ray_constants.ENABLE_RAY_CLUSTER = True                         # this CLI still starts worker nodes
    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()
