"""`train_fn_per_worker`: what every Ray Train worker runs — the shared runner (updetr/runner.py) with the
stage's task, plus the Ray report callback.

Per worker: build the `Trainer` on the worker's device (DDP when world_size > 1), restore from
`ray.train.get_checkpoint()` (our checkpoint schema in `checkpoint.pt`, loaded with `weights_only=True`)
or initialise from `init.checkpoint`, and train on the task's batches: pre-training reads
`get_dataset_shard("train")` (Ray Data), detection reads this rank's part of the dataset. Every
`schedule.checkpoint_every` steps and at the end (the engine's `on_checkpoint`) all ranks call
`ray.train.report` — it is a barrier, so the number of calls must match — and only rank 0 passes the
checkpoint. Rank 0 alone owns the tracker: per-step, per-epoch and eval metrics go to a `MetricLedger` and
travel in the checkpoint that covers them (committed once registered: orchestration/metrics_commit.py), so
each lands in MLflow exactly once; the last checkpoint is a tag. With `action: eval` the workers only score
the weights of `checkpoint` (each rank its part of the evaluation split, rank 0 gathers) and report once.

Drill hooks: with `UPDETR_WORKER_PID_DIR` set, each worker writes its pid to `<dir>/rank<r>.pid` at start
(tests SIGKILL a real worker process by that pid); `UPDETR_DRILL_KILL=after_report:<rank>:<step>` makes
that worker kill itself right after reporting that step's checkpoint (written, possibly not registered).
"""
from __future__ import annotations

from updetr.phases import mark

mark("worker_import_start")  # this module's imports (torch, the engine, the task) in a fresh worker

import os  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from updetr.config import ExperimentConfig, config_from_dict  # noqa: E402
from updetr.engine import TrainState  # noqa: E402
from updetr.metric_ledger import MetricLedger, write_ledger  # noqa: E402
from updetr.runner import (AllWorkers, Callback, CallbackList, LedgerTracking, Progress, WrappedBatches,  # noqa: E402
                           evaluate_weights, expected_total, setup, train)
from updetr.tasks import get_task  # noqa: E402
from updetr.provenance import environment_info  # noqa: E402
from updetr.tracking import MlflowTracker, NullTracker, Tracker  # noqa: E402

mark("worker_import_end")
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
    """`ray.train.report` on every rank at each checkpoint (rank 0 attaches the checkpoint dir with the
    metric ledger's covered entries); the last eval metrics ride along, so the final report carries them.

    With `per_epoch` (a sweep with early stopping), each closed epoch's `epoch/*` metrics and each
    evaluation's `eval/*` are reported too, keyed by `epoch` (epochs done) and listed under `fresh`: the
    per-epoch results a Tune scheduler compares (updetr/sweep/early_stop.py). They ride on the checkpoint
    taken right after the epoch when there is one (so a trial stopped on them has that checkpoint and its
    metrics committed), else go alone at the next logged step."""

    def __init__(self, rank: int, ledger: Optional[MetricLedger] = None, per_epoch: bool = False) -> None:
        self.rank = rank
        self.ledger = ledger if ledger is not None else MetricLedger()
        self.per_epoch = per_epoch
        self.last: dict[str, float] = {}
        self.eval: dict[str, float] = {}
        self.pending: dict[str, float] = {}     # per-epoch results not reported yet

    def _fresh(self) -> dict:
        fresh, self.pending = self.pending, {}
        return {**fresh, "fresh": sorted(fresh)} if fresh else {}

    def on_step(self, state, metrics):
        if not self.last:
            mark("first_step")
        self.last = dict(metrics)
        if self.pending:
            import ray.train

            # Every rank gets here at the same step (report is a barrier); rank 0's metrics are the ones read.
            ray.train.report({"step": state.step, "epoch": state.epoch, **self._fresh()}, checkpoint=None)

    def on_epoch_end(self, state, metrics):
        # A run cut by max_steps inside its last epoch summarises that part too; schedulers compare whole
        # epochs only, so that one is not a per-epoch result.
        if self.per_epoch and not state.step_in_epoch:
            self.pending.update({k: float(v) for k, v in metrics.items()})

    def on_eval(self, state, metrics):
        self.eval = {f"eval/{k}": float(v) for k, v in metrics.items()}
        if self.per_epoch:
            self.pending.update(self.eval)

    def on_checkpoint(self, state: TrainState, ckpt: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        from updetr.checkpoint import save_checkpoint

        metrics = {"step": state.step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                   **{k: v for k, v in self.last.items() if k.startswith("loss")}, **self.eval, **self._fresh()}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        mark("report_start")
        with tempfile.TemporaryDirectory(prefix="updetr-ckpt-") as tmp:
            save_checkpoint(ckpt, Path(tmp) / CHECKPOINT_FILE)
            write_ledger(tmp, self.ledger.take(upto=(state.step, state.epoch)))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(state.step))
        mark("report_end")
        _drill_kill("after_report", self.rank, state.step)  # written to storage, maybe not yet registered


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
    tracker = MlflowTracker.attach(config["tracking_uri"], config["tracking_run_id"],
                                   experiment_name=config.get("experiment"))
    folder = _local_dir(config["run_dir"]) if config.get("run_dir") else None
    if folder is not None:
        from updetr.tracking_spool import attach_spool

        attach_spool(tracker, folder, "rank0")  # tags the server cannot take wait in the run folder
    return tracker


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

    mark("worker_fn")
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
    mark("worker_setup")
    if resume is not None and rank == 0:
        from updetr.config import resume_note

        # each rank's RNG state is saved: their count is the world size that wrote the checkpoint
        saved_world = len((resume.get("rng") or {}).get("per_rank") or []) or None
        note = resume_note(resume.get("config"), cfg, world_size, saved_world)
        if note:
            print(f"[{cfg.name}] note: {note}", flush=True)

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
            from updetr.orchestration.metrics_commit import catch_up

            catch_up(tracker)
            tracker.log_metrics({"resume/from_step": resumed_from}, step=resumed_from)

    shard = ray.train.get_dataset_shard("train") if config.get("ray_data") else None
    run_dir = config["run_dir"]
    folder = _local_dir(run_dir)
    if config.get("num_items") is not None and hasattr(task, "num_items"):
        task.num_items = config["num_items"]  # counted by the driver's preflight (ETA)
    ledger = MetricLedger()  # rank 0's metrics wait here until a checkpoint covers them
    callbacks = CallbackList([
        AllWorkers(world_size),
        Progress(cfg.name, expected_total(cfg, task, world_size, ray=True), rank, world_size,
                 table=task.format_table),
        LedgerTracking(tracker, ledger, rank,
                       checkpoint_location=lambda s: f"{run_dir}/{checkpoint_dir_name(s.step)}"),
        RayReport(rank, ledger, per_epoch=bool(config.get("report_epochs"))),
    ])
    stall_watched = WrappedBatches(task, lambda batches: watched(batches, cfg, rank, tracker))
    state = train(trainer, stall_watched, callbacks, rank=rank, world_size=world_size, shard=shard,
                  results_dir=folder / "eval" if folder else None)
    last_eval = trainer.last_eval[1] if trainer.last_eval else None
    mark("worker_fn_end")
    return {"step": state.step, "epoch": state.epoch, "resumed_from": resumed_from, "eval": last_eval}
