"""A two-node Ray cluster on one machine (head + one worker node, 1 CPU each) for trying `updetr submit`.

Each cluster lives in its own state folder (`--dir`, default /tmp/updetr-ray-local): Ray's temp/session dirs
are `<dir>/t` (head) and `<dir>/w` (worker node), and `state.json` records the ports. Every port is chosen free (GCS,
dashboard, client server, agents, metrics, worker range), so it runs beside other Ray instances on the host.
`down` stops only the processes of *this* cluster: those whose command line names its folder, and all
their descendants (raylet workers, job drivers). It never runs `ray stop`, which kills every Ray of the user.
Token authentication (on by default since Ray 2.59) is handled with `RAY_AUTH_MODE=token`: the head
writes/uses `~/.ray/auth_token`, and the worker node and clients on this host read it from there.

The folder path must stay short: Ray puts unix sockets under it (limit ~107 characters).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from updetr.orchestration.ray_access import free_port, token_available

DEFAULT_DIR = "/tmp/updetr-ray-local"


@dataclass
class LocalCluster:
    dir: str
    gcs_port: int
    dashboard_port: int
    node_ports: list[dict] = field(default_factory=list)

    @property
    def temp_dir(self) -> str:
        return str(Path(self.dir) / "t")

    @property
    def worker_temp_dir(self) -> str:
        # Its own temp dir: two runtime-env agents sharing one would delete and re-extract each other's
        # job working dirs (a job driver then finds its CWD gone).
        return str(Path(self.dir) / "w")

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


def own_processes(folder: str) -> list:
    """Processes whose command line names a path under `folder` (a Ray temp dir), plus their descendants."""
    import psutil

    marker = folder.rstrip("/") + "/"
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(marker in part for part in (proc.info["cmdline"] or [])):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    seen = {p.pid: p for p in roots}
    for proc in roots:
        try:
            for child in proc.children(recursive=True):
                seen.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(seen.values())


def kill_processes(procs: list, grace_s: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `grace_s` whatever is left; returns how many were signalled."""
    import psutil

    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


def _start(args: list[str], log: Path, timeout_s: float, address: str) -> None:
    with open(log, "ab") as out:
        proc = subprocess.run([_ray_bin(), "start", *args], env=_env(address), stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"ray start failed (exit {proc.returncode}); see {log}: " + " | ".join(tail))


def ensure_token() -> None:
    """Create ~/.ray/auth_token (what a first `ray start` does anyway) when no token is configured."""
    if not token_available():
        subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=False)


def _flags(ports: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in ports.items()]


def up(dir: str | Path = DEFAULT_DIR, port: Optional[int] = None, dashboard_port: Optional[int] = None,
       head_cpus: float = 1, worker_cpus: float = 1, timeout_s: float = 120) -> LocalCluster:
    """Start head + one worker node; returns the cluster (also saved to `<dir>/state.json`)."""
    dir = Path(dir).absolute()
    existing = load(dir)
    if existing is not None and own_processes(existing.dir + "/"):
        raise RuntimeError(f"a local cluster is already running from {dir} (address {existing.address}); "
                           f"run `down` first")
    if len(str(dir)) > 40:
        raise RuntimeError(f"--dir {dir} is too long for Ray's unix sockets; use a short path under /tmp")
    dir.mkdir(parents=True, exist_ok=True)
    ensure_token()
    avoid: set[int] = set()
    gcs = port or free_port(avoid)
    avoid.add(gcs)
    dash = dashboard_port or free_port(avoid)
    avoid.add(dash)
    cluster = LocalCluster(str(dir), gcs, dash, [_node_ports(avoid), _node_ports(avoid)])
    _state_file(dir).write_text(json.dumps(asdict(cluster), indent=1))
    log = dir / "ray-start.log"
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        _start(["--head", f"--port={gcs}", f"--num-cpus={head_cpus}", "--num-gpus=0",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                f"--temp-dir={cluster.temp_dir}", *common, *_flags(cluster.node_ports[0])], log, timeout_s,
               cluster.address)
        _start([f"--address={cluster.address}", f"--num-cpus={worker_cpus}", "--num-gpus=0",
                f"--temp-dir={cluster.worker_temp_dir}", *common, *_flags(cluster.node_ports[1])], log, timeout_s,
               cluster.address)
        _wait_dashboard(cluster, timeout_s)
    except BaseException:
        kill_processes(own_processes(cluster.dir + "/"))
        raise
    return cluster


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
    return list(procs.values())


def down(dir: str | Path = DEFAULT_DIR) -> int:
    """Stop this cluster's processes only (`cluster_processes`); returns how many were signalled."""
    return kill_processes(cluster_processes(dir))


def describe(cluster: LocalCluster) -> str:
    return (f"local Ray cluster: head + 1 worker node on 127.0.0.1 (state in {cluster.dir})\n"
            f"  address:   {cluster.address}      e.g. {_cli()} run EXP.yaml --address {cluster.address}\n"
            f"  dashboard: {cluster.dashboard_url}   e.g. {_cli()} submit EXP.yaml --address "
            f"{cluster.dashboard_url}\n"
            f"  token auth is on: clients on this host read ~/.ray/auth_token (RAY_AUTH_MODE=token)\n"
            f"  stop it:   {_cli()} local-cluster down --dir {cluster.dir}")


def _cli() -> str:
    from updetr.command_line import cli_command

    return cli_command()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="updetr local-cluster", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=os.environ.get("UPDETR_LOCAL_CLUSTER_DIR", DEFAULT_DIR),
                        help="state folder (short path; Ray's temp dir lives in it)")
    parser.add_argument("--port", type=int, default=None, help="GCS port (default: a free one)")
    parser.add_argument("--dashboard-port", type=int, default=None, help="dashboard / Jobs API port")


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.action == "up":
            t0 = time.monotonic()
            cluster = up(args.dir, args.port, args.dashboard_port)
            print(describe(cluster))
            print(f"  (up in {time.monotonic() - t0:.0f} s)")
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
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
