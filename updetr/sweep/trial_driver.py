"""The stage driver of one sweep trial: the Ray stage driver plus early stopping's relay and tracking outages.

* Early stopping: the watched stage (updetr/sweep/early_stop.py) gets the `EpochRelay` Train callback and
  per-epoch reports from its workers; other stages run exactly as in `updetr run`.
* A tracking server that went away mid-sweep must not fail the trials that start after it: a stage opens
  its MLflow run strictly (plan_run checks the server), so before each stage — and before the trial's chain
  run — the server is asked once, and when it does not answer the stage runs untracked and the trial says
  so (`tracking_lost`). A stage already running keeps training through an outage (MlflowTracker drops calls).
"""
from __future__ import annotations

from typing import Optional, TextIO

from updetr.config import Experiment, ExperimentConfig, Stage
from updetr.orchestration.stages import RayDriver
from updetr.pipeline import StageResult
from updetr.sweep.spec import EarlyStopping
from updetr.util.streams import STDOUT


def tracking_down(cfg: ExperimentConfig) -> Optional[str]:
    """Why `cfg`'s tracking store cannot be used now (one line), or None when it answers / tracking is off."""
    if not cfg.tracking.enabled:
        return None
    from updetr.tracking import TrackingError, check_tracking_uri, resolve_tracking_uri

    try:
        check_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    except TrackingError as e:
        return str(e)
    return None


def untracked(cfg: ExperimentConfig) -> ExperimentConfig:
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})


def untracked_experiment(exp: Experiment) -> Experiment:
    return Experiment(exp.name, tuple(Stage(s.name, s.action, untracked(s.cfg)) for s in exp.stages), exp.chained)


class TrialDriver(RayDriver):
    """`RayDriver` for the stages of one trial (`exp`: the trial's experiment, `Sweep.trial`)."""

    def __init__(self, exp: Experiment, early_stopping: Optional[EarlyStopping], out: TextIO = STDOUT) -> None:
        super().__init__(None, out)          # the trial runs inside the sweep's Ray: join it
        from updetr.sweep.early_stop import watched_stage

        self.early_stopping = early_stopping
        self.stage_of = {s.cfg.name: s.name for s in exp.stages}
        self.watched = watched_stage(exp, early_stopping) if early_stopping is not None else None
        self.tracking_lost: Optional[str] = None

    def stage_hooks(self, cfg: ExperimentConfig) -> tuple[list, bool]:
        stage = self.stage_of.get(cfg.name)
        if self.early_stopping is None or stage is None or stage != self.watched:
            return [], False
        from updetr.sweep.early_stop import epoch_relay

        return [epoch_relay(stage, self.early_stopping)], True

    def _tracked(self, cfg: ExperimentConfig) -> ExperimentConfig:
        reason = tracking_down(cfg)
        if reason is None:
            return cfg
        self.tracking_lost = reason
        print(f"[{cfg.name}] note: {reason}; this stage runs untracked", file=self.out, flush=True)
        return untracked(cfg)

    def train(self, cfg: ExperimentConfig, parent_run_id: Optional[str]) -> StageResult:
        return super().train(self._tracked(cfg), parent_run_id)

    def evaluate(self, cfg: ExperimentConfig, checkpoint: str, parent_run_id: Optional[str]) -> StageResult:
        return super().evaluate(self._tracked(cfg), checkpoint, parent_run_id)
