"""The Ray side of chained experiments: each stage of `updetr run` is one Ray Train run (see
updetr/pipeline.py for the chain itself: skipping finished stages, MLflow parent and children)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, TextIO

from updetr.config import ExperimentConfig
from updetr.pipeline import StageResult
from updetr.util.streams import STDOUT


class RayDriver:
    """Stages as Ray Train runs (one `TorchTrainer` each) on the Ray at `address` (or a local one)."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, out: TextIO = STDOUT) -> None:
        self.address, self.out = address, out

    def stage_hooks(self, cfg: ExperimentConfig) -> tuple[list, bool]:
        """(extra Train callbacks, report every epoch) for a training stage; a sweep's early stopping
        overrides this (updetr/sweep/early_stop.py)."""
        return [], False

    def train(self, cfg: ExperimentConfig, parent_run_id: Optional[str]) -> StageResult:
        from updetr.orchestration.launch import run, summary
        from updetr.orchestration.run_plan import CHECKPOINT_FILE, LaunchError

        callbacks, report_epochs = self.stage_hooks(cfg)
        outcome = run(cfg, address=self.address, out=self.out, parent_run_id=parent_run_id,
                      callbacks=callbacks, report_epochs=report_epochs)
        print(summary(outcome), file=self.out, flush=True)
        if not outcome.checkpoint:
            raise LaunchError(f"stage {cfg.name} finished without a checkpoint in {outcome.plan.run_dir}")
        ckpt = outcome.checkpoint
        ckpt = f"{ckpt.rstrip('/')}/{CHECKPOINT_FILE}" if "://" in ckpt else str(Path(ckpt) / CHECKPOINT_FILE)
        return StageResult(ckpt, outcome.eval_metrics or {}, outcome.tracker.run_id)

    def evaluate(self, cfg: ExperimentConfig, checkpoint: str, parent_run_id: Optional[str]) -> StageResult:
        from updetr.orchestration.launch import run_eval
        from updetr.tasks import get_task

        metrics, run_id = run_eval(cfg, checkpoint, address=self.address, parent_run_id=parent_run_id, out=self.out)
        print(get_task(cfg).format_table(metrics, f"[{cfg.name}] {checkpoint}: {int(metrics['images'])} images"),
              file=self.out, flush=True)
        return StageResult(None, metrics, run_id)
