"""Experiment tracking behind a small interface: an MLflow implementation and a no-op one.

One MLflow run per training run. The driver opens it (`start_tracking`): it finds a run of the same
`updetr.run_name` + `updetr.storage` tags and re-attaches to it, or creates one, and logs the flattened
resolved config as params, the YAML as an artifact, the git SHA and the software environment. Rank 0
of the Ray Train workers re-attaches by run id (`MlflowTracker.attach`) and logs the metrics; the other
ranks get a `NullTracker`.

Tracking must never stop training, and must not lose what it was given: after the run is open, every
write (metrics, params, tags, texts, artifacts, the final status) that cannot be delivered is kept in
`pending`, in order, and delivered first when the server answers again (store and forward; on disk in
the run's folder when the tracker has a spool, see updetr/tracking_spool.py). The tracker warns once
per outage (and once when tracking is back) and tries again only after `retry_interval_s`, so an
unreachable server costs one failed request per interval. Reads (the committed marker) cannot wait:
they fail fast while the server is away. Delivering a kept write again is harmless: metric rows keep
their recording time (MLflow stores an identical row once), tags and the status are set in order,
and a param is re-sent with the same value.
Opening the run, in contrast, is strict: `TrackingError` (one line) before any work starts.
"""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional

from updetr.provenance import environment_info, git_info  # noqa: F401 - re-exported for callers
from updetr.tracking_client import CredentialsError, prepare_client_env
from updetr.tracking_spool import StoreAndForward, one_line as _one_line, warn as _warn

TAG_RUN_NAME = "updetr.run_name"
TAG_STORAGE = "updetr.storage"
TAG_CHECKPOINT_DIR = "updetr.checkpoint_dir"
TAG_LAST_CHECKPOINT = "updetr.last_checkpoint"
TAG_ATTEMPT = "updetr.attempt"
DEFAULT_DB = "mlflow.db"



_DROPPED = object()  # what a guarded call returns when it failed or was skipped


class TrackingError(RuntimeError):
    """Tracking cannot start (server down, store not writable, bad URI); the message is one line."""




# --------------------------------------------------------------------------------------------- URIs
def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The embedded default store: `sqlite:///<abs cwd>/mlflow.db` (absolute: Ray workers chdir)."""
    return "sqlite:///" + str((Path(cwd or os.getcwd()) / DEFAULT_DB).resolve())


def resolve_tracking_uri(uri: Optional[str], cwd: str | Path | None = None) -> str:
    """`tracking.uri` > `$MLFLOW_TRACKING_URI` > the embedded sqlite file; local paths made absolute.

    `sqlite:///rel.db` and bare paths are resolved against `cwd` (a bare `*.db` path is a sqlite
    store, any other bare path a file store); `http(s)://`, `databricks` etc. are returned unchanged.
    """
    base = Path(cwd or os.getcwd())
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(base)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/"):
            return uri
        return "sqlite:///" + str((base / path).resolve())
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        path = "/" + path.lstrip("/") if path.startswith("/") else path
        return "file://" + str((base / path).resolve())
    if "://" not in uri and uri != "databricks" and not uri.startswith("databricks"):
        path = (base / uri).resolve()
        return "sqlite:///" + str(path) if path.suffix == ".db" else "file://" + str(path)
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:///") or uri.startswith("file:")


def local_artifact_root(uri: str) -> Optional[str]:
    """Artifact location for new experiments of a local store: `mlruns/` next to the store (absolute)."""
    if uri.startswith("sqlite:///"):
        return "file://" + str(Path(uri[len("sqlite:///"):]).parent / "mlruns")
    return None


def ui_hint(uri: str) -> str:
    """A command (or URL) that shows this store in the MLflow UI."""
    if uri == default_tracking_uri():
        return "updetr mlflow-server   (then open http://127.0.0.1:5000)"
    if uri.startswith("sqlite:///"):
        return f"updetr mlflow-server --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"
    if uri.startswith("file:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return uri


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (TrackingError, one line) when the store cannot be used; does nothing for other schemes."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (http(s) only)
                if r.status != 200:
                    raise TrackingError(f"MLflow tracking server at {uri} answered {r.status} on /health")
        except urllib.error.HTTPError as e:
            raise TrackingError(f"MLflow tracking server at {uri} answered {e.code} on /health "
                                f"(is it an MLflow server?)") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow tracking server at {uri} is not reachable ({_one_line(reason)}); "
                                f"start it (updetr mlflow-server) or set tracking.uri / "
                                f"tracking.enabled=false") from None
    elif is_local_store(uri):
        path = Path(uri.split(":", 1)[1].lstrip("/"))
        path = Path("/" + str(path))
        folder = path.parent if uri.startswith("sqlite:") else path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".updetr-write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise TrackingError(f"MLflow store {uri}: folder {folder} is not writable "
                                f"({e.strerror or _one_line(e)})") from None


# ----------------------------------------------------------------------------- run metadata helpers
def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Nested config dict -> `{"model.hidden_dim": "32", ...}` (lists and None as text, <= 6000 chars)."""
    from updetr.config import flatten

    out: dict[str, str] = {}
    for name, value in flatten(dict(config)).items():
        text = "None" if value is None else str(value)
        out[name] = text if len(text) <= 6000 else text[:5997] + "..."
    return out


# --------------------------------------------------------------------------------------- trackers
class Tracker:
    """The interface, and the no-op implementation (rank != 0, tracking disabled, tests)."""

    run_id: Optional[str] = None
    uri: Optional[str] = None
    resumed: bool = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values as text); params already logged with the same value are skipped."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int, timestamp_ms: Optional[int] = None) -> None:
        """Log numeric metrics at a global step; non-numeric values are ignored. `timestamp_ms` (default: now)
        lets a repeated write carry the same timestamp, which MLflow's store keeps once."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (overwrites)."""

    def get_tag(self, key: str) -> Optional[str]:
        """A run tag's current value (None when unset or tracking is off)."""
        return None

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store a text file (e.g. the resolved YAML) as a run artifact."""

    def log_artifact(self, local_path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Upload a local file as a run artifact."""

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED | FAILED | KILLED."""

    def describe(self) -> str:
        return "tracking disabled"


NullTracker = Tracker


class MlflowTracker(StoreAndForward, Tracker):
    """One MLflow run, by id; every call after opening is guarded (see the module docstring)."""

    def __init__(self, uri: str, run_id: str, *, retry_interval_s: Optional[float] = None,
                 experiment_name: Optional[str] = None, resumed: bool = False):
        _prepare_client_env()
        from mlflow.tracking import MlflowClient

        StoreAndForward.__init__(self, MlflowClient(tracking_uri=uri), uri, run_id, retry_interval_s)
        self.resumed, self.experiment_name = resumed, experiment_name
        self._logged_params: Optional[dict[str, str]] = None

    # -- construction
    @classmethod
    def attach(cls, uri: str, run_id: str, **kw: Any) -> "MlflowTracker":
        """Re-attach to an existing run (Ray Train rank 0, a restarted worker); no request is made."""
        return cls(uri, run_id, **kw)

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, identity: Mapping[str, str],
             tags: Optional[Mapping[str, str]] = None, check: bool = True) -> "MlflowTracker":
        """Find the run whose tags match `identity` (and re-open it) or create one. Strict: TrackingError."""
        _prepare_client_env()
        if check:
            check_tracking_uri(uri)
        _quiet_mlflow_logs()
        from mlflow.tracking import MlflowClient

        try:
            with _first_use_lock(uri):
                client = MlflowClient(tracking_uri=uri)  # creates / migrates an embedded store's schema
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    exp_id = client.create_experiment(experiment, artifact_location=local_artifact_root(uri))
                elif exp.lifecycle_stage == "deleted":
                    raise TrackingError(f"MLflow experiment '{experiment}' is deleted in {uri}; restore it "
                                        f"or set tracking.experiment")
                else:
                    exp_id = exp.experiment_id
            query = " and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in identity.items())
            found = client.search_runs([exp_id], filter_string=query, max_results=1,
                                       order_by=["attributes.start_time DESC"])
            all_tags = {**(tags or {}), **identity}
            if found:
                run = found[0]
                attempt = int(run.data.tags.get(TAG_ATTEMPT, "1")) + 1
                client.update_run(run.info.run_id, status="RUNNING")
                client.set_tag(run.info.run_id, TAG_ATTEMPT, str(attempt))
                tracker = cls(uri, run.info.run_id, experiment_name=experiment, resumed=True)
                tracker._logged_params = dict(run.data.params)
            else:
                run = client.create_run(exp_id, run_name=run_name, tags={**all_tags, TAG_ATTEMPT: "1"})
                tracker = cls(uri, run.info.run_id, experiment_name=experiment, resumed=False)
                tracker._logged_params = {}
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001 - any MLflow / store error becomes one line
            raise TrackingError(f"MLflow tracking at {uri} failed while opening the run: {_one_line(e)}") from None
        return tracker

    # -- guard (writes: StoreAndForward, updetr/tracking_spool.py)
    def _call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        """A read: its result, or _DROPPED when the server is away (nothing to keep for later)."""
        if not self._may_try():
            self.dropped += 1
            return _DROPPED
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking never stops training
            self.dropped += 1
            self._failed(what, e)
            return _DROPPED
        self._answered()
        return result

    @property
    def healthy(self) -> bool:
        return self._down_since is None

    # -- interface
    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._logged_params is None:
            run = self._call("get_run", self.client.get_run, self.run_id)
            self._logged_params = dict(run.data.params) if run is not _DROPPED else {}
        new, changed = {}, {}
        for key, value in params.items():
            text = "None" if value is None else str(value)
            old = self._logged_params.get(key)
            if old is None:
                new[key] = text
            elif old != text:
                changed[key] = text  # MLflow params are immutable: record the change as a tag
        items = list(new.items())
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]
            self._write({"op": "batch", "params": [[k, v] for k, v in chunk]})
            self._logged_params.update(chunk)  # delivered or kept: either way it will be there once
        if changed:
            _warn(f"resumed run {self.run_id}: {len(changed)} param(s) differ from the first attempt "
                  f"({', '.join(sorted(changed)[:5])}); kept as tags updetr.param_override.*")
            self.set_tags({f"updetr.param_override.{k}": v for k, v in changed.items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int, timestamp_ms: Optional[int] = None) -> None:
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        items = []
        for key, value in metrics.items():
            try:
                items.append([str(key), float(value), ts, int(step)])
            except (TypeError, ValueError):
                continue
        for i in range(0, len(items), 1000):
            self._write({"op": "batch", "metrics": items[i:i + 1000]})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [[str(k), str(v)] for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self._write({"op": "batch", "tags": items[i:i + 100]})

    def get_tag(self, key: str) -> Optional[str]:
        """Read from the server; raises MarkerUnavailable when it cannot be read (see metric_ledger)."""
        from updetr.metric_ledger import MarkerUnavailable

        if self.pending:
            self.flush()
        if self.pending:  # the marker on the server is older than the writes kept here
            raise MarkerUnavailable(f"MLflow run {self.run_id} has {len(self.pending)} writes not delivered yet")
        run = self._call("get_run", self.client.get_run, self.run_id)
        if run is _DROPPED:
            raise MarkerUnavailable(f"MLflow run {self.run_id} cannot be read at {self.uri}")
        return run.data.tags.get(key)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write({"op": "text", "text": text, "file": artifact_file})

    def log_artifact(self, local_path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._write({"op": "artifact", "path": str(Path(local_path).resolve()), "artifact_path": artifact_path})

    def end(self, status: str = "FINISHED") -> None:
        self._write({"op": "terminate", "status": status})
        self.flush(force=True)  # one last try before giving up on this process
        if self.pending:
            from updetr.tracking_spool import pending_notice

            _warn(pending_notice(self))
        elif self.errors:
            _warn(f"MLflow tracking: {self.errors} failed call(s) in this process; every write was delivered")

    def describe(self) -> str:
        return f"MLflow run {self.run_id} (experiment '{self.experiment_name}') at {self.uri}"


def _first_use_lock(uri: str):
    """A file lock beside an embedded SQLite store for its first use: MLflow creates and migrates the schema
    when a client first opens the file, and two processes doing that at once race inside alembic (`Online
    migration expected to match one row`); creating the same experiment twice races the same way."""
    if not uri.startswith("sqlite:///"):
        import contextlib

        return contextlib.nullcontext()
    from updetr.run_lock import file_lock

    return file_lock(uri[len("sqlite:///"):] + ".lock")


def _prepare_client_env() -> None:
    try:
        prepare_client_env()
    except CredentialsError as e:
        raise TrackingError(str(e)) from None


def _quote(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def _quiet_mlflow_logs() -> None:
    import logging

    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


def start_tracking(enabled: bool, uri: str, experiment: str, run_name: str, storage: str,
                   config: Mapping[str, Any], config_yaml: str, extra_tags: Optional[Mapping[str, str]] = None,
                   ) -> Tracker:
    """Driver side: open (or re-open) the run and log config, git SHA and environment. Strict.

    `storage` is the run's checkpoint folder (URI or absolute path); with `run_name` it identifies the run,
    so re-running the same command re-attaches to the same MLflow run instead of creating a second one.
    """
    if not enabled:
        return NullTracker()
    check_tracking_uri(uri)  # first: fail in a second, before importing torch for the environment
    git = git_info()
    env = environment_info()
    tags = {TAG_CHECKPOINT_DIR: storage, "mlflow.source.git.commit": git["sha"],
            "updetr.git_sha": git["sha"], "updetr.git_dirty": git["dirty"],
            **{f"updetr.env.{k}": v for k, v in env.items()}, **(extra_tags or {})}
    tracker = MlflowTracker.open(uri, experiment, run_name, identity={TAG_RUN_NAME: run_name, TAG_STORAGE: storage},
                                 tags=tags, check=False)
    from updetr.tracking_sync import attach_local_spool

    attach_local_spool(tracker, storage, "driver")  # writes an outage keeps go to the run folder
    if tracker.resumed:
        tracker.set_tags({k: v for k, v in tags.items() if not k.startswith("mlflow.")})
    tracker.log_params(flatten_params(config))
    tracker.log_text(config_yaml, "config/resolved.yaml")
    tracker.log_text("\n".join(f"{k}: {v}" for k, v in env.items()) + f"\ngit_sha: {git['sha']}\n"
                     f"git_dirty: {git['dirty']}\n", "config/environment.txt")
    if not tracker.healthy:
        raise TrackingError(f"MLflow tracking at {uri} failed while logging the run's config")
    return tracker
