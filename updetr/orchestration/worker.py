"""`train_fn_per_worker`: what every Ray Train worker runs — the engine's `Trainer`, fed by Ray Data.

Per worker: build the `Trainer` on the worker's device (DDP when world_size > 1), restore from
`ray.train.get_checkpoint()` (our checkpoint schema in `checkpoint.pt`, loaded with `weights_only=True`),
and train on `get_dataset_shard("train")` through `iter_worker_batches`. Every `schedule.checkpoint_every`
steps and at the end (the engine's `on_checkpoint`) all ranks call `ray.train.report` — it is a barrier,
so the number of calls must match — and only rank 0 passes the checkpoint. Rank 0 alone owns the tracker:
per-step metrics every `schedule.log_every` steps and per-epoch metrics go to a `MetricLedger` and travel in
the checkpoint that covers them (committed once registered: orchestration/metrics_commit.py); the last
checkpoint is a tag.

Drill hooks: with `UPDETR_WORKER_PID_DIR` set, each worker writes its pid to `<dir>/rank<r>.pid` at start
(tests SIGKILL a real worker process by that pid); `UPDETR_DRILL_KILL=after_report:<rank>:<step>` makes
that worker kill itself right after reporting that step's checkpoint (written, possibly not registered).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from updetr.config import ExperimentConfig, config_from_dict
from updetr.data.skips import split_counts
from updetr.engine import TrainState, Trainer, total_steps
from updetr.metric_ledger import MetricLedger, write_ledger
from updetr.tracking import TAG_LAST_CHECKPOINT, MlflowTracker, NullTracker, Tracker, environment_info

CHECKPOINT_FILE = "checkpoint.pt"


def _write_pid(rank: int) -> None:
    folder = os.environ.get("UPDETR_WORKER_PID_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(folder) / f".rank{rank}.pid.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.replace(Path(folder) / f"rank{rank}.pid")


def _drill_kill(point: str, rank: int, step: int) -> None:
    """Drill hook: `UPDETR_DRILL_KILL=<point>:<rank>:<step>` (with `UPDETR_WORKER_PID_DIR`) SIGKILLs this
    worker there, once (a flag file in the pid dir stops the restarted worker from dying again)."""
    folder = os.environ.get("UPDETR_WORKER_PID_DIR")
    if not folder or os.environ.get("UPDETR_DRILL_KILL") != f"{point}:{rank}:{step}":
        return
    flag = Path(folder) / f"drill-{point}-{rank}-{step}.done"
    if flag.exists():
        return
    flag.write_text(str(os.getpid()))
    os.kill(os.getpid(), 9)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def restore(trainer: Trainer, cfg: ExperimentConfig) -> Optional[int]:
    """Load the latest reported checkpoint into `trainer`; returns its step (None: fresh start)."""
    import ray.train

    from updetr.checkpoint import load_checkpoint
    from updetr.local import check_compatible

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        ckpt = load_checkpoint(path, map_location="cpu")  # weights_only=True inside
        check_compatible(cfg, ckpt, path)
        trainer.load_checkpoint(ckpt)
    from updetr.config import resume_note

    note = resume_note(ckpt.get("config"), cfg, ray.train.get_context().get_world_size())
    if note and ray.train.get_context().get_world_rank() == 0:
        print(f"[{cfg.name}] note: {note}", flush=True)
    return trainer.state.step


def batches_per_epoch(cfg: ExperimentConfig, world_size: int, num_items: Optional[int] = None) -> Optional[int]:
    """Batches per rank per epoch when the source size is known (synthetic: configured; folder / shards:
    counted by the driver's preflight), for the ETA. Bad items still take their row, so they count."""
    n = cfg.data.synthetic_images if cfg.data.source == "synthetic" else num_items
    if not n:
        return None
    per_rank = n // world_size  # streaming_split(equal=True) drops the remainder
    return max(1, -(-per_rank // cfg.data.batch_size))


def _all_ranks_sum(counts: dict[str, float], world_size: int) -> dict[str, float]:
    """Sum a small {name: number} dict over ranks (once per epoch; every rank must call it)."""
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


class RayCallbacks:
    """Engine callbacks of one worker: report/checkpoint on every rank, track and print on rank 0."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int, tracker: Tracker, run_dir: str,
                 total: Optional[int]):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.tracker, self.run_dir, self.total = tracker, run_dir, total
        self.last: dict[str, float] = {}
        # Rank 0's metrics wait here until a checkpoint covers them (exactly-once, updetr/metric_ledger.py).
        self.ledger = MetricLedger()
        self._t0: Optional[float] = None
        self._step0 = 0
        self._reported_step: Optional[int] = None

    def on_step(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.last = dict(metrics)
        if self.rank != 0:
            return
        m = dict(metrics)
        # DDP keeps ranks in lock-step: the job's rate is rank 0's times the number of workers.
        if "images_per_s" in m:
            m["images_per_s_all_workers"] = m["images_per_s"] * self.world_size
        m["epoch"] = float(state.epoch)
        # rank 0's own counts so far this epoch (the epoch metrics below are summed over all ranks)
        dropped, kept = split_counts({k.removeprefix("data/skipped_"): v for k, v in metrics.items()
                                      if k.startswith("data/skipped_")})
        m["data/skipped_total"] = float(sum(dropped.values()))
        m["data/converted_total"] = float(sum(kept.values()))
        self.ledger.add((state.step, state.epoch), m)
        self._progress(state, metrics)

    def _progress(self, state: TrainState, metrics: dict[str, float]) -> None:
        from updetr.local import format_progress

        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, state.step
        eta = None
        if self.total and state.step > self._step0:
            eta = (now - self._t0) / (state.step - self._step0) * (self.total - state.step)
        print(format_progress(self.cfg.name, state, metrics, self.total, eta), flush=True)

    def on_checkpoint(self, state: TrainState, ckpt: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        from updetr.checkpoint import save_checkpoint

        metrics = {"step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                   **{k: v for k, v in self.last.items() if k.startswith("loss")}}
        name = checkpoint_dir_name(state.step)
        if state.step == self._reported_step:
            # The engine saves again at the end when the last periodic checkpoint closed an epoch (same step,
            # epoch + 1). Registering the same directory twice made Ray count it twice and delete the previous
            # checkpoint (num_to_keep=2 kept one). Every rank skips it alike, so report calls stay matched.
            ray.train.report(metrics, checkpoint=None)
            return
        self._reported_step = state.step
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="updetr-ckpt-") as tmp:
            save_checkpoint(ckpt, Path(tmp) / CHECKPOINT_FILE)
            write_ledger(tmp, self.ledger.take(upto=(state.step, state.epoch)))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        _drill_kill("after_report", self.rank, state.step)  # written to storage, maybe not yet registered
        self.tracker.set_tags({TAG_LAST_CHECKPOINT: f"{self.run_dir}/{name}", "updetr.last_checkpoint_step": state.step})

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        skipped = {k: v for k, v in metrics.items() if k.startswith("epoch/skipped_")}
        counts = {"images_per_s": metrics.get("epoch/images_per_s", 0.0), **skipped}
        total = _all_ranks_sum(counts, self.world_size)  # every rank takes part in the gather
        if self.rank != 0:
            return
        m = dict(metrics)
        m.update({k: v for k, v in total.items() if k.startswith("epoch/skipped_")})
        m["epoch/images_per_s_all_workers"] = total.get("images_per_s", 0.0)
        dropped, kept = split_counts({k.removeprefix("epoch/skipped_"): v for k, v in total.items()
                                      if k.startswith("epoch/skipped_")})
        m["epoch/skipped_total"] = float(sum(dropped.values()))    # items dropped, all ranks
        m["epoch/converted_total"] = float(sum(kept.values()))     # items converted / fixed and used, all ranks
        self.ledger.add((state.step, state.epoch), m, step=state.epoch - 1)
        from updetr.local import format_epoch_line

        line = format_epoch_line(self.cfg.name, state.epoch - 1, m, "steps/worker",
                                 m["epoch/images_per_s_all_workers"], "img/s (all workers)")
        print(line, flush=True)


def watched(batches, cfg: ExperimentConfig, rank: int, tracker: Tracker):
    """`batches` behind the stall watchdog: rank 0 says so on the terminal and in MLflow, every rank fails
    after `ray.stall_fail_s` (StallError: the run fails, checkpoints stay)."""
    from updetr.orchestration.watchdog import StallWatchdog, ray_data_report

    def on_warn(message: str) -> None:
        print(f"[{cfg.name}] rank {rank}: {message}", flush=True)
        if rank == 0:
            tracker.set_tags({"updetr.stall": message[:4000]})

    return StallWatchdog(batches, cfg.ray.stall_warn_s, cfg.ray.stall_fail_s, describe=ray_data_report,
                         on_warn=on_warn)


def _tracker(config: dict, rank: int) -> Tracker:
    if rank != 0 or not config.get("tracking_run_id"):
        return NullTracker()
    return MlflowTracker.attach(config["tracking_uri"], config["tracking_run_id"],
                                experiment_name=config.get("experiment"))


def train_fn_per_worker(config: dict) -> dict:
    """Ray Train entry point (`train_loop_config` from `launch.train_loop_config`)."""
    import ray.train
    import ray.train.torch

    from updetr.data.ray_pipeline import iter_worker_batches

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    _write_pid(rank)
    cfg = config_from_dict(config["config"])
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    trainer = Trainer(cfg, device)  # seeds torch / numpy / random with cfg.seed + rank
    resumed_from = restore(trainer, cfg)

    tracker = _tracker(config, rank)
    if rank == 0:
        env = environment_info(device)
        tracker.set_tags({**{f"updetr.env.worker.{k}": v for k, v in env.items()},
                          "updetr.world_size": world_size})
        where = f"resumed from step {resumed_from}" if resumed_from is not None else "from step 0"
        print(f"[{cfg.name}] rank 0/{world_size} on {device}: training {where}", flush=True)
        if resumed_from is not None:
            from updetr.orchestration.metrics_commit import catch_up

            catch_up(tracker)
            tracker.log_metrics({"resume/from_step": resumed_from}, step=resumed_from)

    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int, skip: int):
        return watched(iter_worker_batches(shard, cfg, epoch, skip=skip), cfg, rank, tracker)

    callbacks = RayCallbacks(cfg, rank, world_size, tracker, config["run_dir"],
                             total_steps(cfg, batches_per_epoch(cfg, world_size, config.get("num_items"))))
    state = trainer.fit(epoch_batches, callbacks)
    return {"step": state.step, "epoch": state.epoch, "resumed_from": resumed_from}
