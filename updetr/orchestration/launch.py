"""Build and fit the Ray Train `TorchTrainer` of an experiment (the driver side of `updetr run`).

The builders are separate so a Ray Tune sweep can reuse them: a Tune function calls
`plan_run(trial_cfg, run_name=f"{sweep}-{trial_id}")`, `open_tracking(plan, parent_run_id=...)`, then
`build_trainer(plan, tracking, callbacks=[TuneReportCallback()]).fit()` — the same code path as `run`.

Naming, storage and resume: `run_plan.py`; joining or starting Ray: `ray_session.py`. Re-running the same
command after a crash continues from the last checkpoint, and the MLflow run is found again by its
`updetr.run_name` + `updetr.storage` tags.

Resources: `preflight(cfg, address)` checks the data source and fits training workers, preprocessing
actors and read tasks into the machine (local Ray, before it starts) — see `resources.plan_resources`;
on a joined cluster the same plan is made right after connecting. Either way a request that cannot run
is refused in one line before Ray Data starts and before an MLflow run is opened.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from updetr.config import ExperimentConfig, config_to_dict, config_to_yaml
from updetr.orchestration.ray_session import quiet_ray_data, connect_ray, is_local_address
from updetr.orchestration.run_plan import LaunchError, RunPlan, existing_checkpoints, is_uri, plan_run, run_name_for
from updetr.tracking import TAG_LAST_CHECKPOINT, NullTracker, Tracker, TrackingError, start_tracking
from updetr.phases import mark
from updetr.util.streams import STDOUT

# Driver env vars forwarded to the training workers (tracking credentials, updetr drills/settings).
WORKER_ENV_PREFIXES = ("UPDETR_", "MLFLOW_TRACKING_", "AWS_", "GOOGLE_APPLICATION_CREDENTIALS")


# ----------------------------------------------------------------------------------- Ray configs
def resource_plan(cfg: ExperimentConfig, cluster: Optional[dict] = None, *, local: bool = True):
    """The run's `ResourcePlan` against `cluster` (default: this machine); LaunchError when it cannot fit."""
    from updetr.resources import ResourceError, local_resources, plan_resources

    try:
        return plan_resources(cfg, cluster if cluster is not None else local_resources(), flexible_train=local)
    except ResourceError as e:
        raise LaunchError(str(e)) from None


def scaling_config(cfg: ExperimentConfig, resources=None):
    from ray.train import ScalingConfig

    cpw = resources.cpus_per_worker if resources is not None else cfg.ray.cpus_per_worker
    res = {"CPU": cpw}
    if cfg.ray.use_gpu:
        res["GPU"] = 1
    fewest, most = cfg.ray.worker_range()
    # a (min, max) pair is Ray Train's elastic mode: a worker group of any size in the range is started
    return ScalingConfig(num_workers=(fewest, most) if fewest < most else most, use_gpu=cfg.ray.use_gpu,
                         resources_per_worker=res, placement_strategy=cfg.ray.placement_strategy)


def worker_env(extra: Optional[dict] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES)}
    # Train V2 patches print() to tee into its logger, which doubles every worker line on the console.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"))
    env.update(extra or {})
    return env


def run_config(plan: RunPlan, callbacks: Sequence[Any] = (), env: Optional[dict] = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=plan.run_name, storage_path=plan.storage_path,
                     failure_config=FailureConfig(max_failures=plan.cfg.ray.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=plan.cfg.ray.num_to_keep),
                     callbacks=list(callbacks) or None,
                     worker_runtime_env={"env_vars": worker_env(env)})


def dataset_config(cfg: ExperimentConfig):
    """Ray Train's ingest options: the train set split over the workers; with `data.shuffle: false` the rows
    arrive in file order (Ray Data's `preserve_order`), as the local loader gives them, so that an unshuffled
    run on one worker trains on the batches `updetr debug` trains on. Shuffled runs keep Ray's streaming
    order (its parallel preprocessing may finish blocks out of order, which costs no waiting)."""
    import copy

    from ray.data import DataContext
    from ray.train import DataConfig

    if cfg.data.shuffle:
        return DataConfig(datasets_to_split=["train"])             # Train's default ingest options
    # A copy of this process' options (what Train's default takes from it); built by copying, because
    # constructing ExecutionOptions warns about a deprecated field even when it is left unset.
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def train_loop_config(plan: RunPlan, tracking_run_id: Optional[str], *, ray_data: bool = True,
                      action: str = "train", checkpoint: Optional[str] = None, report_epochs: bool = False) -> dict:
    """What each worker gets: the config as a plain dict and the resolved absolute locations
    (`report_epochs`: also `ray.train.report` every epoch's and evaluation's metrics, for Tune schedulers)."""
    return {"config": config_to_dict(plan.cfg), "run_name": plan.run_name, "run_dir": plan.run_dir,
            "tracking_uri": plan.tracking_uri if tracking_run_id else None, "tracking_run_id": tracking_run_id,
            "experiment": plan.experiment, "num_items": plan.extra.get("num_items"), "ray_data": ray_data,
            "action": action, "checkpoint": checkpoint, "report_epochs": report_epochs}


def build_datasets(cfg: ExperimentConfig, resources=None) -> dict:
    """The task's Ray Data datasets ({} when each worker reads its own part of the data, as detection does)."""
    from updetr.tasks import get_task

    return get_task(cfg).ray_datasets(resources)


def build_trainer(plan: RunPlan, tracker: Tracker, *, datasets: Optional[dict] = None, resources=None,
                  callbacks: Sequence[Any] = (), env: Optional[dict] = None, action: str = "train",
                  checkpoint: Optional[str] = None, report_epochs: bool = False):
    """The `TorchTrainer` of a plan (needs Ray initialised: it builds the Ray Data pipeline unless given)."""
    from updetr.orchestration.ray_session import state_api_available
    from updetr.orchestration.worker import train_fn_per_worker

    TorchTrainer = _trainer_class(cleaner=state_api_available())
    if datasets is None:
        datasets = build_datasets(plan.cfg, resources) if action == "train" else {}
    return TorchTrainer(train_fn_per_worker,
                        train_loop_config=train_loop_config(plan, tracker.run_id, ray_data=bool(datasets),
                                                            action=action, checkpoint=checkpoint,
                                                            report_epochs=report_epochs),
                        scaling_config=scaling_config(plan.cfg, resources),
                        run_config=run_config(plan, callbacks, env),
                        datasets=datasets or None,
                        dataset_config=dataset_config(plan.cfg) if datasets else None)


def _trainer_class(cleaner: bool):
    """`TorchTrainer`, or without Ray Train's placement-group cleaner when this process runs its own Ray
    without the dashboard.

    The cleaner is a detached actor (one more process to start) that frees the workers' placement group if
    the controller dies while the cluster lives on; it asks the State API, which only the dashboard serves,
    and without it retries for ~20 s then fails in its own thread. A Ray this process started and shuts
    down takes every placement group with it, so there is nothing for it to clean.
    """
    from ray.train.torch import TorchTrainer

    if cleaner:
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray layout: keep Ray's defaults
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return LocalTorchTrainer


def open_tracking(plan: RunPlan, parent_run_id: Optional[str] = None, extra_tags: Optional[dict] = None) -> Tracker:
    """Open (or re-open) the run's MLflow run and log the config; NullTracker when tracking is off."""
    if plan.tracking_uri is None:
        return NullTracker()
    from updetr.orchestration.job_tags import cluster_tags

    tags = {**cluster_tags(), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    from updetr.data.subset import log_subset

    try:
        tracker = start_tracking(True, plan.tracking_uri, plan.experiment, plan.run_name, plan.run_dir,
                                 config_to_dict(plan.cfg), config_to_yaml(plan.cfg), extra_tags=tags)
    except TrackingError as e:
        raise LaunchError(str(e)) from None
    log_subset(tracker, plan.cfg)      # the fine-tuning subset's image ids, when the TRAIN split is cut
    return tracker


# ------------------------------------------------------------------------------------------- run
@dataclass
class RunOutcome:
    plan: RunPlan
    step: Optional[int]
    epoch: Optional[int]
    checkpoint: Optional[str]
    tracker: Tracker
    seconds: float
    resumed_from: Optional[int]
    eval_metrics: Optional[dict] = None


class RunInterrupted(LaunchError):
    """Ctrl-C: the message says what was kept (checkpoints, the MLflow run marked KILLED)."""


def preflight(cfg: ExperimentConfig, address: Optional[str] = None):
    """Refusals that need no Ray: the data source (LaunchError naming the path) and, when this process will
    start its own Ray, the resource plan against this machine. Returns `(num_items, plan or None)`."""
    from updetr.data.preflight import DataSourceError, check_source

    try:
        num_items = check_source(cfg)
    except DataSourceError as e:
        raise LaunchError(str(e)) from None
    return num_items, (resource_plan(cfg) if is_local_address(address) else None)


def _print_plan(cfg: ExperimentConfig, plan: RunPlan, resources, local: bool, out: TextIO) -> None:
    where = "local Ray" if local else "the Ray cluster"
    print(f"[{cfg.name}] run {plan.run_name}: {resources.describe()} ({where})", file=out, flush=True)
    for note in resources.notes:
        print(f"[{cfg.name}] note: {note}", file=out, flush=True)


def run(cfg: ExperimentConfig, address: Optional[str] = None, out: TextIO = STDOUT,
        run_name: Optional[str] = None, parent_run_id: Optional[str] = None, callbacks: Sequence[Any] = (),
        report_epochs: bool = False) -> RunOutcome:
    """`updetr run`: prepare the task's data, refuse what cannot work (before Ray and MLflow), connect Ray,
    plan resources, build the data pipeline, open tracking (a child of `parent_run_id` in a chain), fit,
    close tracking. `callbacks` (more Train callbacks) and `report_epochs` serve a sweep's early stopping.

    Raises:
        LaunchError: before any work (data, resources, storage, tracking, address, token) or when training
            failed; RunInterrupted on Ctrl-C.
    """
    from updetr.run_lock import hold_run
    from updetr.tasks import get_task

    t0 = time.monotonic()
    mark("stage_start")
    cfg = get_task(cfg).prepare()  # absolute data paths, generated data: workers chdir elsewhere
    plan = plan_run(cfg, run_name=run_name)
    # One driver per run (updetr/run_lock.py): the lock lives in the run's folder (a lease on object
    # stores); the Train workers never take it, so a worker restart inside this driver is not refused.
    with hold_run(plan.run_dir, f"run '{plan.run_name}'", "set ray.run_name=... for a separate run"):
        return _run(cfg, plan, t0, address, out, parent_run_id, callbacks, report_epochs)


def _run(cfg: ExperimentConfig, plan: RunPlan, t0: float, address: Optional[str], out: TextIO,
         parent_run_id: Optional[str], callbacks: Sequence[Any], report_epochs: bool) -> RunOutcome:
    num_items, resources = preflight(cfg, address)
    plan.extra["num_items"] = num_items
    mark("preflight_done")
    local, _ = connect_ray(address, cfg, num_cpus=resources.total_cpus if resources is not None else None)
    mark("ray_up")
    if resources is None:
        from updetr.resources import cluster_resources

        resources = resource_plan(cfg, cluster_resources(), local=False)
    previous = existing_checkpoints(plan.run_dir)
    resumed_from = previous[-1][0] if previous else None
    _print_plan(cfg, plan, resources, local, out)
    quiet_ray_data()
    from updetr.orchestration import console

    # a chain: every stage's lines; Ray's own go to the run's log file (updetr/orchestration/console.py)
    console.install([f"[{cfg.tracking.experiment or cfg.name}"],
                    console.default_log_path(cfg.runtime.output_dir, cfg.tracking.experiment or cfg.name), out)
    try:
        datasets = build_datasets(cfg, resources)
    except LaunchError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. an object-store path Ray Data cannot list
        raise LaunchError(f"cannot build the data pipeline: {_first_line(e)}") from None
    mark("data_built")
    tracker = open_tracking(plan, parent_run_id)
    mark("mlflow_open")
    if resumed_from is not None:
        print(f"[{cfg.name}] resuming from checkpoint step {resumed_from} in {plan.run_dir}", file=out, flush=True)
    print(f"[{cfg.name}] checkpoints -> {plan.run_dir}; tracking -> {tracker.describe()}", file=out, flush=True)
    status = "FAILED"
    wait = None
    try:
        from updetr.orchestration.metrics_commit import commit_callbacks

        trainer = build_trainer(plan, tracker, datasets=datasets, resources=resources,
                                callbacks=[*commit_callbacks(tracker), *callbacks], report_epochs=report_epochs)
        _interrupt_on_sigint(trainer)
        from updetr.orchestration.resource_wait import watch_resources

        wait = watch_resources(cfg, trainer, dict(scaling_config(cfg, resources).resources_per_worker), out)
        mark("fit_start")
        try:
            result = trainer.fit()
        finally:
            wait.stop()
        mark("fit_end")
        if wait.gave_up:
            raise LaunchError(failure_message(wait.gave_up, plan, stopped="training stopped"))
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray Train's own SIGINT handler, if ours is not in
        status = "KILLED"
        raise RunInterrupted(interrupted_message(plan, tracker)) from None
    except LaunchError as e:
        tracker.set_tags({"updetr.error": str(e)[:4000]})
        raise
    except Exception as e:  # noqa: BLE001 - TrainingFailedError and friends: one line + where to look
        if wait is not None and wait.gave_up:  # the abort below made fit() fail: the wait is the reason
            tracker.set_tags({"updetr.error": wait.gave_up[:4000]})
            raise LaunchError(failure_message(wait.gave_up, plan, stopped="training stopped")) from None
        reason = _first_line(e)
        tracker.set_tags({"updetr.error": reason[:4000]})
        raise LaunchError(failure_message(reason, plan)) from None
    finally:
        if status != "FINISHED":
            tracker.end(status)
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    if ckpt and not is_uri(plan.run_dir) and not ckpt.startswith("/"):
        ckpt = "/" + ckpt
    if ckpt and is_uri(plan.run_dir) and "://" not in ckpt:
        ckpt = plan.storage_path.split("://", 1)[0] + "://" + ckpt
    ret = result.return_value if isinstance(getattr(result, "return_value", None), dict) else {}
    step = ret.get("step", (result.metrics or {}).get("step"))
    epoch = ret.get("epoch", (result.metrics or {}).get("epoch"))
    if ckpt:
        tracker.set_tags({TAG_LAST_CHECKPOINT: ckpt})
    tracker.end("FINISHED")
    mark("stage_end")
    return RunOutcome(plan, step, epoch, ckpt, tracker, time.monotonic() - t0, resumed_from, ret.get("eval"))


def run_eval(cfg: ExperimentConfig, checkpoint: str, address: Optional[str] = None,
             parent_run_id: Optional[str] = None, out: TextIO = STDOUT) -> tuple[dict, Optional[str]]:
    """Score `checkpoint` on the task's evaluation split with `ray.num_workers` Ray Train workers (each
    rank its part, rank 0 gathers and scores once). Returns (metrics, MLflow run id or None)."""
    from updetr.checkpoint import load_checkpoint
    from updetr.tasks import get_task

    load_checkpoint(checkpoint)  # a bad file fails here, in one line, not inside a worker
    cfg = get_task(cfg).prepare()
    checkpoint = str(Path(checkpoint).resolve()) if not is_uri(checkpoint) else checkpoint
    tag = hashlib.sha256(checkpoint.encode()).hexdigest()[:8]
    plan = plan_run(cfg, run_name=cfg.ray.run_name or f"{run_name_for(cfg)}-eval-{tag}")
    _, resources = preflight(cfg, address)
    local, _ = connect_ray(address, cfg, num_cpus=resources.total_cpus if resources is not None else None)
    if resources is None:
        from updetr.resources import cluster_resources

        resources = resource_plan(cfg, cluster_resources(), local=False)
    tracker = open_tracking(plan, parent_run_id, {"updetr.eval_checkpoint": checkpoint})
    print(f"[{cfg.name}] evaluating {checkpoint} on {cfg.ray.num_workers} Ray worker(s); "
          f"tracking -> {tracker.describe()}", file=out, flush=True)
    quiet_ray_data()
    from updetr.orchestration import console

    console.install([f"[{cfg.name}"], console.default_log_path(cfg.runtime.output_dir, cfg.name), out)
    try:
        result = build_trainer(plan, tracker, resources=resources, action="eval", checkpoint=checkpoint).fit()
    except Exception as e:  # noqa: BLE001 - one line + where to look
        tracker.end("FAILED")
        raise LaunchError(f"evaluation failed: {_first_line(e)}") from None
    tracker.end("FINISHED")
    ret = result.return_value if isinstance(getattr(result, "return_value", None), dict) else {}
    metrics = ret.get("eval") or {k.removeprefix("eval/"): v for k, v in (result.metrics or {}).items()
                                  if k.startswith("eval/")}
    if not metrics:
        raise LaunchError("evaluation finished without metrics (see the worker logs above)")
    return dict(metrics), tracker.run_id


def _interrupt_on_sigint(trainer) -> None:
    """Ctrl-C during `fit()`: ask the Train controller to abort and raise KeyboardInterrupt at once.

    Ray Train V2 installs its own SIGINT handler in `fit()` (`_register_sigint_handler`) that aborts and
    then calls `sys.exit(0)` or returns normally, so the driver cannot tell an interrupt from a finished
    or failed run (the issue: exit 1, no message, MLflow FAILED). Replacing that hook keeps the abort and
    makes the interrupt explicit, so `run` can report what was kept and mark the MLflow run KILLED.
    """
    import signal
    import threading

    if not hasattr(trainer, "_register_sigint_handler") or threading.current_thread() is not threading.main_thread():
        return

    def register(controller) -> None:
        def handler(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C is immediate
            try:
                controller.abort.remote()
            except Exception:  # noqa: BLE001 - the controller may already be gone
                pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)

    trainer._register_sigint_handler = register


# Failures a re-run cannot fix: the same input gives the same error.
_NOT_RETRYABLE = ("FileNotFoundError", "No such file", "not found", "NotADirectoryError", "PermissionError",
                  "CheckpointError", "architecture differs", "DataSourceError")


def failure_message(reason: str, plan: RunPlan, stopped: str = "training failed") -> str:
    kept = existing_checkpoints(plan.run_dir)
    where = (f"checkpoints kept in {plan.run_dir}, last at step {kept[-1][0]}" if kept
             else f"no checkpoint was written in {plan.run_dir}")
    if stopped != "training failed":  # a resource wait: nothing is wrong with the run itself
        return f"{stopped}: {reason} ({where}; re-run the same command once the cluster has room)"
    if any(k in reason for k in _NOT_RETRYABLE):
        return f"training failed: {reason} ({where}; fix that, then run the same command to continue)"
    return f"training failed: {reason} ({where}; re-run the same command to resume)"


def interrupted_message(plan: RunPlan, tracker: Tracker) -> str:
    kept = existing_checkpoints(plan.run_dir)
    ckpt = f"last checkpoint {kept[-1][1]} (step {kept[-1][0]})" if kept else f"no checkpoint yet in {plan.run_dir}"
    mlflow = f"; MLflow run {tracker.run_id} marked KILLED" if tracker.run_id else ""
    return f"interrupted: {ckpt}{mlflow}; the same command resumes"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TrainingFailedError texts carry the worker traceback: keep the exception line at its end.
    for ln in reversed(lines):
        if ln and not ln.startswith(("File ", "^", "~", "Traceback")) and ":" in ln:
            # "updetr.orchestration.watchdog.StallError: ..." -> "StallError: ..."
            return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w*(?:Error|Exception|Interrupt)\b)", "", ln)[:600]
    return (lines[0] if lines else type(err).__name__)[:300]


def summary(outcome: RunOutcome) -> str:
    """The closing lines of `updetr run`: what ran, and where to look."""
    from updetr.tracking import ui_hint

    p = outcome.plan
    lines = [f"[{p.cfg.name}] run {p.run_name} finished at step {outcome.step} (epoch {outcome.epoch}) "
             f"in {outcome.seconds:.0f} s" + (f", resumed from step {outcome.resumed_from}"
                                              if outcome.resumed_from is not None else ""),
             f"  checkpoint: {outcome.checkpoint or p.run_dir}"]
    if outcome.tracker.run_id:
        lines.append(f"  mlflow:     run {outcome.tracker.run_id} in experiment '{p.experiment}' at {p.tracking_uri}")
        from updetr.command_line import cli_command

        hint = ui_hint(p.tracking_uri)
        if hint.startswith("updetr "):  # a command that works from here (updetr may not be on PATH)
            hint = cli_command() + hint[len("updetr"):]
        lines.append(f"  look:       {hint}")
    lines.append("  the same command resumes this run; set ray.run_name=NAME for a separate one")
    return "\n".join(lines)
