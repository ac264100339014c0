"""The driver's plan of one Ray run: its deterministic name, storage folder, tracking store, checkpoints.

Naming and resume: the run name is `ray.run_name`, or `<name>-<8 hex>` hashed from the training-relevant
config (`config.identity_fields`: every setting that changes the arithmetic, `runtime.precision` included;
not worker counts, storage or logging). Ray Train V2 resumes a run whose `(storage_path, name)` already
holds checkpoints, so re-running the same command after a crash continues from the last checkpoint. A
changed config gives a new name, hence a fresh run, never a silent resume with other settings.

Paths: `storage_path` (default `<runtime.output_dir>/ray`) and the sqlite tracking URI are made absolute
here, on the driver: Ray Train workers chdir into Ray's session folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from updetr.config import ExperimentConfig, identity_fields
from updetr.tracking import TrackingError, check_tracking_uri, resolve_tracking_uri

CHECKPOINT_FILE = "checkpoint.pt"          # our schema, inside each Ray checkpoint directory
CHECKPOINT_PREFIX = "checkpoint_"          # Ray checkpoint dirs: checkpoint_<step, 8 digits>


class LaunchError(RuntimeError):
    """The run cannot start (storage, address, token, tracking); the message is one line."""


# ------------------------------------------------------------------------------------------ plan
@dataclass
class RunPlan:
    """Everything the driver resolved before any work: names and absolute locations."""

    cfg: ExperimentConfig
    run_name: str
    storage_path: str            # root: absolute local path or URI
    run_dir: str                 # storage_path/run_name: where Ray keeps this run's checkpoints
    tracking_uri: Optional[str]  # None when tracking is disabled
    experiment: str              # MLflow experiment name
    extra: dict = field(default_factory=dict)


def config_hash(cfg: ExperimentConfig) -> str:
    """8 hex of every setting that changes the arithmetic (config.identity_fields; not worker counts)."""
    return hashlib.sha256(json.dumps(identity_fields(cfg), sort_keys=True).encode()).hexdigest()[:8]


def run_name_for(cfg: ExperimentConfig) -> str:
    return cfg.ray.run_name or f"{cfg.name}-{config_hash(cfg)}"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_storage(cfg: ExperimentConfig, cwd: str | Path | None = None) -> str:
    """`ray.storage_path` or `<output_dir>/ray`, absolute (object-store URIs unchanged)."""
    base = Path(cwd or os.getcwd())
    path = cfg.ray.storage_path or str(Path(cfg.runtime.output_dir) / "ray")
    if is_uri(path):
        return path.rstrip("/")
    path = path.removeprefix("file://")
    return str((base / Path(path).expanduser()).resolve())


def check_storage(storage: str) -> None:
    """Create the storage folder and write/delete a probe file; LaunchError (one line) if that fails."""
    probe = f".updetr-write-test-{socket.gethostname()}-{os.getpid()}"
    if not is_uri(storage):
        try:
            Path(storage).mkdir(parents=True, exist_ok=True)
            (Path(storage) / probe).write_text("")
            (Path(storage) / probe).unlink()
        except OSError as e:
            raise LaunchError(f"ray.storage_path {storage} is not writable ({e.strerror or e}); "
                              f"set ray.storage_path to a writable folder or object-store URI") from None
        return
    try:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(storage)
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{probe}") as f:
            f.write(b"")
        fs.delete_file(f"{root}/{probe}")
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types
        raise LaunchError(f"ray.storage_path {storage} is not writable ({' '.join(str(e).split())[:200]})") from None


def plan_run(cfg: ExperimentConfig, *, run_name: Optional[str] = None, cwd: str | Path | None = None,
             check: bool = True) -> RunPlan:
    """Resolve the run's name, storage and tracking store; with `check`, fail fast if either is unusable."""
    name = run_name or run_name_for(cfg)
    storage = resolve_storage(cfg, cwd)
    uri = resolve_tracking_uri(cfg.tracking.uri, cwd) if cfg.tracking.enabled else None
    if check:
        check_storage(storage)
        if uri is not None:
            try:
                check_tracking_uri(uri)
            except TrackingError as e:
                raise LaunchError(str(e)) from None
    return RunPlan(cfg, name, storage, f"{storage}/{name}", uri, cfg.tracking.experiment or cfg.name)


def existing_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """`[(step, path), ...]` of the run's checkpoint dirs already in storage, oldest first."""
    found = []
    try:
        if is_uri(run_dir):
            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(run_dir)
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
            names = [(i.base_name, f"{run_dir}/{i.base_name}") for i in infos if i.type == pafs.FileType.Directory]
        else:
            p = Path(run_dir)
            names = [(d.name, str(d)) for d in p.iterdir() if d.is_dir()] if p.is_dir() else []
    except Exception:  # noqa: BLE001 - informational only
        return []
    for name, path in names:
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
            found.append((int(name[len(CHECKPOINT_PREFIX):]), path))
    return sorted(found)
