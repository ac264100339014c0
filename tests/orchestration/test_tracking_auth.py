"""No open tracking server: `updetr mlflow-server --auth` (the default off loopback) asks for a login, with a
random admin password made at first start and kept in a 0600 file; runs log with that file."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from updetr.orchestration.local_cluster import free_port
from updetr.tracking_client import read_credentials
from updetr.tracking_server import auth_wanted, wait_for_server

from .conftest import SMOKE, cli_env, stop_session, updetr


def start(root, port):
    proc = subprocess.Popen([sys.executable, "-m", "updetr", "mlflow-server", "--auth", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            cwd=root, env=cli_env(), start_new_session=True,
                            stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT)
    assert wait_for_server(f"http://127.0.0.1:{port}", timeout_s=240, proc=proc), (root / "server.log").read_text()
    return proc


def status(url, user=None, password=None) -> int:
    request = urllib.request.Request(url)
    if user:
        request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - loopback
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_auth_is_the_default_off_loopback_only():
    assert auth_wanted("0.0.0.0", None) and auth_wanted("10.1.2.3", None)
    assert not auth_wanted("127.0.0.1", None) and auth_wanted("127.0.0.1", True)
    assert not auth_wanted("0.0.0.0", False)


@pytest.mark.timeout(900)
def test_server_with_auth_refuses_anonymous_and_an_authenticated_run_logs(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, port)
    try:
        creds = tmp_path / "mlflow-auth" / "credentials"
        assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600
        user, password = read_credentials(creds)
        log = (tmp_path / "server.log").read_text()
        assert log.count(password) == 1 and f"kept in {creds}" in log    # printed once, with the path
        assert password != "password1234" and len(password) >= 24        # never a published default
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status(search) == 401
        assert status(search, user, "password1234") == 401
        assert status(search, user, password) == 200

        args = ["debug", SMOKE, "schedule.max_steps=2", "schedule.log_every=1", f"tracking.uri={uri}",
                f"runtime.output_dir={tmp_path}/runs"]
        r = updetr(*args, cwd=tmp_path, env=cli_env(UPDETR_TRACKING_CREDENTIALS=str(creds)), timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        r2 = updetr(*args, "name=anonymous", cwd=tmp_path, env=cli_env(HOME=str(tmp_path)), timeout=600)
        assert r2.returncode == 2 and "Traceback" not in r2.stderr and r2.stderr.strip().count("\n") == 0, r2.stderr

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]

        # a restart keeps the password and does not print it again
        stop_session(proc, signal.SIGTERM)
        proc = start(tmp_path, port)
        assert (tmp_path / "server.log").read_text().count(password) == 1
        assert status(search, user, password) == 200 and status(search) == 401
    finally:
        stop_session(proc, signal.SIGTERM)
