"""`updetr local-cluster` on a real multi-node Ray on this machine: every listening socket on loopback
(but the Ray 2.60 components that take no bind address, named below), one node stopped alone in <= 10 s,
a node added, `down` leaves nothing."""
from __future__ import annotations

import re
import shutil
import time

import psutil
import pytest

from updetr.orchestration.local_cluster import cluster_processes, load, node_processes

from .conftest import short_tmpdir, updetr

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Without a loopback node IP Ray 2.60 binds these to every interface (`::`); with it they were on 127.0.0.1
# too, and are allowed here only as a margin (docs/cluster-operations.md, "Loopback"). Anything else off
# loopback fails the test.
NO_BIND_ADDRESS = ("gcs_server", "raylet")


def listening(procs) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of `procs`."""
    out = []
    for proc in procs:
        try:
            name = proc.name()
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.mark.timeout(600)
def test_local_cluster_on_loopback_one_node_stopped_alone_and_added(tmp_path):
    state = short_tmpdir("ulc")
    r = updetr("local-cluster", "up", "--nodes", "2", "--dir", state, cwd=tmp_path, timeout=400)
    cluster = load(state)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "head + 1 worker node(s)" in r.stdout and "stop-node --node 1" in r.stdout
        time.sleep(3)  # agents bind after `ray start` returns
        socks = listening(cluster_processes(state))
        assert len(socks) >= 8, socks
        off = [s for s in socks if not loopback(s[1])]
        assert all(name in NO_BIND_ADDRESS for name, _, _ in off), off
        # what updetr places (the dashboard, agents, client server, metrics) is on 127.0.0.1 only
        assert any(name not in NO_BIND_ADDRESS and loopback(ip) for name, ip, _ in socks), socks
        assert any(port == cluster.dashboard_port and ip == "127.0.0.1" for _, ip, port in socks), socks

        head = {p.pid for p in node_processes(cluster, 0)}
        worker = {p.pid for p in node_processes(cluster, 1)}
        assert head and worker and not head & worker   # separate process groups
        r = updetr("local-cluster", "stop-node", "--node", "1", "--dir", state, cwd=tmp_path, timeout=120)
        assert r.returncode == 0 and "node 1 stopped" in r.stdout, r.stdout + r.stderr
        took = float(re.search(r"process\(es\), ([\d.]+) s\)", r.stdout).group(1))
        assert took <= 10, r.stdout     # the clean stop itself (SIGTERM, SIGKILL after 5 s)
        assert not [p for p in worker if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert all(psutil.pid_exists(p) for p in head)   # the head goes on
        r = updetr("local-cluster", "status", "--dir", state, cwd=tmp_path)
        assert "node 1 (worker, 1 CPU): stopped" in r.stdout and "node 0 (head, 1 CPU):" in r.stdout, r.stdout

        r = updetr("local-cluster", "add-node", "--dir", state, cwd=tmp_path, timeout=300)
        assert r.returncode == 0 and "node 2 added" in r.stdout, r.stdout + r.stderr
        assert node_processes(load(state), 2)
    finally:
        r = updetr("local-cluster", "down", "--dir", state, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        assert not cluster_processes(state)
        shutil.rmtree(state, ignore_errors=True)
