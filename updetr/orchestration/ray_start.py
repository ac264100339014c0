"""`ray start` for a local cluster that stays on loopback: `python -m updetr.orchestration.ray_start ARGS`.

Why: Ray 2.60's `ray start` replaces a loopback `--node-ip-address` (and a loopback `--address`) with the
machine's own address (`ray._private.services.resolve_ip_for_localhost`, meant to make a node reachable
from other machines). The node's agents then listen on that address. A local cluster has no other machine,
so this entry point keeps 127.0.0.1 as given, and is otherwise Ray's own CLI. The only other knob,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, also forbids worker nodes.
"""
from __future__ import annotations

import sys


def main() -> None:
    from ray._private import services
    from ray.scripts.scripts import main as ray_main

    services.resolve_ip_for_localhost = lambda host: host
    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()
