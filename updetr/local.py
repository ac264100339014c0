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

from updetr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from updetr.config import ExperimentConfig, config_to_dict, config_to_yaml
from updetr.engine import TrainState, resolve_device
from updetr.runner import (AllWorkers, CallbackList, LocalCheckpoint, Progress, Tracking, WrappedBatches,
                           check_compatible,
                           evaluate_weights, expected_total, format_epoch_line, format_progress, setup, train)
from updetr.tasks import get_task
from updetr.tracking import NullTracker, Tracker

__all__ = ["RunDirError", "DebugInterrupted", "run_dir", "run_debug", "eval_local", "check_compatible", "format_progress",
           "format_epoch_line", "open_local_tracking"]


class RunDirError(RuntimeError):
    """The run folder holds work that the requested action would lose or cannot use."""


class DebugInterrupted(RuntimeError):
    """Ctrl-C during `updetr debug`; the message says which checkpoint was written."""


class _StopOnSigint:
    """First Ctrl-C: finish the current step, then stop at the next batch fetch (state consistent, so the
    checkpoint holds exactly the finished steps). A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopOnSigint":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        import signal

        if self.requested:
            signal.default_int_handler(signum, frame)
        self.requested = True

    def watch(self, batches):
        for batch in batches:
            if self.requested:
                raise KeyboardInterrupt
            yield batch
            if self.requested:
                raise KeyboardInterrupt


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
    (the pipeline resolves `previous`).

    Re-runs: like `updetr run`, the same command continues from `<output_dir>/<name>/checkpoints/last.pt`
    when it exists (`resume` is accepted and means the same); `overwrite` starts again from step 0.
    Ctrl-C writes a checkpoint at the last finished step and raises DebugInterrupted.
    """
    task = get_task(cfg)
    cfg = task.prepare()  # data checked (one line) before the model is built: a bad path costs seconds
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    folder = run_dir(cfg)
    ckpt_path = folder / "checkpoints" / "last.pt"
    ckpt = None
    if ckpt_path.exists() and not overwrite:
        ckpt = load_checkpoint(ckpt_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_to_yaml(cfg))

    try:
        trainer, report = setup(cfg, task, device, resume=ckpt, resume_path=str(ckpt_path),
                                init_path=cfg.init.checkpoint)
    except CheckpointError as e:
        if ckpt is None:
            raise
        raise CheckpointError(" ".join(str(e).split()) + "; pass --overwrite to start again, or set "
                              "name=... for a separate run") from None
    if ckpt is not None:
        print(f"[{cfg.name}] resumed from {ckpt_path} at step {trainer.state.step} "
              f"(epoch {trainer.state.epoch}, {trainer.state.step_in_epoch} steps into it); --overwrite starts "
              f"again", file=out)
    if report is not None:
        print(f"[{cfg.name}] {report.describe()}", file=out, flush=True)
    tracker = tracker or open_local_tracking(cfg, folder, parent_run_id)
    total = expected_total(cfg, task)
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in trainer.model.parameters())
    print(f"[{cfg.name}] {cfg.task} on {device}: {n_train:,} of {n_all:,} parameters trainable; "
          f"batch {cfg.data.batch_size}, {total or '?'} steps; run dir {folder}", file=out, flush=True)
    progress = Progress(cfg.name, total, out=out, table=task.format_table)
    tracking = Tracking(tracker, checkpoint_location=lambda s: str(ckpt_path))
    callbacks = CallbackList([AllWorkers(1), progress, LocalCheckpoint(ckpt_path), tracking])
    status = "FAILED"
    stopper = _StopOnSigint()
    try:
        with stopper:
            state = train(trainer, WrappedBatches(task, stopper.watch), callbacks, results_dir=folder / "eval")
        status = "FINISHED"
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt) or stopper.requested):
            raise
        status = "KILLED"
        # The engine only changes its state between steps, so this is the last finished step exactly.
        if trainer.state.step > 0:
            save_checkpoint(trainer.checkpoint(), ckpt_path)
            raise DebugInterrupted(f"interrupted: checkpoint at step {trainer.state.step} (epoch "
                                   f"{trainer.state.epoch}) written to {ckpt_path}; the same command continues "
                                   "it") from None
        raise DebugInterrupted("interrupted before the first step finished; nothing to keep") from None
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
