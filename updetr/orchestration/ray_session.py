"""Joining or starting the Ray a run uses: address checks, token auth, a local Ray pinned to its own GCS port.

Every failure is one line (`LaunchError`): a wrong address fails in seconds, a rejected token names the
variables that set it.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

from updetr.config import ExperimentConfig
from updetr.orchestration.run_plan import LaunchError


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """TCP pre-check of a `host:port` GCS address (so a wrong address fails in seconds, in one line)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"--address {address}: expected HOST:PORT of the cluster's head (GCS, e.g. head:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise LaunchError(f"cannot reach the Ray cluster at {address} ({reason}); is it up, and is this the "
                          f"head's GCS address (HOST:6379)?") from None


def is_local_address(address: Optional[str]) -> bool:
    """True when `updetr run` starts its own Ray (no address, 'local', and no $RAY_ADDRESS)."""
    if address is None and os.environ.get("RAY_ADDRESS"):
        return False
    return address is None or address == "local"


# Set for the local Ray's own processes only (raylet, GCS, workers inherit them at `ray.init`), then taken
# back out of this process: the Train controller would otherwise get them as a runtime env of its own.
# Preemption is a cloud node's event, not one of this machine; usage stats are a network call per start.
# (Train's 2 s health check is kept: polled every 0.25 s, `fit()` returned 1.8 s sooner after the workers
# ended, but the polls cost ~6 CPU-seconds a stage and on 2 cores the start took 5.5 s longer; docs/performance.md.)
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
DASHBOARD_ENV = "UPDETR_RAY_DASHBOARD"

# False once this process started a local Ray without the dashboard: no State API then (see
# `state_api_available`).
_state_api = True


def state_api_available() -> bool:
    """False when this process started its own Ray without the dashboard, so Ray's State API is absent;
    True otherwise (a joined cluster, a sweep's Ray, or a Ray Train worker / Tune trial process)."""
    return _state_api


def want_dashboard(dashboard: Optional[bool] = None) -> bool:
    """A local Ray's dashboard: on when asked (`dashboard`, or UPDETR_RAY_DASHBOARD=1), else off.

    The dashboard of ray[default] 2.60 is ten Python processes (the head and one per module) that start
    beside the first run and cost several CPU-seconds: on 2 cores, a large part of a small stage's start.
    Without it Ray keeps only a minimal head (usage stats, no modules, no web UI).
    A local `updetr run` needs none of it; a sweep asks for it (Train's placement-group cleaner queries the
    State API when Tune stops a trial early)."""
    if dashboard is not None:
        return dashboard
    return os.environ.get(DASHBOARD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def connect_ray(address: Optional[str], cfg: ExperimentConfig,
                num_cpus: Optional[float] = None, dashboard: Optional[bool] = None) -> tuple[bool, Optional[float]]:
    """Join `address` (or $RAY_ADDRESS) or start a local Ray sized to the machine (`num_cpus`); a local
    Ray starts without its dashboard unless `want_dashboard(dashboard)`.

    Returns `(local, cluster_cpus)`: cluster_cpus is set for a local Ray only (it is what we size).
    """
    global _state_api
    if address is not None and address != "local":
        from updetr.orchestration.ray_access import enable_token_auth

        enable_token_auth()  # before `import ray`: Ray reads RAY_AUTH_MODE when it loads
    # torch first: imported after ray.init() joined an existing cluster (e.g. in a Ray Job driver), torch
    # dies with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (seen with ray 2.60, torch 2.15).
    import torch  # noqa: F401
    import ray

    if ray.is_initialized():
        return False, None
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = "auto"  # inside a Ray Job, or the user pointed RAY_ADDRESS at a cluster
    local = address is None or address == "local"
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    saved_env = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", *LOCAL_RAY_ENV)}
    if local:
        import logging

        # Our own Ray on this machine: its token note is for people sharing a cluster, not for this run.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        cpus = int(num_cpus) if num_cpus else (os.cpu_count() or 1)
        kwargs.update(address="local", num_cpus=cpus)
        _pin_local_gcs_address()
        if cfg.ray.use_gpu is False:
            kwargs["num_gpus"] = 0
        kwargs["include_dashboard"] = want_dashboard(dashboard)
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)  # a user's own setting wins
    else:
        from updetr.orchestration.ray_start import keep_loopback_for

        check_address(address)
        keep_loopback_for(address)
        kwargs["address"] = address
    cwd = os.getcwd()
    captured: dict = {}
    try:
        # Joining: Ray's C++ client retries a rejected token for ~20 s, one stderr line per second. Hold
        # that output back; on failure it becomes our one line, on success it is passed through.
        with (_held_stderr(captured) if not local else nullcontext()):
            ray.init(**kwargs)
        sys.stderr.write(captured.get("text", ""))
        _restore_cwd(cwd)
    except Exception as e:  # noqa: BLE001 - one line for the user
        _restore_env(saved_env)
        from ray.exceptions import AuthenticationError

        text = " ".join(str(getattr(e, "message", e)).split())
        if isinstance(e, AuthenticationError) or "InvalidAuthToken" in captured.get("text", ""):
            raise LaunchError(f"the Ray cluster at {address} rejected the auth token ({text.split('. ')[0]}); "
                              f"set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token") from None
        if local:
            raise LaunchError(f"cannot start a local Ray: {text[:300]}") from None
        raise LaunchError(f"cannot join the Ray cluster at {address} ({text[:200]}); check the address (the head's "
                          f"GCS, HOST:6379) and that RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token "
                          f"holds the cluster's token") from None
    _restore_env(saved_env)  # the local Ray's processes already carry the pinned address and LOCAL_RAY_ENV
    _state_api = bool(kwargs["include_dashboard"]) if local else True  # a joined cluster: its own dashboard
    return local, (float(ray.cluster_resources().get("CPU", 0)) if local else None)


@contextmanager
def _held_stderr(box: dict):
    """Redirect file descriptor 2 (C++ logs included) to a temp file; its text lands in `box["text"]`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode(errors="replace")


def _restore_env(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _restore_cwd(path: str) -> None:
    """Re-enter `path` if it was replaced under us.

    In a Ray Job driver, `ray.init()` can re-extract the job's working dir (the process' CWD) into a new
    directory at the same path (seen with two nodes sharing one temp dir on one host); the old CWD is then
    gone and anything calling os.getcwd() (MLflow's sqlite store does) raises FileNotFoundError.
    """
    try:
        if os.path.samefile(os.getcwd(), path):
            return
    except (FileNotFoundError, OSError):
        pass
    if os.path.isdir(path):
        os.chdir(path)


def _pin_local_gcs_address() -> None:
    """Choose the local GCS port up front and export RAY_ADDRESS before Ray starts.

    Ray processes inherit this environment, so anything inside the cluster that looks the cluster up
    (Train's PlacementGroupCleaner uses the State API with address auto-detection) finds *this* one even
    when other Ray instances run on the host ("Found multiple active Ray instances" otherwise).
    """
    from ray._private.services import get_node_ip_address

    from updetr.orchestration.ray_access import free_port

    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"


def quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(sys.stderr.isatty())
    ctx.print_on_execution_start = False
