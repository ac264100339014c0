"""`updetr debug` / local `updetr eval`: one stage in this process, no Ray (CPU or one GPU, pdb-friendly).

Writes `<runtime.output_dir>/<name>/config.yaml` and its newest `schedule.keep_checkpoints` checkpoints in
`checkpoints/` (atomic, with checksums, every `schedule.checkpoint_every` steps and at the end; `last.pt` is
the newest, see updetr/checkpoint_files.py); a re-run continues from the newest intact one. Tracked in MLflow
like `updetr run` (tracking.enabled=false turns it off), each step once (the metric ledger).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import torch

from updetr.checkpoint import CheckpointError, load_checkpoint
from updetr.checkpoint_files import LAST, newest_intact
from updetr.checkpoint_files import clear as clear_checkpoints
from updetr.config import ExperimentConfig, config_to_dict, config_to_yaml
from updetr.engine import TrainState
from updetr.engine_setup import resolve_device
from updetr.metric_ledger import MetricLedger, commit
from updetr.runner import (AllWorkers, CallbackList, LedgerTracking, LocalCheckpoint, Progress, WrappedBatches,
                           check_compatible,
                           evaluate_weights, expected_total, format_epoch_line, format_progress, setup, train)
from updetr.tasks import get_task
from updetr.tracking import NullTracker, Tracker
from updetr.util.streams import STDOUT

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
    from updetr.data.subset import log_subset

    tracker = start_tracking(True, resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment or cfg.name,
                             cfg.name, str(folder), config_to_dict(cfg), config_to_yaml(cfg), extra_tags=tags)
    log_subset(tracker, cfg)
    return tracker


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


def run_debug(cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False, out: TextIO = STDOUT,
              parent_run_id: Optional[str] = None, tracker: Optional[Tracker] = None) -> DebugOutcome:
    """Train `cfg` in this process (its task decides model and data). `init.checkpoint` must be a path here
    (the pipeline resolves `previous`).

    Re-runs: like `updetr run`, the same command continues from the newest intact checkpoint of
    `<output_dir>/<name>/checkpoints/` (`last.pt`; `resume` is accepted and means the same); `overwrite` starts
    again from step 0. Ctrl-C writes a checkpoint at the last finished step and raises DebugInterrupted.
    The run is held for the whole call (updetr/run_lock.py): a second driver of the same run is refused
    (RunInUse) before anything is written.
    """
    from updetr.run_lock import hold_run

    with hold_run(run_dir(cfg), f"run '{cfg.name}'"):
        return _run_debug(cfg, overwrite=overwrite, out=out, parent_run_id=parent_run_id, tracker=tracker)


def _resume_point(cfg: ExperimentConfig, ckpt_dir: Path, out: TextIO) -> tuple[Optional[dict], Path]:
    """The newest intact checkpoint and its file (None: a fresh run); damaged newer ones reported in one
    line each."""
    found = newest_intact(ckpt_dir)
    if found.path is None and found.damaged:
        what = "; ".join(f"{p.name}: {why}" for p, why in found.damaged)
        raise RunDirError(f"no intact checkpoint in {ckpt_dir} ({what}); pass --overwrite to start again from "
                          f"step 0, or set name=... for a separate run")
    for i, (path, why) in enumerate(found.damaged):
        alias = f" (= {LAST})" if found.last_damaged and i == 0 and path.name != LAST else ""
        print(f"[{cfg.name}] checkpoint {path}{alias} is damaged ({why}); moved aside as {path.name}.damaged, "
              f"resuming from {found.path.name} (step {found.ckpt['step']}), the newest intact one",
              file=out, flush=True)
    return found.ckpt, found.path or ckpt_dir / LAST


def _run_debug(cfg: ExperimentConfig, *, overwrite: bool, out: TextIO, parent_run_id: Optional[str],
               tracker: Optional[Tracker]) -> DebugOutcome:
    task = get_task(cfg)
    cfg = task.prepare()  # data checked (one line) before the model is built: a bad path costs seconds
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    folder = run_dir(cfg)
    ckpt_dir = folder / "checkpoints"
    ckpt_path = ckpt_dir / LAST
    ckpt, resume_path = (None, ckpt_path) if overwrite else _resume_point(cfg, ckpt_dir, out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_to_yaml(cfg))

    try:
        trainer, report = setup(cfg, task, device, resume=ckpt, resume_path=str(resume_path),
                                init_path=cfg.init.checkpoint)
    except CheckpointError as e:
        if ckpt is None:
            raise
        raise CheckpointError(" ".join(str(e).split()) + "; pass --overwrite to start again, or set "
                              "name=... for a separate run") from None
    if overwrite:
        clear_checkpoints(ckpt_dir)  # only once the new run is known to start: a refusal above keeps them
    if ckpt is not None:
        print(f"[{cfg.name}] resumed from {resume_path} at step {trainer.state.step} "
              f"(epoch {trainer.state.epoch}, {trainer.state.step_in_epoch} steps into it); --overwrite starts "
              f"again", file=out)
    if report is not None:
        print(f"[{cfg.name}] {report.describe()}", file=out, flush=True)
    tracker = tracker or open_local_tracking(cfg, folder, parent_run_id)
    if ckpt is not None and ckpt.get("metric_ledger"):
        commit(ckpt["metric_ledger"], tracker)  # a driver killed between saving and committing: catch up
    total = expected_total(cfg, task)
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in trainer.model.parameters())
    print(f"[{cfg.name}] {cfg.task} on {device}: {n_train:,} of {n_all:,} parameters trainable; "
          f"batch {cfg.data.batch_size}, {total or '?'} steps; run dir {folder}", file=out, flush=True)
    progress = Progress(cfg.name, total, out=out, table=task.format_table)
    ledger = MetricLedger()  # metrics reach MLflow with the checkpoint that covers them: each step once
    tracking = LedgerTracking(tracker, ledger, checkpoint_location=lambda s: str(ckpt_path))
    saver = LocalCheckpoint(ckpt_dir, cfg.schedule.keep_checkpoints, ledger=ledger, tracker=tracker)
    callbacks = CallbackList([AllWorkers(1), progress, saver, tracking])  # the tag names a file on disk
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
            saver.save(trainer.state, trainer.checkpoint())
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


def eval_local(cfg: ExperimentConfig, checkpoint: str | Path, *, out: TextIO = STDOUT,
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
