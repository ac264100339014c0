"""`train_fn_per_worker`: what every Ray Train worker runs — the shared runner (updetr/runner.py) with the
stage's task, plus the Ray report callback.

Per worker: build the `Trainer` on the worker's device (DDP when world_size > 1), restore from
`ray.train.get_checkpoint()` (our checkpoint schema in `checkpoint.pt`, loaded with `weights_only=True`)
or initialise from `init.checkpoint`, and train on the task's batches: pre-training reads
`get_dataset_shard("train")` (Ray Data), detection reads this rank's part of the dataset. Every
`schedule.checkpoint_every` steps and at the end (the engine's `on_checkpoint`) all ranks call
`ray.train.report` — it is a barrier, so the number of calls must match — and only rank 0 passes the
checkpoint. Rank 0 alone owns the tracker. With `action: eval` the workers only score the weights of
`checkpoint` (each rank its part of the evaluation split, rank 0 gathers) and report the metrics once.

Drill hook: with `UPDETR_WORKER_PID_DIR` set, each worker writes its pid to `<dir>/rank<r>.pid` at start
(tests SIGKILL a real worker process by that pid).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from updetr.config import ExperimentConfig, config_from_dict
from updetr.engine import TrainState
from updetr.runner import (AllWorkers, Callback, CallbackList, Progress, Tracking, evaluate_weights,
                           expected_total, setup, train)
from updetr.tasks import get_task
from updetr.tracking import MlflowTracker, NullTracker, Tracker, environment_info

CHECKPOINT_FILE = "checkpoint.pt"


def _write_pid(rank: int) -> None:
    folder = os.environ.get("UPDETR_WORKER_PID_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(folder) / f".rank{rank}.pid.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.replace(Path(folder) / f"rank{rank}.pid")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def latest_checkpoint() -> tuple[Optional[dict], str]:
    """The latest reported checkpoint of this run (our schema) and where it was, or (None, '')."""
    import ray.train

    from updetr.checkpoint import load_checkpoint

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, ""
    with checkpoint.as_directory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        return load_checkpoint(path, map_location="cpu"), str(path)  # weights_only=True inside


class RayReport(Callback):
    """`ray.train.report` on every rank at each checkpoint (rank 0 attaches the checkpoint dir); the last
    eval metrics ride along, so the final report carries them."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.last: dict[str, float] = {}
        self.eval: dict[str, float] = {}

    def on_step(self, state, metrics):
        self.last = dict(metrics)

    def on_eval(self, state, metrics):
        self.eval = {f"eval/{k}": float(v) for k, v in metrics.items()}

    def on_checkpoint(self, state: TrainState, ckpt: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        from updetr.checkpoint import save_checkpoint

        metrics = {"step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                   **{k: v for k, v in self.last.items() if k.startswith("loss")}, **self.eval}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="updetr-ckpt-") as tmp:
            save_checkpoint(ckpt, Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(state.step))


def _tracker(config: dict, rank: int) -> Tracker:
    if rank != 0 or not config.get("tracking_run_id"):
        return NullTracker()
    return MlflowTracker.attach(config["tracking_uri"], config["tracking_run_id"],
                                experiment_name=config.get("experiment"))


def _local_dir(run_dir: str) -> Optional[Path]:
    return None if "://" in run_dir else Path(run_dir)


def _evaluate_only(cfg: ExperimentConfig, config: dict, rank: int, world_size: int, device) -> dict:
    import ray.train

    from updetr.checkpoint import load_checkpoint

    task = get_task(cfg)
    model, _, post = task.build()
    task.init_weights(model, load_checkpoint(config["checkpoint"]), config["checkpoint"])
    model.to(device)
    folder = _local_dir(config["run_dir"])
    metrics = evaluate_weights(task, model, post, device, rank=rank, world_size=world_size,
                               results_path=folder / "detections.json" if folder else None,
                               precision=cfg.runtime.precision)
    tracker = _tracker(config, rank)
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    ray.train.report({f"eval/{k}": float(v) for k, v in metrics.items()}, checkpoint=None)
    return {"eval": metrics}


def train_fn_per_worker(config: dict) -> dict:
    """Ray Train entry point (`train_loop_config` from `launch.train_loop_config`)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    _write_pid(rank)
    cfg = config_from_dict(config["config"])
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.get("action") == "eval":
        return _evaluate_only(cfg, config, rank, world_size, device)

    task = get_task(cfg)
    resume, resume_path = latest_checkpoint()
    trainer, report = setup(cfg, task, device, resume=resume, resume_path=resume_path,
                            init_path=cfg.init.checkpoint)
    resumed_from = trainer.state.step if resume is not None else None

    tracker = _tracker(config, rank)
    if rank == 0:
        env = environment_info(device)
        tracker.set_tags({**{f"updetr.env.worker.{k}": v for k, v in env.items()},
                          "updetr.world_size": world_size})
        where = f"resumed from step {resumed_from}" if resumed_from is not None else "from step 0"
        print(f"[{cfg.name}] rank 0/{world_size} on {device}: training {where}", flush=True)
        if report is not None:
            print(f"[{cfg.name}] {report.describe()}", flush=True)
        if resumed_from is not None:
            tracker.log_metrics({"resume/from_step": resumed_from}, step=resumed_from)

    shard = ray.train.get_dataset_shard("train") if config.get("ray_data") else None
    run_dir = config["run_dir"]
    folder = _local_dir(run_dir)
    callbacks = CallbackList([
        AllWorkers(world_size),
        Progress(cfg.name, expected_total(cfg, task, world_size, ray=True), rank, world_size),
        Tracking(tracker, rank, checkpoint_location=lambda s: f"{run_dir}/{checkpoint_dir_name(s.step)}"),
        RayReport(rank),
    ])
    state = train(trainer, task, callbacks, rank=rank, world_size=world_size, shard=shard,
                  results_dir=folder / "eval" if folder else None)
    last_eval = trainer.last_eval[1] if trainer.last_eval else None
    return {"step": state.step, "epoch": state.epoch, "resumed_from": resumed_from, "eval": last_eval}
