"""A Ray cluster of several nodes on one machine (a head and worker nodes, 1 CPU each) for trying `updetr
submit` and for rehearsing the loss of a node.

Each cluster lives in its own state folder (`--dir`, default /tmp/updetr-ray-local): node i keeps Ray's
temp/session dir in `<dir>/t` (the head) or `<dir>/w<i>`, and `state.json` records the ports and each node's
process group. Every port is chosen free (GCS, dashboard, client server, agents, metrics, worker range), so
it runs beside other Ray instances on the host. Each node's `ray start` runs in a session of its own, so the
node's daemons (raylet, agents, and on the head the GCS and autoscaler monitor) share one process group that
no other node is in: `stop-node` stops one node alone, `down` all of them. Only this cluster's processes are
signalled (never `ray stop`, which kills every Ray of the user).
Every component listens on 127.0.0.1 (`--node-ip-address`, kept by updetr.orchestration.ray_start, and
`--dashboard-host`; docs/cluster-operations.md).
Token authentication (on by default since Ray 2.59) is handled with `RAY_AUTH_MODE=token`: the head
writes/uses `~/.ray/auth_token`, and the worker nodes and clients on this host read it from there.

The folder path must stay short: Ray puts unix sockets under it (limit ~107 characters).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from updetr.orchestration.processes import kill_processes, own_processes, process_group  # noqa: F401 (re-exported)
from updetr.orchestration.ray_access import free_port, token_available  # noqa: F401 (free_port re-exported)

DEFAULT_DIR = "/tmp/updetr-ray-local"


@dataclass
class LocalCluster:
    dir: str
    gcs_port: int
    dashboard_port: int
    node_ports: list[dict] = field(default_factory=list)   # per node, in start order (head first)
    # per node: {"index", "temp", "pgid", "cpus"}; index 0 is the head; a stopped node stays listed
    nodes: list[dict] = field(default_factory=list)

    def node_dir(self, index: int) -> str:
        # Its own temp dir per node: two runtime-env agents sharing one would delete and re-extract each
        # other's job working dirs (a job driver then finds its CWD gone).
        return str(Path(self.dir) / ("t" if index == 0 else f"w{index}"))

    @property
    def temp_dir(self) -> str:
        return self.node_dir(0)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


def _port_range(avoid: set[int], size: int = 64) -> tuple[int, int]:
    """A block of `size` free ports away from Ray's default worker range (10002-19999)."""
    for _ in range(200):
        lo = random.randrange(30000, 60000 - size)
        if any(p in avoid for p in range(lo, lo + size)):
            continue
        ok = True
        for p in range(lo, lo + size, 8):  # sample: cheap and good enough for a dev cluster
            with socket.socket() as s:
                try:
                    s.bind(("", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return lo, lo + size - 1
    raise RuntimeError("no free port range for Ray workers")


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


def _env(address: Optional[str] = None) -> dict[str, str]:
    # Job entrypoints run `python ...` from PATH: put this interpreter's folder (e.g. an unactivated
    # venv's bin/) first, so jobs on the local cluster see the same packages as the updetr that started it.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    if address:
        # The cluster's processes inherit it: what looks the cluster up from inside (Train's
        # PlacementGroupCleaner uses the State API with address auto-detection) finds this one even when
        # other Ray instances run on the host ("Found multiple active Ray instances" otherwise).
        env["RAY_ADDRESS"] = address
    return env


def _node_ports(avoid: set[int]) -> dict:
    ports = {}
    for key in ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port"):
        ports[key] = free_port(avoid)
        avoid.add(ports[key])
    lo, hi = _port_range(avoid)
    avoid.update(range(lo, hi + 1))
    ports["min-worker-port"], ports["max-worker-port"] = lo, hi
    return ports


def _state_file(dir: str | Path) -> Path:
    return Path(dir) / "state.json"


def load(dir: str | Path = DEFAULT_DIR) -> Optional[LocalCluster]:
    path = _state_file(dir)
    if not path.exists():
        return None
    return LocalCluster(**json.loads(path.read_text()))


def _save(cluster: LocalCluster) -> None:
    path = _state_file(cluster.dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(cluster), indent=1))
    tmp.replace(path)


def _start(args: list[str], log: Path, timeout_s: float, address: str, attempts: int = 5) -> int:
    """`ray start ARGS` in a new session; returns its process group id (the node's daemons inherit it).

    On a busy machine the node's dashboard agent can take longer to start than the raylet waits for it
    (~15 s in Ray 2.60, not configurable), and `ray start` fails with "timed out during startup"; what
    that attempt left is stopped and the start tried again (the agent's imports are then cached)."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_once(args, log, timeout_s, address)
        except _NodeStartTimeout as e:
            if attempt == attempts:
                raise RuntimeError(str(e)) from None
            kill_processes([p for p in process_group(e.pgid)], grace_s=2.0)
            print(f"ray start timed out (busy machine?); trying again ({attempt + 1}/{attempts})",
                  file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


class _NodeStartTimeout(RuntimeError):
    def __init__(self, message: str, pgid: int) -> None:
        super().__init__(message)
        self.pgid = pgid


def _start_once(args: list[str], log: Path, timeout_s: float, address: str) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "updetr.orchestration.ray_start", "start", *args],
                                env=_env(address), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"ray start did not finish in {timeout_s:.0f} s; see {log}") from None
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        message = f"ray start failed (exit {rc}); see {log}: " + " | ".join(tail)
        if "timed out during startup" in " ".join(tail):
            raise _NodeStartTimeout(message, proc.pid)
        raise RuntimeError(message)
    return proc.pid


def ensure_token() -> None:
    """Create ~/.ray/auth_token (what a first `ray start` does anyway) when no token is configured."""
    if not token_available():
        subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=False)


def _flags(ports: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in ports.items()]


def up(dir: str | Path = DEFAULT_DIR, port: Optional[int] = None, dashboard_port: Optional[int] = None,
       head_cpus: float = 1, worker_cpus: float = 1, timeout_s: float = 180, nodes: int = 2) -> LocalCluster:
    """Start a head and `nodes - 1` worker nodes; returns the cluster (also saved to `<dir>/state.json`)."""
    dir = Path(dir).absolute()
    existing = load(dir)
    if existing is not None and own_processes(existing.dir + "/"):
        raise RuntimeError(f"a local cluster is already running from {dir} (address {existing.address}); "
                           f"run `down` first")
    if len(str(dir)) > 40:
        raise RuntimeError(f"--dir {dir} is too long for Ray's unix sockets; use a short path under /tmp")
    if nodes < 1:
        raise RuntimeError(f"--nodes {nodes}: a cluster needs at least its head node")
    dir.mkdir(parents=True, exist_ok=True)
    ensure_token()
    avoid: set[int] = set()
    gcs = port or free_port(avoid)
    avoid.add(gcs)
    dash = dashboard_port or free_port(avoid)
    avoid.add(dash)
    cluster = LocalCluster(str(dir), gcs, dash)
    try:
        cluster.node_ports.append(_node_ports(avoid))
        pgid = _start(["--head", f"--port={gcs}", f"--num-cpus={head_cpus}", "--num-gpus=0",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                       f"--temp-dir={cluster.temp_dir}", *LOOPBACK, *_flags(cluster.node_ports[0])],
                      dir / "ray-start.log", timeout_s, cluster.address)
        cluster.nodes.append({"index": 0, "temp": cluster.temp_dir, "pgid": pgid, "cpus": head_cpus})
        _save(cluster)
        for _ in range(nodes - 1):
            add_node(dir, worker_cpus, timeout_s, avoid)
        cluster = load(dir)
        _wait_dashboard(cluster, timeout_s)
    except BaseException:
        kill_processes(own_processes(cluster.dir + "/"))
        raise
    return cluster


# With the node IP on loopback (kept as given by updetr.orchestration.ray_start), every component of the
# node binds 127.0.0.1: GCS, raylet, agents, metrics export, client server; `--dashboard-host` places the
# dashboard (docs/cluster-operations.md).
LOOPBACK = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]


def add_node(dir: str | Path = DEFAULT_DIR, cpus: float = 1, timeout_s: float = 180,
             avoid: Optional[set[int]] = None) -> dict:
    """Start one more worker node in the running cluster of `dir`; returns its entry in `state.json`."""
    cluster = load(dir)
    if cluster is None or not cluster.nodes:
        raise RuntimeError(f"no local Ray cluster in {dir}; start one with `local-cluster up`")
    avoid = set(avoid or ()) | {cluster.gcs_port, cluster.dashboard_port}
    for ports in cluster.node_ports:
        avoid.update(v for k, v in ports.items() if not k.endswith("worker-port"))
        avoid.update(range(ports["min-worker-port"], ports["max-worker-port"] + 1))
    index = max(n["index"] for n in cluster.nodes) + 1
    ports = _node_ports(avoid)
    temp = cluster.node_dir(index)
    pgid = _start([f"--address={cluster.address}", f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={temp}",
                   *LOOPBACK, *_flags(ports)], Path(cluster.dir) / "ray-start.log", timeout_s, cluster.address)
    node = {"index": index, "temp": temp, "pgid": pgid, "cpus": cpus}
    cluster.node_ports.append(ports)
    cluster.nodes.append(node)
    _save(cluster)
    return node


def node_processes(cluster: LocalCluster, index: int) -> list:
    """The processes of node `index`: its process group (the daemons its `ray start` left), whatever names
    its temp dir, and their descendants (workers, job drivers)."""
    import psutil

    node = next((n for n in cluster.nodes if n["index"] == index), None)
    if node is None:
        raise RuntimeError(f"the cluster in {cluster.dir} has no node {index} (nodes: "
                           f"{', '.join(str(n['index']) for n in cluster.nodes)})")
    procs = {p.pid: p for p in own_processes(node["temp"] + "/")}
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and os.getpgid(proc.pid) == node["pgid"]:
                procs.setdefault(proc.pid, proc)
                for child in proc.children(recursive=True):
                    procs.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return list(procs.values())


def stop_node(dir: str | Path, index: int, hard: bool = False, grace_s: float = 5.0) -> int:
    """Stop node `index` alone: SIGTERM, SIGKILL after `grace_s` (`hard`: SIGKILL at once, as a machine
    that dies). Returns how many processes were signalled."""
    cluster = load(dir)
    if cluster is None:
        raise RuntimeError(f"no local Ray cluster in {dir}")
    procs = node_processes(cluster, index)
    return kill_processes(procs, grace_s=grace_s, hard=hard)


def _wait_dashboard(cluster: LocalCluster, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(cluster.dashboard_url + "/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # answering (401 without a token is fine: it is up)
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"Ray dashboard at {cluster.dashboard_url} did not come up in {timeout_s:.0f} s")


def cluster_processes(dir: str | Path = DEFAULT_DIR) -> list:
    """This cluster's processes: those naming its folder (and their descendants), plus those naming its
    GCS address or client-server port — `ray.util.client.server` names neither folder nor parent once
    `ray start` has exited, and was left running by `down` before."""
    import psutil

    folder = str(Path(dir).absolute()) + "/"
    procs = {p.pid: p for p in own_processes(folder)}
    cluster = load(dir)
    if cluster is not None:
        import re

        # the GCS address as any host:port (Ray may report the node IP instead of 127.0.0.1)
        gcs = re.compile(rf"(?:address|gcs-address)=\S+:{cluster.gcs_port}\b")
        markers = [f"--port={n['ray-client-server-port']}" for n in cluster.node_ports if "ray-client-server-port" in n]
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if proc.pid != os.getpid() and "ray" in cmd and (gcs.search(cmd) or any(m in cmd for m in markers)):
                    procs.setdefault(proc.pid, proc)
                    for child in proc.children(recursive=True):
                        procs.setdefault(child.pid, child)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for node in cluster.nodes:
            for proc in node_processes(cluster, node["index"]):
                procs.setdefault(proc.pid, proc)
    return list(procs.values())


def down(dir: str | Path = DEFAULT_DIR) -> int:
    """Stop this cluster's processes only (`cluster_processes`); returns how many were signalled."""
    return kill_processes(cluster_processes(dir))


def describe(cluster: LocalCluster) -> str:
    workers = len(cluster.nodes) - 1
    return (f"local Ray cluster: head + {workers} worker node(s) on 127.0.0.1 (state in {cluster.dir})\n"
            f"  address:   {cluster.address}      e.g. {_cli()} run EXP.yaml --address {cluster.address}\n"
            f"  dashboard: {cluster.dashboard_url}   e.g. {_cli()} submit EXP.yaml --address "
            f"{cluster.dashboard_url}\n"
            f"  token auth is on: clients on this host read ~/.ray/auth_token (RAY_AUTH_MODE=token)\n"
            f"  lose a node: {_cli()} local-cluster stop-node --node 1 [--hard] --dir {cluster.dir}; "
            f"add one: {_cli()} local-cluster add-node --dir {cluster.dir}\n"
            f"  stop it:   {_cli()} local-cluster down --dir {cluster.dir}")


def _cli() -> str:
    from updetr.command_line import cli_command

    return cli_command()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="updetr local-cluster", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status", "stop-node", "add-node"],
                        help="up | down | status of the cluster; stop-node / add-node: lose or add one node")
    parser.add_argument("--dir", default=os.environ.get("UPDETR_LOCAL_CLUSTER_DIR", DEFAULT_DIR),
                        help="state folder (short path; Ray's temp dir lives in it)")
    parser.add_argument("--port", type=int, default=None, help="GCS port (default: a free one)")
    parser.add_argument("--dashboard-port", type=int, default=None, help="dashboard / Jobs API port")
    parser.add_argument("--nodes", type=int, default=2, help="up: nodes including the head (default 2)")
    parser.add_argument("--node", type=int, default=None, help="stop-node: which node (1 = first worker node)")
    parser.add_argument("--hard", action="store_true",
                        help="stop-node: SIGKILL at once, as a machine that dies (default: SIGTERM, then SIGKILL)")
    parser.add_argument("--cpus", type=float, default=1, help="add-node: the node's CPUs (default 1)")


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.action == "up":
            t0 = time.monotonic()
            cluster = up(args.dir, args.port, args.dashboard_port, nodes=args.nodes)
            print(describe(cluster))
            print(f"  (up in {time.monotonic() - t0:.0f} s)")
        elif args.action == "stop-node":
            if args.node is None:
                raise RuntimeError("stop-node needs --node N (1 = the first worker node, 0 = the head)")
            t0 = time.monotonic()
            n = stop_node(args.dir, args.node, hard=args.hard)
            print(f"local Ray cluster in {args.dir}: node {args.node} {'killed' if args.hard else 'stopped'} "
                  f"({n} process(es), {time.monotonic() - t0:.1f} s)")
        elif args.action == "add-node":
            t0 = time.monotonic()
            node = add_node(args.dir, args.cpus)
            print(f"local Ray cluster in {args.dir}: node {node['index']} added ({args.cpus:g} CPU, "
                  f"{time.monotonic() - t0:.0f} s)")
        elif args.action == "down":
            n = down(args.dir)
            print(f"local Ray cluster in {args.dir}: stopped {n} process(es)")
        else:
            cluster = load(args.dir)
            alive = cluster_processes(args.dir) if cluster else []
            if not alive:
                print(f"no local Ray cluster running from {args.dir}")
                return 1
            print(describe(cluster))
            print(f"  processes: {len(alive)}")
            for node in cluster.nodes:
                n = len(node_processes(cluster, node["index"]))
                role = "head" if node["index"] == 0 else "worker"
                print(f"  node {node['index']} ({role}, {node['cpus']:g} CPU): "
                      + (f"{n} process(es)" if n else "stopped"))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"updetr: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
