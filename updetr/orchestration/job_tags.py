"""What ties an MLflow run to the Ray Job and cluster it came from: the tags the driver writes, and the
lookup `updetr jobs status` does with them.

Tags (set when the run is opened, and again on every resume, so they name the latest attempt):
  `updetr.ray.job_id`   the Ray Job submission id (only under `updetr submit` / `ray job submit`)
  `updetr.ray.address`  the cluster's GCS address, `host:port` (credentials in a URL are never written)
  `updetr.ray.nodes`    alive nodes when the run started
  `updetr.ray.version`  Ray's version on the driver
`updetr compare --tag updetr.ray.job_id=ID` selects a job's runs with them.
"""
from __future__ import annotations

import json
import os
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

TAG_JOB_ID = "updetr.ray.job_id"
TAG_ADDRESS = "updetr.ray.address"
TAG_NODES = "updetr.ray.nodes"
TAG_VERSION = "updetr.ray.version"
# Job metadata key: where the job tracks, so `jobs status` can find its run without being told.
META_TRACKING_URI = "updetr_tracking_uri"


def without_credentials(address: str) -> str:
    """`scheme://user:secret@host:port/path` -> `scheme://host:port/path`; other strings unchanged."""
    if "@" not in address:
        return address
    if "://" not in address:
        return address.rpartition("@")[2]
    parts = urlsplit(address)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def job_submission_id() -> Optional[str]:
    """The submission id of the Ray Job this driver runs in, or None outside a job.

    Ray's job supervisor hands the driver its job config (runtime env and metadata, the submission id
    among them) in RAY_JOB_CONFIG_JSON_ENV_VAR; the driver's own `get_job_id()` is Ray's internal id, which
    `ray job` / `updetr jobs` do not show."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        value = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
    return str(value) if value else None


def cluster_tags() -> dict[str, str]:
    """Tags naming the connected Ray cluster (call after `ray.init`) and, inside a Ray Job, the job."""
    import ray

    tags = {TAG_VERSION: ray.__version__}
    if not ray.is_initialized():
        return tags
    try:
        tags[TAG_ADDRESS] = without_credentials(str(ray.get_runtime_context().gcs_address))
        tags[TAG_NODES] = str(sum(1 for n in ray.nodes() if n.get("Alive")))
    except Exception:  # noqa: BLE001 - a tag is not worth failing a run over
        pass
    job = job_submission_id()
    if job:
        tags[TAG_JOB_ID] = job
    return tags


def tracking_uri_for_job(uri: Optional[str]) -> Optional[str]:
    """The tracking URI to store in a job's metadata: one readable from elsewhere (a server, an absolute
    store path), without credentials; None for a relative default that only exists on the head node."""
    if not uri:
        return None
    if uri.startswith(("http://", "https://", "databricks")) or uri.startswith(("sqlite:////", "file:///")) \
            or os.path.isabs(uri):
        return without_credentials(uri)
    return None


def job_runs_line(job_id: str, uri: str) -> str:
    """One line naming the MLflow run(s) tagged with `job_id` at `uri` (or why there is none)."""
    from mlflow.tracking import MlflowClient

    from updetr.tracking import TrackingError, check_tracking_uri

    try:
        check_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exp_ids, filter_string=f"tags.`{TAG_JOB_ID}` = '{job_id}'") if exp_ids else []
    except TrackingError as e:
        return f"  mlflow: cannot read {uri} ({e})"
    except Exception as e:  # noqa: BLE001 - status must still print
        return f"  mlflow: cannot read {uri} ({' '.join(str(e).split())[:200]})"
    if not runs:
        return f"  mlflow: no run tagged {TAG_JOB_ID}={job_id} at {uri} (yet)"
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    return "\n".join(f"  mlflow: run {r.info.run_id} ({r.info.run_name}, {r.info.status}) in experiment "
                     f"'{names.get(r.info.experiment_id, r.info.experiment_id)}' at {uri}" for r in runs)
