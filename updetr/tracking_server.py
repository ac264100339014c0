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
from updetr.tracking_client import read_credentials


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


# ------------------------------------------------------------------------------------------- auth
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ADMIN = "admin"


def auth_wanted(host: str, flag: Optional[bool]) -> bool:
    """`--auth` / `--no-auth` when given; else on for every address but loopback (a server reachable from
    a network must not serve runs to whoever connects)."""
    return (host not in LOOPBACK) if flag is None else flag


def auth_folder(backend_uri: str) -> Path:
    """Where a store's auth files live: `mlflow-auth/` next to a SQLite store, else under the cwd."""
    if backend_uri.startswith("sqlite:///"):
        return Path(backend_uri[len("sqlite:///"):]).parent / "mlflow-auth"
    return Path.cwd() / "mlflow-auth"


def _write_secret(path: Path, text: str) -> None:
    """Create `path` readable by its owner only (0600 from the first byte: no window with wider rights)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def auth_setup(backend_uri: str) -> tuple[dict[str, str], Path, Optional[str]]:
    """Environment for `mlflow server --app-name basic-auth`, the credentials file, and the admin password
    when it was generated now (first start; None afterwards).

    MLflow creates the admin user from MLFLOW_AUTH_ADMIN_PASSWORD when its user store is empty, so the
    admin never exists with a default password: the password is random, made here once, and kept in a
    0600 file in MLflow's credentials format (copy it to ~/.mlflow/credentials, or point
    $UPDETR_TRACKING_CREDENTIALS at it). The CSRF key of the auth app is kept the same way."""
    import secrets

    folder = auth_folder(backend_uri)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    creds, key, ini = folder / "credentials", folder / "flask-secret-key", folder / "basic_auth.ini"
    generated = None
    if not creds.exists():
        generated = secrets.token_urlsafe(24)
        _write_secret(creds, f"[mlflow]\nmlflow_tracking_username = {ADMIN}\n"
                             f"mlflow_tracking_password = {generated}\n")
    if not key.exists():
        _write_secret(key, secrets.token_hex(32))
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{(folder / 'basic_auth.db').resolve()}\n"
                   f"admin_username = {ADMIN}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    _, password = read_credentials(creds)
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": key.read_text().strip()}
    return env, creds, generated
