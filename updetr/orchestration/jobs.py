"""Ray Jobs: submit an experiment to a cluster, and status / logs / stop of a job.

`submit` stages a small working dir (the `updetr` package and the *resolved* experiment as
`experiment.yaml`), submits `python -m updetr.orchestration run experiment.yaml --address auto` as a Ray
Job with a runtime env (working dir, tracking env vars, git SHA), and returns the job id. A sweep
(`submit_sweep`) ships the sweep YAML with the experiment files it reads and runs `python -m updetr sweep` instead.
The job driver runs on the head node and joins the cluster through `RAY_ADDRESS`, which the Jobs server sets.

Every failure to talk to the cluster becomes `JobsError` with one line (unreachable address, rejected
token, refused request). Token auth: when `RAY_AUTH_MODE` is unset and a token is configured
(`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`), token mode is switched on for this process.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional
from urllib.parse import urlparse

from updetr.orchestration.ray_access import enable_token_auth

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../updetr
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_EXPERIMENT_NAME")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(RuntimeError):
    """The cluster cannot be used (unreachable, bad token, rejected request); one-line message."""


def normalize_address(address: Optional[str]) -> str:
    """`http://head:8265` (a bare `head:8265` gets http://); env RAY_API_SERVER_ADDRESS / RAY_ADDRESS if None."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API)")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise JobsError(f"--address {address}: Ray Jobs needs the dashboard's http(s)://HEAD:8265 address")
    return address.rstrip("/")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """TCP connect to the address' host:port; JobsError if nothing answers within `timeout_s`."""
    url = urlparse(address if "://" in address else "tcp://" + address)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 8265 if url.scheme == "http" else None)
    if not host or not port:
        raise JobsError(f"address {address}: expected HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise JobsError(f"cannot reach the Ray cluster at {address} ({reason}); is it up, and is this the "
                        f"right host and port?") from None


def _auth_message(address: str, err: BaseException) -> str:
    text = " ".join(str(getattr(err, "message", err)).split())
    first = text.split(". ")[0].split(" Ensure")[0].rstrip(".")
    return (f"the Ray cluster at {address} rejected the request ({first}); set RAY_AUTH_TOKEN or "
            f"RAY_AUTH_TOKEN_PATH to the cluster's token (`ray get-auth-token` on the head)")


def _translate(address: str, err: BaseException) -> JobsError:
    from ray.exceptions import AuthenticationError

    if isinstance(err, JobsError):
        return err
    if isinstance(err, AuthenticationError):
        return JobsError(_auth_message(address, err))
    if isinstance(err, ConnectionError):
        return JobsError(f"cannot reach the Ray Jobs API at {address}; is the dashboard running there?")
    text = " ".join(str(err).split())
    return JobsError(f"Ray cluster at {address}: {text[:300]}")


def client(address: Optional[str]):
    """A connected `JobSubmissionClient` (version checked), or JobsError."""
    enable_token_auth()
    address = normalize_address(address)
    check_reachable(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise _translate(address, e) from None


def _call(address: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _translate(address, e) from None


def stage_working_dir(config_yaml: Optional[str], dest: Optional[Path] = None) -> Path:
    """A folder with `updetr/` (no caches) and `experiment.yaml` (the resolved config, when given): the job's
    working dir."""
    dest = Path(dest or tempfile.mkdtemp(prefix="updetr-job-"))
    shutil.copytree(PACKAGE_DIR, dest / "updetr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if config_yaml is not None:
        (dest / "experiment.yaml").write_text(config_yaml)
    return dest


def stage_sweep_dir(files: list[Path], dest: Optional[Path] = None) -> tuple[Path, list[str]]:
    """A job working dir with `updetr/` and the sweep's files under `sweep/`, laid out as they are here
    (relative to their common folder), so the sweep's relative `experiment:` and `base:` paths still resolve.
    Returns the folder and each file's path inside it, in the order given."""
    dest = stage_working_dir(None, dest)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    inside = []
    for f in files:
        rel = Path("sweep") / f.relative_to(root)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest / rel)
        inside.append(str(rel))
    return dest, inside


def job_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Env vars for the job: tracking credentials/URI set here, the git SHA of this checkout, `extra`."""
    from updetr.tracking import git_info

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    git = git_info()
    env.update({"UPDETR_GIT_SHA": git["sha"], "UPDETR_GIT_DIRTY": git["dirty"], "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def submit(address: Optional[str], config_yaml: str, *, run_args: Iterable[str] = (), job_id: Optional[str] = None,
           env: Optional[Mapping[str, str]] = None, entrypoint_num_cpus: Optional[float] = None) -> str:
    """Submit the resolved experiment as a Ray Job; returns the job (submission) id."""
    address = normalize_address(address)
    jobs = client(address)
    workdir = stage_working_dir(config_yaml)
    entry = ["python", "-m", "updetr.orchestration", "run", "experiment.yaml", "--address", "auto", *run_args]
    return _submit(address, jobs, workdir, entry, job_id, env, entrypoint_num_cpus)


def submit_sweep(address: Optional[str], files: list[Path], overrides: Iterable[str] = (), *,
                 name: Optional[str] = None, job_id: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                 entrypoint_num_cpus: Optional[float] = None) -> str:
    """Submit `updetr sweep` of a sweep file as a Ray Job: `files` are the sweep YAML first, then the
    experiment (and `base:`) files it reads (`updetr.sweep.spec.source_files`); the job's driver runs the
    trials on the cluster (`--address auto`). Returns the job (submission) id."""
    import shlex

    address = normalize_address(address)
    jobs = client(address)
    workdir, inside = stage_sweep_dir(files)
    entry = ["python", "-m", "updetr", "sweep", inside[0], *map(shlex.quote, overrides), "--address", "auto",
             *(["--name", shlex.quote(name)] if name else [])]
    return _submit(address, jobs, workdir, entry, job_id, env, entrypoint_num_cpus)


def _submit(address: str, jobs, workdir: Path, entry: list[str], job_id: Optional[str],
            env: Optional[Mapping[str, str]], entrypoint_num_cpus: Optional[float]) -> str:
    try:
        runtime_env = {"working_dir": str(workdir), "env_vars": job_env(env)}
        return _call(address, jobs.submit_job, entrypoint=" ".join(entry), runtime_env=runtime_env,
                     submission_id=job_id, entrypoint_num_cpus=entrypoint_num_cpus)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def status(address: Optional[str], job_id: str) -> dict:
    """`{"status": "RUNNING", "message": ..., "entrypoint": ..., "start_time": ..., "end_time": ...}`."""
    address = normalize_address(address)
    info = _call(address, client(address).get_job_info, job_id)
    return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)), "message": info.message,
            "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}


def list_jobs(address: Optional[str]) -> list[dict]:
    """The cluster's jobs, newest first: `[{"job_id", "status", "start_time", "end_time", "entrypoint"}]`."""
    address = normalize_address(address)
    found = _call(address, client(address).list_jobs)
    out = [{"job_id": j.submission_id or j.job_id, "status": str(getattr(j.status, "value", j.status)),
            "start_time": j.start_time, "end_time": j.end_time, "entrypoint": j.entrypoint} for j in found]
    return sorted(out, key=lambda j: j["start_time"] or 0, reverse=True)


def logs(address: Optional[str], job_id: str) -> str:
    address = normalize_address(address)
    return _call(address, client(address).get_job_logs, job_id)


def follow(address: Optional[str], job_id: str, out=None) -> str:
    """Stream the job's logs to `out` until it ends; returns the final status."""
    address = normalize_address(address)
    jobs = client(address)
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except Exception as e:  # noqa: BLE001
        raise _translate(address, e) from None
    # the log stream can close a moment before the status turns terminal
    deadline = time.monotonic() + 30
    while True:
        state = str(getattr(s := _call(address, jobs.get_job_status, job_id), "value", s))
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def stop(address: Optional[str], job_id: str) -> bool:
    address = normalize_address(address)
    return bool(_call(address, client(address).stop_job, job_id))
