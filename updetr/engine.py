"""The pure training engine: one train step, the epoch loop, evaluation, schedule, checkpoint state.
Per-process set-up (device, seeds, RNG state, optimizer, compile) is in `updetr/engine_setup.py`.

Knows nothing about Ray or MLflow: `updetr debug` (updetr/local.py) and the Ray Train workers
(updetr/orchestration/worker.py) drive the same `Trainer` and plug in their own callbacks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn

from updetr.checkpoint import make_checkpoint, strip_prefixes
from updetr.config import ExperimentConfig, config_to_dict
from updetr.engine_setup import (autocast_context, build_optimizer, compile_model, dist_rank_world,
                                 freeze_heads_without_loss, move_targets, rng_state, seed_process,
                                 route_torch_logs, set_rng_state, set_tf32, use_compile, use_fused_adamw)
from updetr.provenance import git_sha
from updetr.util.nested_tensor import NestedTensor

EpochBatches = Callable[[int, int], Iterable[dict]]
"""`epoch_batches(epoch, skip)`: the batches of one epoch for this process, the first `skip` left out."""

# Per-step metrics that are loss terms of the last decoder layer (unweighted), logged by name.
MAIN_LOSSES = ("loss_ce", "loss_bbox", "loss_giou", "loss_feature", "loss_mask", "loss_dice")


@dataclass
class TrainState:
    """Where training stands: optimizer steps taken, current epoch, and batches of it consumed.

    `step_in_epoch` counts every batch the epoch's iterator yielded, including empty ones (all items bad),
    so that a resume can skip exactly those batches.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


@dataclass
class EpochTally:
    """Running sums of the current epoch on this rank: per-step metric sums, optimizer steps, bad items by
    reason. Saved in checkpoints, so the summary of an epoch resumed mid-way still covers all of it."""

    sums: dict = field(default_factory=dict)
    steps: int = 0
    skipped: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "steps": int(self.steps), "skipped": dict(self.skipped)}

    @classmethod
    def from_state(cls, state: dict) -> "EpochTally":
        return cls(dict(state.get("sums", {})), int(state.get("steps", 0)), dict(state.get("skipped", {})))


class Callbacks(Protocol):
    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, state: TrainState, ckpt: dict) -> None: ...
    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...
    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None: ...


EvaluateFn = Callable[[], dict]
"""`evaluate_fn()`: evaluate the current weights (every rank calls it), returns `evaluate`'s metrics."""


@torch.no_grad()
def evaluate(model: nn.Module, postprocessors: dict, batches: Iterable[dict], evaluator, *,
             device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Run `model` in eval mode over this process's evaluation batches and score them (DETR's evaluate).

    Args:
        model: the bare model (not the DDP wrapper: evaluation needs no gradient sync).
        postprocessors: the task's postprocessors (`{'bbox': PostProcess}`, + 'segm' / 'panoptic').
        batches: batch dicts of this rank's part of the evaluation split.
        evaluator: accumulator with `add_batch(outputs, targets, postprocessors)`, `state()`, `merge(parts)`,
            `summarize() -> dict` (updetr.eval.CocoEvaluator, PanopticEvaluator).
    Returns:
        the evaluator's metrics (AP, AP50, ...) plus `images` (all ranks), `seconds` (this rank's forward
        passes) and `gather_seconds`. Under torch.distributed every rank must call this; rank 0 merges
        the parts, scores once and every rank returns the same numbers.
    """
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    n_images = 0
    try:
        for batch in batches:
            targets = batch["targets"]
            if not targets:
                continue
            samples = NestedTensor(batch["images"].to(device), batch["mask"].to(device))
            patches = batch.get("patches")  # query patches of tasks that take them (one-shot)
            with autocast_context(precision, device):
                outputs = model(samples, patches.to(device)) if patches is not None else model(samples)
            # the evaluator post-processes (boxes; masks and segment maps for panoptic) and accumulates
            evaluator.add_batch(_to_float(outputs), targets, postprocessors)
            n_images += len(targets)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    rank, world = dist_rank_world()
    t1 = time.perf_counter()
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, evaluator.state())
        evaluator.merge(parts)
        counts = [len(p[0]) for p in parts]
    else:
        counts = [n_images]
    gather_seconds = time.perf_counter() - t1
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = evaluator.summarize()
        except Exception as e:  # noqa: BLE001 - carried to every rank so that none waits forever
            box[0] = e
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    metrics = dict(box[0])
    metrics.update({"images": float(sum(counts)), "seconds": seconds, "gather_seconds": gather_seconds})
    return metrics


def train_step(model: nn.Module, criterion: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, *,
               device: torch.device, clip_max_norm: float = 0.1, precision: str = "fp32") -> dict[str, float]:
    """One optimizer step on one batch (the batch dict of updetr/CONTRACTS.md).

    Args:
        batch: images [B,3,H,W], mask [B,H,W] (True = padding), targets (B dicts), patches [B,M,3,P,P]
            for pre-training (absent for detection).
    Returns:
        `loss` (weighted total) and the unweighted last-layer terms `loss_ce`, `loss_bbox`, `loss_giou`,
        `loss_feature` (those computed), plus `grad_norm`; under DDP each the mean over the ranks.
    Raises:
        FloatingPointError: predictions or loss not finite (nothing is stepped).
    """
    model.train()
    criterion.train()
    samples = NestedTensor(batch["images"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True))
    targets = move_targets(batch["targets"], device)
    patches = batch.get("patches")
    with autocast_context(precision, device):
        outputs = model(samples, patches.to(device, non_blocking=True)) if patches is not None else model(samples)
    # The loss is computed in fp32 outside autocast: matching and GIoU are precision-sensitive.
    if precision != "fp32":
        outputs = _to_float(outputs)
    # NaN predictions would otherwise surface as DETR's opaque GIoU assertion inside the matcher.
    # (One host read for both: on a GPU each read waits for the device.)
    if not bool(torch.isfinite(outputs["pred_boxes"]).all() & torch.isfinite(outputs["pred_logits"]).all()):
        raise FloatingPointError("model outputs are not finite (NaN/inf predictions), stopping before the "
                                 "optimizer step; check the inputs, the learning rate and runtime.precision")
    loss_dict = criterion(outputs, targets)
    weights = criterion.weight_dict
    loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm) if clip_max_norm > 0 else None
    # Every logged value in one copy to the host (not a float() per term), read before the optimizer step so
    # that a non-finite loss steps nothing.
    logged = {"loss": loss.detach(), **{k: loss_dict[k].detach() for k in MAIN_LOSSES if k in loss_dict}}
    if grad_norm is not None:
        logged["grad_norm"] = grad_norm
    values = torch.stack([v.double() for v in logged.values()])
    world_size = dist_rank_world()[1]
    if world_size > 1:
        # Averaged over the ranks as the official loop logs them (DETR's reduce_dict): a run on k workers shows
        # the loss of its whole global batch, not rank 0's share, and a non-finite loss on any rank stops all.
        dist.all_reduce(values)
        values = values / world_size
    metrics = dict(zip(logged, values.cpu().tolist()))
    if not math.isfinite(metrics["loss"]):
        terms = {k: float(v) for k, v in loss_dict.items() if k in weights}
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss is not finite ({metrics['loss']}), stopping before the optimizer step; "
                                 f"terms: {terms}")
    optimizer.step()
    return metrics


def _to_float(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_float(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_float(v) for v in obj]
    return obj


class _Throughput:
    """Steps/s and images/s over the window since the last read (so warm-up does not linger)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps, self.images = time.perf_counter(), 0, 0

    def add(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = {"steps_per_s": self.steps / dt, "images_per_s": self.images / dt}
        self.reset()
        return out


class Trainer:
    """Model, criterion, optimizer, LR schedule and progress of one training run.

    Args:
        cfg: the resolved experiment.
        device: where to compute.
        model_bundle: optional `(model, criterion, postprocessors)`; built from `cfg` when None.
    """

    def __init__(self, cfg: ExperimentConfig, device: torch.device, model_bundle=None) -> None:
        self.cfg = cfg
        self.device = device
        self.rank, self.world_size = dist_rank_world()
        seed_process(cfg.seed, self.rank)
        self.git_sha = git_sha()  # once per run: checkpoints must not shell out to git every K steps
        if model_bundle is None:
            from updetr.tasks import get_task  # deferred: keeps `import updetr.engine` light

            model_bundle = get_task(cfg).build()
        model, criterion, self.postprocessors = model_bundle
        self.model = model.to(device)
        self.frozen_heads = freeze_heads_without_loss(self.model, cfg)
        self.criterion = criterion.to(device)
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=use_fused_adamw(cfg, device))
        # StepLR is stepped once per epoch, as the official main.py does (lr_drop in epochs).
        self.lr_scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.schedule.lr_drop)
        self.state = TrainState()
        self.epoch_tally = EpochTally()
        self.train_model: nn.Module = self.model
        if self.world_size > 1:
            # A head whose every loss weighs 0 is frozen by build_model, so each trainable parameter gets a
            # gradient on every step and DDP needs no unused-parameter search.
            ids = [device.index] if device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                                   find_unused_parameters=False)
        set_tf32(cfg.runtime.tf32, device)
        if use_compile(cfg, device):
            # compile notes and torch's warnings go to the run folder's log, not the terminal
            log_name = "torch.log" if self.rank == 0 else f"torch-rank{self.rank}.log"
            route_torch_logs(Path(cfg.runtime.output_dir).resolve() / cfg.name / log_name)
            self.train_model = compile_model(self.train_model)

    def _any_rank_empty(self, n_img: int) -> bool:
        """True when this batch is empty on any rank (all items bad). All ranks then skip the step together:
        a rank that stepped alone would wait forever in DDP's gradient all-reduce."""
        if self.world_size == 1:
            return n_img == 0
        flag = torch.tensor([1.0 if n_img == 0 else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- state -----------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """The run's full state in the schema of updetr/checkpoint.py.

        Under DDP this is a collective (every rank must call it): each rank's RNG state is gathered, so that
        `rng["per_rank"][r]` restores rank r. `rng["torch"]` (rank 0's) keeps single-process files readable.
        """
        mine = {"rng": rng_state(), "epoch_tally": self.epoch_tally.state_dict()}
        per_rank = [mine]
        if self.world_size > 1:
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, mine)
        rngs = [r["rng"] for r in per_rank]
        ckpt = make_checkpoint(
            self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(), step=self.state.step, epoch=self.state.epoch,
            step_in_epoch=self.state.step_in_epoch, config=config_to_dict(self.cfg),
            rng={"torch": rngs[0]["torch"], "per_rank": rngs}, sha=self.git_sha)
        ckpt["epoch_tally"] = [r["epoch_tally"] for r in per_rank]
        return ckpt

    def load_checkpoint(self, ckpt: dict, *, weights_only: bool = False) -> None:
        """Restore from `ckpt`. With `weights_only`, only the model weights (strict) are taken."""
        self.model.load_state_dict(strip_prefixes(ckpt["model"]), strict=True)
        if weights_only:
            return
        if ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            # The config is the source of truth for the schedule (the official resume does the same).
            self.lr_scheduler.step_size = self.cfg.schedule.lr_drop
        self.state = TrainState(ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"])
        rng = ckpt.get("rng") or {}
        per_rank = rng.get("per_rank") or ([{"torch": rng["torch"]}] if "torch" in rng else [])
        if self.rank < len(per_rank):
            set_rng_state(per_rank[self.rank])
        elif per_rank:
            # More ranks than the checkpoint saved (the worker count grew): a fresh, distinct stream.
            seed_process(self.cfg.seed + 1_000_003 * self.state.step, self.rank)
        tallies = ckpt.get("epoch_tally") or []
        self.epoch_tally = EpochTally.from_state(tallies[self.rank]) if self.rank < len(tallies) else EpochTally()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def finished(self) -> bool:
        s = self.cfg.schedule
        return self.state.epoch >= s.epochs or (s.max_steps is not None and self.state.step >= s.max_steps)

    # -- loop ------------------------------------------------------------------------------------
    def _evaluate(self, evaluate_fn: Optional[EvaluateFn], cb) -> None:
        if evaluate_fn is None:
            return
        metrics = evaluate_fn()
        self.last_eval = (self.state.epoch, metrics)
        if cb is not None and hasattr(cb, "on_eval"):
            cb.on_eval(self.state, metrics)

    def fit(self, epoch_batches: EpochBatches, callbacks: Optional[Callbacks] = None,
            evaluate_fn: Optional[EvaluateFn] = None) -> TrainState:
        """Train until `schedule.epochs` or `schedule.max_steps`, resuming from `self.state`.

        `callbacks.on_checkpoint` fires every `schedule.checkpoint_every` steps and once at the end
        (unless the last step was just checkpointed), so an interrupted run loses < K steps.
        `evaluate_fn` (every rank) runs after every `schedule.eval_every`-th epoch and once at the end
        (before the final checkpoint, so the last report carries the final metrics); `on_eval` gets its
        metrics. `on_epoch_end` fires once per epoch, for the run's last epoch too: closed, or, when
        `schedule.max_steps` stops the run inside it, as far as it went (`summary_epoch(state)` names it).
        """
        cb = callbacks
        sched = self.cfg.schedule
        self.last_eval: Optional[tuple[int, dict]] = None
        # (step, epoch) last handed to on_checkpoint: the end state is saved unless it is exactly that one.
        last_ckpt = (self.state.step, self.state.epoch) if self.state.step > 0 else None
        ckpt_due = False  # a periodic checkpoint fell due on the last step
        while not self.finished():
            if self.state.step_in_epoch == 0:
                self.epoch_tally = EpochTally()  # a new epoch; a mid-epoch resume keeps the restored sums
            tally = self.epoch_tally
            epoch_sums, skipped_epoch = tally.sums, tally.skipped
            epoch_images = 0  # this process's images since the (re)start: with epoch_t0, a rate
            throughput = _Throughput()
            epoch_t0 = time.perf_counter()
            skip = self.state.step_in_epoch
            for batch in epoch_batches(self.state.epoch, skip):
                if self.finished():
                    # max_steps was reached and this epoch still has data. Checked once the next batch
                    # came rather than right after the step, so that an epoch ending exactly on max_steps
                    # closes through `else` like any other (its summary once, the next run at a new epoch).
                    break
                if ckpt_due:
                    # The periodic checkpoint of the previous step, taken now that the epoch goes on (see below).
                    ckpt_due = False
                    last_ckpt = self._save(cb)
                skipped = batch.get("skipped") or {}
                for reason, n in skipped.items():
                    skipped_epoch[reason] = skipped_epoch.get(reason, 0) + int(n)
                n_img = int(batch["images"].shape[0])
                if self._any_rank_empty(n_img):
                    self.state.step_in_epoch += 1  # consumed (every item was bad, counted above), not stepped
                    continue
                metrics = train_step(self.train_model, self.criterion, batch, self.optimizer,
                                     device=self.device, clip_max_norm=self.cfg.optim.clip_max_norm,
                                     precision=self.cfg.runtime.precision)
                self.state.step += 1
                self.state.step_in_epoch += 1
                tally.steps += 1
                epoch_images += n_img
                throughput.add(n_img)
                for k, v in metrics.items():
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + v
                if cb is not None and (self.state.step % sched.log_every == 0 or self.state.step == 1):
                    metrics.update(throughput.read())
                    metrics.update({f"data/skipped_{r}": float(n) for r, n in skipped_epoch.items()})
                    metrics["lr"] = self.lr()
                    metrics["images"] = float(n_img)
                    cb.on_step(self.state, metrics)
                # Due now, taken when the next batch arrives or after the epoch closed: a checkpoint on an
                # epoch's last step then holds the closed epoch (its summary metrics included), so that state
                # is saved once, never as two checkpoints of the same step.
                ckpt_due = self.state.step % sched.checkpoint_every == 0
            else:
                # The epoch's data ran out (not a max_steps stop): close the epoch.
                self.lr_scheduler.step()
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                if tally.steps == 0 and skip == 0 and not skipped_epoch:
                    raise RuntimeError(f"epoch {self.state.epoch - 1} yielded no batches: the data source is empty")
                if cb is not None:
                    cb.on_epoch_end(self.state, self._epoch_metrics(tally, epoch_images, epoch_t0))
                if (sched.eval_every and self.state.epoch % sched.eval_every == 0 and not self.finished()):
                    self._evaluate(evaluate_fn, cb)
                if ckpt_due and not self.finished():  # the run's last state is saved below, after the final eval
                    ckpt_due = False
                    last_ckpt = self._save(cb)
                continue
            # Stopped on schedule.max_steps inside the epoch: the run's last epoch is summarised as far as
            # it went (`summary_epoch`); the epoch stays open, so a longer max_steps continues it.
            if cb is not None:
                cb.on_epoch_end(self.state, self._epoch_metrics(tally, epoch_images, epoch_t0))
            break
        if self.last_eval is None or self.last_eval[0] != self.state.epoch or self.state.step_in_epoch:
            self._evaluate(evaluate_fn, cb)
        if (self.state.step, self.state.epoch) != last_ckpt:
            self._save(cb)
        return self.state

    def _epoch_metrics(self, tally: "EpochTally", images: int, t0: float) -> dict[str, float]:
        """The `epoch/*` summary: mean of each step metric over the epoch's steps, speed, steps, lr, skips."""
        em = {f"epoch/{k}": v / max(tally.steps, 1) for k, v in tally.sums.items()}
        em.update({"epoch/images_per_s": images / max(time.perf_counter() - t0, 1e-9),
                   "epoch/steps": float(tally.steps), "epoch/lr": self.lr()})
        em.update({f"epoch/skipped_{r}": float(n) for r, n in tally.skipped.items()})
        return em

    def _save(self, cb: Optional[Callbacks]) -> tuple[int, int]:
        """Hand the current state to `on_checkpoint`; returns the (step, epoch) it saved."""
        if cb is not None:
            cb.on_checkpoint(self.state, self.checkpoint())
        return self.state.step, self.state.epoch


def summary_epoch(state: TrainState) -> int:
    """The epoch an `on_epoch_end` summary is about: the one just closed (`state.epoch - 1`), or the run's
    unfinished last one when it stopped on `schedule.max_steps` inside it (`step_in_epoch > 0`)."""
    return state.epoch if state.step_in_epoch else state.epoch - 1


def total_steps(cfg: ExperimentConfig, batches_per_epoch: Optional[int]) -> Optional[int]:
    """Steps the whole run will take, when knowable (for ETA)."""
    s = cfg.schedule
    per_epoch = s.steps_per_epoch if s.steps_per_epoch is not None else batches_per_epoch
    total = s.epochs * per_epoch if per_epoch is not None else None
    if s.max_steps is not None:
        total = s.max_steps if total is None else min(total, s.max_steps)
    return total


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
