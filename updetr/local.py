"""`updetr debug` / local `updetr eval`: one stage in this process, no Ray (CPU or one GPU, pdb-friendly).

Writes `<runtime.output_dir>/<name>/config.yaml` and `checkpoints/last.pt` (atomic, every
`schedule.checkpoint_every` steps and at the end); `--resume` continues from that checkpoint. Tracked in
MLflow like `updetr run` (tracking.enabled=false turns it off).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import torch

from updetr.checkpoint import load_checkpoint
from updetr.config import ExperimentConfig, config_to_dict, config_to_yaml
from updetr.engine import TrainState, resolve_device
from updetr.runner import (AllWorkers, CallbackList, LocalCheckpoint, Progress, Tracking, check_compatible,
                           evaluate_weights, expected_total, format_epoch_line, format_progress, setup, train)
from updetr.tasks import get_task
from updetr.tracking import NullTracker, Tracker

__all__ = ["RunDirError", "run_dir", "run_debug", "eval_local", "check_compatible", "format_progress",
           "format_epoch_line", "open_local_tracking"]


class RunDirError(RuntimeError):
    """The run folder holds work that the requested action would lose or cannot use."""


def run_dir(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.runtime.output_dir) / cfg.name).resolve()


def open_local_tracking(cfg: ExperimentConfig, folder: Path, parent_run_id: Optional[str] = None,
                        extra_tags: Optional[dict] = None) -> Tracker:
    """The stage's MLflow run (found again by name + folder on a re-run); NullTracker when disabled."""
    if not cfg.tracking.enabled:
        return NullTracker()
    from updetr.tracking import resolve_tracking_uri, start_tracking

    tags = dict(extra_tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return start_tracking(True, resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment or cfg.name,
                          cfg.name, str(folder), config_to_dict(cfg), config_to_yaml(cfg), extra_tags=tags)


@dataclass
class DebugOutcome:
    state: TrainState
    progress: Progress
    checkpoint: Path
    eval_metrics: Optional[dict] = None
    tracker: Tracker = field(default_factory=NullTracker)

    # (state, callbacks) unpacking, as before the runner existed
    def __iter__(self):
        return iter((self.state, self.progress))


def run_debug(cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False, out: TextIO = sys.stdout,
              parent_run_id: Optional[str] = None, tracker: Optional[Tracker] = None) -> DebugOutcome:
    """Train `cfg` in this process (its task decides model and data). `init.checkpoint` must be a path here
    (the pipeline resolves `previous`)."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    task = get_task(cfg)
    device = resolve_device(cfg.runtime.device)
    folder = run_dir(cfg)
    ckpt_path = folder / "checkpoints" / "last.pt"
    ckpt = None
    if ckpt_path.exists():
        if resume:
            ckpt = load_checkpoint(ckpt_path)
        elif not overwrite:
            raise RunDirError(f"{ckpt_path} already holds a checkpoint of '{cfg.name}'; pass --resume to continue "
                              "it or --overwrite to start again (set name=... for a separate run)")
    elif resume:
        print(f"[{cfg.name}] --resume: no checkpoint at {ckpt_path}, starting from step 0", file=out)
    cfg = task.prepare()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_to_yaml(cfg))

    trainer, report = setup(cfg, task, device, resume=ckpt, resume_path=str(ckpt_path),
                            init_path=cfg.init.checkpoint)
    if ckpt is not None:
        print(f"[{cfg.name}] resumed from {ckpt_path} at step {trainer.state.step} "
              f"(epoch {trainer.state.epoch}, {trainer.state.step_in_epoch} steps into it)", file=out)
    if report is not None:
        print(f"[{cfg.name}] {report.describe()}", file=out, flush=True)
    tracker = tracker or open_local_tracking(cfg, folder, parent_run_id)
    total = expected_total(cfg, task)
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in trainer.model.parameters())
    print(f"[{cfg.name}] {cfg.task} on {device}: {n_train:,} of {n_all:,} parameters trainable; "
          f"batch {cfg.data.batch_size}, {total or '?'} steps; run dir {folder}", file=out, flush=True)
    progress = Progress(cfg.name, total, out=out)
    tracking = Tracking(tracker, checkpoint_location=lambda s: str(ckpt_path))
    callbacks = CallbackList([AllWorkers(1), progress, LocalCheckpoint(ckpt_path), tracking])
    status = "FAILED"
    try:
        state = train(trainer, task, callbacks, results_dir=folder / "eval")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            tracker.end(status)
    tracker.end("FINISHED")
    print(f"[{cfg.name}] done at step {state.step} (epoch {state.epoch}); checkpoint {ckpt_path}", file=out)
    last = trainer.last_eval[1] if trainer.last_eval else None
    return DebugOutcome(state, progress, ckpt_path, last, tracker)


def eval_local(cfg: ExperimentConfig, checkpoint: str | Path, *, out: TextIO = sys.stdout,
               results_path: Optional[Path] = None) -> dict[str, float]:
    """Score the model weights of `checkpoint` on the task's evaluation split in this process."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    task = get_task(cfg)
    if not task.has_eval:
        raise RunDirError(f"task '{cfg.task}' has no evaluation split (evaluate a detect experiment)")
    cfg = task.prepare()
    task.evaluator()  # the evaluation split is read (and refused when unusable) before any weights load
    device = resolve_device(cfg.runtime.device)
    model, _, post = task.build()
    report = task.init_weights(model, load_checkpoint(checkpoint), str(checkpoint))
    if report.reinitialised:
        raise RunDirError(f"{checkpoint}: holds no trained detection head ({report.describe()}); evaluate a "
                          "fine-tuned checkpoint")
    model.to(device)
    return evaluate_weights(task, model, post, device, results_path=results_path, precision=cfg.runtime.precision)
