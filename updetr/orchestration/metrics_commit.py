"""Exactly-once metrics on Ray Train: commit a checkpoint's metric ledger once the controller registered it.

Rank 0 buffers its metrics in a `MetricLedger` and writes the part a checkpoint covers into that checkpoint
folder (`metrics.json`, see updetr/metric_ledger.py). Two places commit, both idempotent through the run's
committed-position tag:

  * `CommitMetricsCallback.after_report` on the Train controller: Ray calls user callbacks after its
    CheckpointManager has registered the reported checkpoint, so only metrics of registered checkpoints reach
    MLflow — a checkpoint written but lost before registration never commits, and its steps, re-run after
    the restore, commit with the next checkpoint;
  * `catch_up` on rank 0 after a restore: the restored checkpoint is registered by definition; if the
    previous driver died between registering it and committing, its metrics commit now.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ray.train import UserCallback

from updetr.metric_ledger import commit, read_ledger
from updetr.tracking import MlflowTracker, Tracker, _warn


def commit_checkpoint_folder(folder: str | Path, tracker: Tracker) -> int:
    """Commit the ledger stored in one checkpoint folder (0 when it holds none). Never raises."""
    try:
        state = read_ledger(folder)
        return commit(state, tracker) if state else 0
    except Exception as e:  # noqa: BLE001 - tracking must never stop training
        _warn(f"cannot commit the metrics of checkpoint {folder}: {type(e).__name__}: {e}")
        return 0


class CommitMetricsCallback(UserCallback):
    """Runs on the Train controller; holds only the run's address (the tracker is opened lazily there)."""

    def __init__(self, tracking_uri: str, run_id: str, experiment: Optional[str] = None,
                 spool_dir: Optional[str] = None):
        self.tracking_uri, self.run_id, self.experiment = tracking_uri, run_id, experiment
        self.spool_dir = spool_dir  # the run folder: commits the server cannot take wait there
        self._tracker: Optional[Tracker] = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tracker": None}  # an MLflow client does not travel to the controller

    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = MlflowTracker.attach(self.tracking_uri, self.run_id, experiment_name=self.experiment)
            if self.spool_dir:
                from updetr.tracking_spool import attach_spool

                attach_spool(self._tracker, self.spool_dir, "commit")
        return self._tracker

    def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            commit_checkpoint_folder(folder, self.tracker())


def commit_callbacks(tracker: Tracker) -> list:
    """The Train callbacks that commit metrics into `tracker`'s run (none when tracking is off)."""
    if not tracker.run_id or not tracker.uri:
        return []
    spool = getattr(tracker, "spool", None)
    return [CommitMetricsCallback(tracker.uri, tracker.run_id, getattr(tracker, "experiment_name", None),
                                  str(spool.path.parent) if spool is not None else None)]


def catch_up(tracker: Tracker) -> int:
    """Rank 0, after a restore: commit the restored (registered) checkpoint's ledger if still pending."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or not tracker.run_id:
        return 0
    with checkpoint.as_directory() as folder:
        return commit_checkpoint_folder(folder, tracker)
