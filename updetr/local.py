"""`updetr debug`: the training engine in one process, no Ray: CPU or one GPU, pdb-friendly.

Writes `<runtime.output_dir>/<name>/config.yaml` and `checkpoints/last.pt` (atomic, every
`schedule.checkpoint_every` steps and at the end); `--resume` continues from that checkpoint.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import torch

from updetr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from updetr.config import RUN_LENGTH_FIELDS, ExperimentConfig, config_to_yaml, identity_diff
from updetr.engine import Trainer, TrainState, format_eta, resolve_device, total_steps

# Sections that change the network's shape or the pretext; resuming across a change is refused.
ARCH_SECTIONS = ("model", "pretext")


class RunDirError(RuntimeError):
    """The run folder holds work that the requested action would lose or cannot use."""


def run_dir(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.runtime.output_dir) / cfg.name).resolve()


def check_compatible(cfg: ExperimentConfig, ckpt: dict, path: Path) -> None:
    """Fail loudly when a checkpoint was trained with other settings that change the arithmetic
    (architecture, precision, data, loss, ...: `config.identity_fields`); only the run length may grow."""
    diffs = identity_diff(ckpt.get("config"), cfg, ignore=RUN_LENGTH_FIELDS)
    if diffs:
        what = ("the architecture differs" if any(d.startswith(ARCH_SECTIONS) for d in diffs)
                else "settings that change the arithmetic differ")
        raise CheckpointError(f"{path}: cannot resume, {what}:\n  " + "\n  ".join(diffs))


def format_progress(name: str, state: TrainState, metrics: dict[str, float], total: Optional[int],
                    eta_s: Optional[float]) -> str:
    """One progress line: step, loss parts, speed, lr, ETA."""
    parts = [f"{k.removeprefix('loss_')} {metrics[k]:.3f}"
             for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_feature") if k in metrics]
    step = f"{state.step}/{total}" if total else str(state.step)
    eta = format_eta(eta_s) if eta_s is not None else "?"
    return (f"[{name}] step {step} ep {state.epoch} | loss {metrics['loss']:.3f} ({' '.join(parts)}) | "
            f"{metrics.get('steps_per_s', 0):.2f} step/s {metrics.get('images_per_s', 0):.1f} img/s | "
            f"lr {metrics.get('lr', 0):.1e} | ETA {eta}")


def format_epoch_line(name: str, epoch: int, metrics: dict[str, float], steps_label: str, images_per_s: float,
                      speed_label: str) -> str:
    """The end-of-epoch summary: steps, mean loss, speed, and bad items skipped by reason."""
    from updetr.data.skips import split_counts

    events = {k.removeprefix("epoch/skipped_"): v for k, v in metrics.items()
              if k.startswith("epoch/skipped_") and k not in ("epoch/skipped_total", "epoch/converted_total")}
    dropped, kept = split_counts(events)
    line = (f"[{name}] epoch {epoch} done: {int(metrics.get('epoch/steps', 0))} {steps_label}, "
            f"mean loss {metrics.get('epoch/loss', float('nan')):.3f}, {images_per_s:.1f} {speed_label}")
    if dropped:
        line += f", skipped {sum(dropped.values())} bad (" + ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())) + ")"
    if kept:
        line += f", converted/fixed {sum(kept.values())} (" + ", ".join(
            f"{n} {r.removeprefix('converted_')}" for r, n in sorted(kept.items())) + ")"
    return line


@dataclass
class LocalCallbacks:
    """Progress lines and atomic checkpoints for a single-process run."""

    cfg: ExperimentConfig
    ckpt_path: Path
    total: Optional[int]
    out: TextIO = sys.stdout
    history: list = field(default_factory=list)  # (step, loss) pairs, for the final summary
    _t0: float = field(default_factory=time.perf_counter)
    _step0: Optional[int] = None

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self._step0 is None:
            self._step0, self._t0 = state.step, time.perf_counter()
        self.history.append((state.step, metrics["loss"]))
        eta = None
        done = state.step - self._step0
        if self.total and done > 0:
            eta = (time.perf_counter() - self._t0) / done * (self.total - state.step)
        print(format_progress(self.cfg.name, state, metrics, self.total, eta), file=self.out, flush=True)

    def on_checkpoint(self, state: TrainState, ckpt: dict) -> None:
        save_checkpoint(ckpt, self.ckpt_path)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        print(format_epoch_line(self.cfg.name, state.epoch - 1, metrics, "steps", metrics["epoch/images_per_s"],
                                "img/s"), file=self.out, flush=True)


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


def run_debug(cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False,
              out: TextIO = sys.stdout) -> tuple[TrainState, LocalCallbacks]:
    """Train `cfg` in this process. Returns the final state and the callbacks (loss history).

    Re-runs: like `updetr run`, the same command continues from `<output_dir>/<name>/checkpoints/last.pt`
    when it exists (`resume` is accepted and means the same); `overwrite` starts again from step 0.
    Ctrl-C writes a checkpoint at the last finished step and raises DebugInterrupted.
    """
    from updetr.data import local_pretrain_batches
    from updetr.data.preflight import DataSourceError, check_source

    if cfg.stage != "pretrain":
        raise NotImplementedError("updetr debug runs pre-training; fine-tuning lands with the detection engine")
    try:
        num_items = check_source(cfg)  # before the model is built: a bad path costs seconds
    except DataSourceError as e:
        raise RunDirError(str(e)) from None
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    folder = run_dir(cfg)
    ckpt_path = folder / "checkpoints" / "last.pt"
    ckpt = None
    if ckpt_path.exists() and not overwrite:
        ckpt = load_checkpoint(ckpt_path)
        try:
            check_compatible(cfg, ckpt, ckpt_path)
        except CheckpointError as e:
            raise CheckpointError(" ".join(str(e).split()) + "; pass --overwrite to start again, or set "
                                  "name=... for a separate run") from None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_to_yaml(cfg))

    trainer = Trainer(cfg, device)  # seeds torch / numpy / random with cfg.seed (+ rank 0)
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        print(f"[{cfg.name}] resumed from {ckpt_path} at step {trainer.state.step} "
              f"(epoch {trainer.state.epoch}, {trainer.state.step_in_epoch} steps into it); --overwrite starts "
              f"again", file=out)
    stopper = _StopOnSigint()

    def epoch_batches(epoch: int, skip: int):
        return stopper.watch(local_pretrain_batches(cfg, epoch, skip=skip))

    per_epoch = math.ceil(num_items / cfg.data.batch_size) if num_items else None
    total = total_steps(cfg, per_epoch)
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in trainer.model.parameters())
    print(f"[{cfg.name}] {cfg.stage} on {device}: {n_train:,} of {n_all:,} parameters trainable; "
          f"batch {cfg.data.batch_size}, {total or '?'} steps; run dir {folder}", file=out, flush=True)
    callbacks = LocalCallbacks(cfg, ckpt_path, total, out)
    try:
        with stopper:
            state = trainer.fit(epoch_batches, callbacks)
    except BaseException as e:
        if not (isinstance(e, KeyboardInterrupt) or stopper.requested):
            raise
        # The engine only changes its state between steps, so this is the last finished step exactly.
        state = trainer.state
        if state.step > 0:
            save_checkpoint(trainer.checkpoint(), ckpt_path)
            raise DebugInterrupted(f"interrupted: checkpoint at step {state.step} (epoch {state.epoch}) written "
                                   f"to {ckpt_path}; the same command continues it") from None
        raise DebugInterrupted("interrupted before the first step finished; nothing to keep") from None
    print(f"[{cfg.name}] done at step {state.step} (epoch {state.epoch}); checkpoint {ckpt_path}", file=out)
    return state, callbacks
