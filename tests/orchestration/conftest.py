"""Fixtures for the Ray / MLflow layer: a real `mlflow server` on loopback, short Ray temp dirs, CLI runs.

Every Ray instance a test starts gets its own short `RAY_TMPDIR`; the `ray_tmp` fixture kills what is left
of it by matching that dir on the process command lines (and descendants) — never `ray stop`, which
would also kill other people's Ray on this host.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from updetr.orchestration.local_cluster import free_port, kill_processes, own_processes
from updetr.tracking_server import wait_for_server

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "experiments" / "smoke.yaml")


def short_tmpdir(prefix: str) -> str:
    """A short folder under /tmp (Ray's unix socket paths must stay < 108 characters)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def cli_env(ray_tmpdir: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"})
    if ray_tmpdir:
        env["RAY_TMPDIR"] = ray_tmpdir
    env.update(extra)
    return env


def updetr(*args: str, cwd, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m updetr ARGS` to completion (stdout and stderr captured)."""
    return subprocess.run([sys.executable, "-m", "updetr", *args], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def updetr_bg(*args: str, cwd, env, log: Path) -> subprocess.Popen:
    """Start `python -m updetr ARGS` in its own session, output to `log`."""
    return subprocess.Popen([sys.executable, "-m", "updetr", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def stop_session(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class MlflowServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        """`updetr mlflow-server` (the lean flags) on a free loopback port, backed by sqlite in `root`."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "updetr", "mlflow-server", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, env=cli_env(), start_new_session=True,
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT)
        if not wait_for_server(self.uri, timeout_s=240, proc=self.proc):  # a busy host starts it slowly
            self.stop()
            raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server's process group (SIGKILL: a crash, as an outage drill needs)."""
        if self.proc is not None:
            stop_session(self.proc, sig)
            self.proc = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, experiment: str):
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server for the whole session (queried through MlflowClient)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


def reap(ray_tmpdir: str) -> None:
    """Kill what is left of the Ray instance(s) under `ray_tmpdir`, then delete the folder (session logs)."""
    kill_processes(own_processes(ray_tmpdir))
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.fixture
def ray_tmp():
    """A short RAY_TMPDIR for one test; whatever Ray processes live under it are killed afterwards."""
    path = short_tmpdir("urt")
    yield path
    reap(path)
