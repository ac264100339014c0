"""The lean local MLflow tracking server behind `updetr mlflow-server` (and the tests' server fixture)."""
from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from updetr.tracking import default_tracking_uri, resolve_tracking_uri


def server_command(host: str = "127.0.0.1", port: int = 5000, backend_store_uri: Optional[str] = None,
                   artifacts_destination: Optional[str] = None, workers: int = 1,
                   cwd: str | Path | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a lean local `mlflow server` (SQLite backend, served artifact root).

    Lean = `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false` and `--workers 1`: 2 processes / ~0.5 GB instead of
    13 / ~2.6 GB. The default backend is the embedded store (`./mlflow.db`), so the UI shows local runs.
    """
    base = Path(cwd or os.getcwd())
    backend = resolve_tracking_uri(backend_store_uri or default_tracking_uri(base), base)
    artifacts = Path(artifacts_destination or base / "mlartifacts")
    artifacts = artifacts if artifacts.is_absolute() else (base / artifacts).resolve()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
            "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
            "--host", host, "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return argv, env


def wait_for_server(uri: str, timeout_s: float = 60.0, proc: Any = None) -> bool:
    """Poll `<uri>/health` until it answers 200 (False on timeout or when `proc` exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False
