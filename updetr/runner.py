"""One runner for both drivers: set up a stage's `Trainer` from its task, train or evaluate it, and compose
the per-run side effects as callbacks (progress lines, MLflow tracking, local checkpoints; the Ray worker
adds its report callback). `updetr debug` (local.py) and the Ray Train worker (orchestration/worker.py)
both call `setup` + `train` / `evaluate_weights`, so they cannot drift.

Callbacks get every engine event on every rank; the ones with side effects act on rank 0 only.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

import torch

from updetr.data.skips import split_counts
from updetr.checkpoint import CheckpointError, load_checkpoint
from updetr.config import RUN_LENGTH_FIELDS, ExperimentConfig, identity_diff
from updetr.engine import TrainState, Trainer, evaluate, format_eta, summary_epoch, total_steps
from updetr.engine_setup import dist_rank_world, seed_process
from updetr.metric_ledger import MetricLedger, commit
from updetr.tasks import InitReport, Task
from updetr.util.streams import STDOUT

# Sections that change the network's shape or the pretext; resuming across a change is refused.
ARCH_SECTIONS = ("model", "pretext")
TAG_BEST_AP = "updetr.best_AP"


# ------------------------------------------------------------------------------------ formatting
def format_progress(name: str, state: TrainState, metrics: dict[str, float], total: Optional[int],
                    eta_s: Optional[float]) -> str:
    """One progress line: step, loss parts, speed, lr, ETA."""
    parts = [f"{k.removeprefix('loss_')} {metrics[k]:.3f}"
             for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_feature", "loss_mask", "loss_dice") if k in metrics]
    step = f"{state.step}/{total}" if total else str(state.step)
    eta = format_eta(eta_s) if eta_s is not None else "?"
    return (f"[{name}] step {step} ep {state.epoch} | loss {metrics['loss']:.3f} ({' '.join(parts)}) | "
            f"{metrics.get('steps_per_s', 0):.2f} step/s {metrics.get('images_per_s', 0):.1f} img/s | "
            f"lr {metrics.get('lr', 0):.1e} | ETA {eta}")


def format_epoch_line(name: str, epoch: int, metrics: dict[str, float], steps_label: str, images_per_s: float,
                      speed_label: str, partial: bool = False) -> str:
    """The end-of-epoch summary: steps, mean loss, speed, and bad items skipped / converted by reason
    (`partial`: the run stopped on schedule.max_steps inside this epoch)."""
    from updetr.data.skips import split_counts

    events = {k.removeprefix("epoch/skipped_"): v for k, v in metrics.items()
              if k.startswith("epoch/skipped_") and k not in ("epoch/skipped_total", "epoch/converted_total")}
    dropped, kept = split_counts(events)
    end = "stopped at schedule.max_steps" if partial else "done"
    line = (f"[{name}] epoch {epoch} {end}: {int(metrics.get('epoch/steps', 0))} {steps_label}, "
            f"mean loss {metrics.get('epoch/loss', float('nan')):.3f}, {images_per_s:.1f} {speed_label}")
    if dropped:
        line += f", skipped {sum(dropped.values())} bad (" + ", ".join(f"{n} {r}" for r, n in sorted(dropped.items())) + ")"
    if kept:
        line += f", converted/fixed {sum(kept.values())} (" + ", ".join(
            f"{n} {r.removeprefix('converted_')}" for r, n in sorted(kept.items())) + ")"
    return line


def check_compatible(cfg: ExperimentConfig, ckpt: dict, path: Path | str) -> None:
    """Fail loudly when a checkpoint was trained with other settings that change the arithmetic
    (architecture, precision, data, loss, ...: `config.identity_fields`); only the run length may grow."""
    diffs = identity_diff(ckpt.get("config"), cfg, ignore=RUN_LENGTH_FIELDS)
    if diffs:
        what = ("the architecture differs" if any(d.startswith(ARCH_SECTIONS) for d in diffs)
                else "settings that change the arithmetic differ")
        raise CheckpointError(f"{path}: cannot resume, {what}:\n  " + "\n  ".join(diffs))


# ------------------------------------------------------------------------------------- callbacks
class Callback:
    """Engine events (updetr.engine.Callbacks), all optional."""

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, state: TrainState, ckpt: dict) -> None: ...
    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...
    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None: ...


class CallbackList(Callback):
    """Calls each callback in order (earlier ones may add to the metrics dict the later ones see)."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_step(self, state, metrics):
        for c in self.callbacks:
            c.on_step(state, metrics)

    def on_checkpoint(self, state, ckpt):
        for c in self.callbacks:
            c.on_checkpoint(state, ckpt)

    def on_epoch_end(self, state, metrics):
        for c in self.callbacks:
            c.on_epoch_end(state, metrics)

    def on_eval(self, state, metrics):
        for c in self.callbacks:
            c.on_eval(state, metrics)


def _all_ranks_sum(counts: dict[str, float], world_size: int) -> dict[str, float]:
    """Sum a small {name: number} dict over ranks (every rank must call it)."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return dict(counts)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, float] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


class AllWorkers(Callback):
    """Adds the whole job's figures to the metrics (every rank takes part in the once-per-epoch sum):
    `images_per_s_all_workers`, skipped items of all ranks, `data/skipped_total`, `epoch`."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def on_step(self, state, metrics):
        # DDP keeps ranks in lock-step: the job's rate is rank 0's times the number of workers.
        if "images_per_s" in metrics:
            metrics["images_per_s_all_workers"] = metrics["images_per_s"] * self.world_size
        metrics["epoch"] = float(state.epoch)
        # this rank's own counts so far this epoch (the epoch metrics are summed over all ranks)
        dropped, kept = split_counts({k.removeprefix("data/skipped_"): v for k, v in metrics.items()
                                      if k.startswith("data/skipped_")})
        metrics["data/skipped_total"] = float(sum(dropped.values()))
        metrics["data/converted_total"] = float(sum(kept.values()))

    def on_epoch_end(self, state, metrics):
        skipped = {k: v for k, v in metrics.items() if k.startswith("epoch/skipped_")}
        total = _all_ranks_sum({"images_per_s": metrics.get("epoch/images_per_s", 0.0), **skipped},
                               self.world_size)
        metrics.update({k: v for k, v in total.items() if k.startswith("epoch/skipped_")})
        metrics["epoch/images_per_s_all_workers"] = total.get("images_per_s", 0.0)
        dropped, kept = split_counts({k.removeprefix("epoch/skipped_"): v for k, v in total.items()
                                      if k.startswith("epoch/skipped_")})
        metrics["epoch/skipped_total"] = float(sum(dropped.values()))    # items dropped, all ranks
        metrics["epoch/converted_total"] = float(sum(kept.values()))     # items converted / fixed and used


class Progress(Callback):
    """Progress line every `log_every` steps (with ETA), the epoch summary, the COCO table (rank 0)."""

    def __init__(self, name: str, total: Optional[int], rank: int = 0, world_size: int = 1,
                 out: TextIO = STDOUT, *, table: Callable[[dict, str], str]) -> None:
        self.name, self.total, self.rank, self.world_size, self.out = name, total, rank, world_size, out
        self.table = table  # the task's `format_table` (evaluation metrics -> printed table)
        self.history: list[tuple[int, float]] = []  # (step, loss), for summaries
        self._t0: Optional[float] = None
        self._step0 = 0

    def _print(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=self.out, flush=True)

    def on_step(self, state, metrics):
        self.history.append((state.step, metrics["loss"]))
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, state.step
        eta = None
        if self.total and state.step > self._step0:
            eta = (now - self._t0) / (state.step - self._step0) * (self.total - state.step)
        self._print(format_progress(self.name, state, metrics, self.total, eta))

    def on_epoch_end(self, state, metrics):
        epoch, partial = summary_epoch(state), state.step_in_epoch > 0
        if self.world_size > 1:
            line = format_epoch_line(self.name, epoch, metrics, "steps/worker",
                                     metrics.get("epoch/images_per_s_all_workers", 0.0), "img/s (all workers)",
                                     partial)
        else:
            line = format_epoch_line(self.name, epoch, metrics, "steps", metrics["epoch/images_per_s"], "img/s",
                                     partial)
        self._print(line)

    def on_eval(self, state, metrics):
        speed = metrics["images"] / max(metrics["seconds"], 1e-9) * self.world_size
        self._print(self.table(metrics, f"[{self.name}] eval after epoch {state.epoch} (step {state.step}): "
                                          f"{int(metrics['images'])} images, {speed:.1f} img/s"))


class Tracking(Callback):
    """Metrics to the tracker (rank 0): per step, per epoch (step = epoch), `eval/*` with the epoch as
    step, the best AP as a summary metric and tag, the last checkpoint's location as a tag."""

    def __init__(self, tracker, rank: int = 0, checkpoint_location: Optional[Callable[[TrainState], str]] = None):
        self.tracker, self.rank, self.checkpoint_location = tracker, rank, checkpoint_location
        self.best_ap: Optional[float] = None

    def log(self, state: TrainState, metrics: dict, step: int) -> None:
        """Where metrics go (the Ray worker buffers them in its metric ledger instead)."""
        self.tracker.log_metrics(metrics, step=step)

    def on_step(self, state, metrics):
        if self.rank == 0:
            self.log(state, metrics, state.step)

    def on_epoch_end(self, state, metrics):
        if self.rank == 0:
            self.log(state, metrics, summary_epoch(state))

    def on_eval(self, state, metrics):
        if self.rank != 0:
            return
        m = {f"eval/{k}": v for k, v in metrics.items()}
        m["eval/epoch"] = float(state.epoch)
        if "AP" in metrics and (self.best_ap is None or metrics["AP"] > self.best_ap):
            self.best_ap = metrics["AP"]
            m["eval/best_AP"] = self.best_ap
            self.tracker.set_tags({TAG_BEST_AP: f"{self.best_ap:.4f}", "updetr.best_AP_epoch": state.epoch})
        self.log(state, m, state.epoch)

    def on_checkpoint(self, state, ckpt):
        if self.rank == 0 and self.checkpoint_location is not None:
            from updetr.tracking import TAG_LAST_CHECKPOINT

            self.tracker.set_tags({TAG_LAST_CHECKPOINT: self.checkpoint_location(state),
                                   "updetr.last_checkpoint_step": state.step})


class LedgerTracking(Tracking):
    """`Tracking` whose metrics wait in a `MetricLedger` until a checkpoint covers them (exactly-once,
    updetr/metric_ledger.py); tags go to the tracker at once."""

    def __init__(self, tracker, ledger: MetricLedger, rank: int = 0, checkpoint_location=None) -> None:
        super().__init__(tracker, rank, checkpoint_location)
        self.ledger = ledger

    def log(self, state: TrainState, metrics: dict, step: int) -> None:
        self.ledger.add((state.step, state.epoch), metrics, step=step)


class LocalCheckpoint(Callback):
    """Rank 0: the newest `keep` checkpoints in `folder` (checkpoint_files.save: checksums, `last.pt`), every
    `schedule.checkpoint_every` steps and at the end. With a ledger, each checkpoint carries the metrics it
    covers (`metric_ledger`), committed to `tracker` once the file is durable: a run resumed from an older
    checkpoint re-runs steps whose metrics are already committed, and they are not logged twice."""

    def __init__(self, folder: Path, keep: int = 2, rank: int = 0, ledger: Optional[MetricLedger] = None,
                 tracker=None) -> None:
        self.folder, self.keep, self.rank, self.ledger, self.tracker = Path(folder), keep, rank, ledger, tracker

    def on_checkpoint(self, state, ckpt):
        if self.rank == 0:
            self.save(state, ckpt)

    def save(self, state: TrainState, ckpt: dict) -> Path:
        from updetr import checkpoint_files

        part = self.ledger.take(upto=(state.step, state.epoch)) if self.ledger is not None else None
        path = checkpoint_files.save({**ckpt, "metric_ledger": part} if part else ckpt, self.folder, self.keep)
        if part and self.tracker is not None:
            commit(part, self.tracker)
        return path


class WrappedBatches:
    """A task whose train batches pass through `wrap` (Ctrl-C stopper, stall watchdog); all else delegated."""

    def __init__(self, task: Task, wrap: Callable) -> None:
        self._task, self._wrap = task, wrap

    def __getattr__(self, name):
        return getattr(self._task, name)

    def train_batches(self, *args, **kwargs):
        return self._wrap(self._task.train_batches(*args, **kwargs))


# ---------------------------------------------------------------------------------------- stages
def setup(cfg: ExperimentConfig, task: Task, device: torch.device, *, resume: Optional[dict] = None,
          resume_path: str = "", init_path: Optional[str] = None) -> tuple[Trainer, Optional[InitReport]]:
    """The stage's `Trainer`: fresh, resumed from `resume` (a checkpoint of this stage), or initialised
    from the weights at `init_path` through the task's rules (`init.checkpoint`)."""
    rank, _ = dist_rank_world()
    seed_process(cfg.seed, rank)  # the model's initial weights; the Trainer seeds again for training draws
    trainer = Trainer(cfg, device, task.build())
    report = None
    if resume is not None:
        check_compatible(cfg, resume, resume_path)
        trainer.load_checkpoint(resume)
    elif init_path:
        report = task.init_weights(trainer.model, load_checkpoint(init_path), str(init_path))
    return trainer, report


def evaluate_weights(task: Task, model: torch.nn.Module, postprocessors: dict, device: torch.device, *,
                     rank: int = 0, world_size: int = 1, results_path: Optional[Path] = None,
                     precision: str = "fp32") -> dict[str, float]:
    """Score `model` on this rank's part of the task's evaluation split (every rank calls it); rank 0 writes
    the detections as a COCO results JSON to `results_path`."""
    evaluator = task.evaluator()
    metrics = evaluate(model, postprocessors, task.eval_batches(rank, world_size), evaluator, device=device,
                       precision=precision)
    if rank == 0 and results_path is not None:
        evaluator.write_results(results_path)
    return metrics


def train(trainer: Trainer, task: Task, callbacks: Callback, *, rank: int = 0, world_size: int = 1,
          shard: Any = None, results_dir: Optional[Path] = None) -> TrainState:
    """Fit the stage: the task's batches for this rank, evaluation every `schedule.eval_every` epochs and
    at the end when the task has an evaluation split."""
    cfg = trainer.cfg

    def epoch_batches(epoch: int, skip: int):
        return task.train_batches(epoch, skip, rank, world_size, shard)

    evaluate_fn = None
    if task.has_eval:
        def evaluate_fn():
            path = (results_dir / f"detections_epoch{trainer.state.epoch:04d}.json") if results_dir else None
            return evaluate_weights(task, trainer.model, trainer.postprocessors, trainer.device, rank=rank,
                                    world_size=world_size, results_path=path, precision=cfg.runtime.precision)
    return trainer.fit(epoch_batches, callbacks, evaluate_fn)


def expected_total(cfg: ExperimentConfig, task: Task, world_size: int = 1, ray: bool = False) -> Optional[int]:
    return total_steps(cfg, task.batches_per_epoch(world_size, ray=ray))
