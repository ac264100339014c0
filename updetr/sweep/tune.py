"""`updetr sweep`: every cell of a sweep runs its experiment's chain as one Ray Tune trial.

The Train V2 pattern (ray-mlflow-notes §3.1): each trial is a small driver function (0.01 CPU) that runs the
cell's chain with `updetr.pipeline.run_chain` and the Ray stage driver, so every stage is its own
`TorchTrainer` run. Trials are named from their parameters (`Sweep.trial`), so their run folders, chain
state and Ray Data epoch clocks are their own and a re-run of the same command finds them: finished stages
are skipped and an unfinished one resumes from its checkpoint; Tune's own state is restored with
`Tuner.restore` when the sweep folder holds one.

MLflow: one parent run per sweep (tag `updetr.sweep`, found again on a re-run) with the sweep YAML and the
result table as artifacts; each trial's chain parent is its child, carrying the cell's parameters and the
final `eval/*` metrics; the stage runs sit below it.

Early stopping (`options.early_stopping`, ASHA on per-epoch results relayed from one stage) lives in
updetr/sweep/early_stop.py; the stage driver of a trial, which also runs stages untracked once the tracking
server stops answering, in updetr/sweep/trial_driver.py.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

from updetr.sweep.early_stop import asha, mark_stopped, max_epochs, stopped_at
from updetr.sweep.spec import Sweep, SweepError, load_sweep
from updetr.tracking_query import TAG_CELL, TAG_SEED, TAG_SWEEP, TAG_TRIAL
from updetr.util.streams import STDOUT

DRIVER_CPU = 0.01       # a trial's own actor; 0 is rejected by Tune (ray-mlflow-notes §3.2)


@dataclass
class TrialResult:
    name: str
    metrics: dict
    error: Optional[str]
    stopped: Optional[str] = None          # early-stopped: by what, where (not an error)
    tracking_lost: Optional[str] = None    # the tracking store stopped answering during this trial


@dataclass
class SweepOutcome:
    sweep: Sweep
    trials: list[TrialResult]
    parent_run_id: Optional[str]
    tracking_uri: Optional[str]
    concurrency: int
    seconds: float
    cpus_free: tuple[float, float] = (0.0, 0.0)    # Ray's available CPUs before and after the trials
    tracking_lost: Optional[str] = None             # the sweep's own MLflow run stopped answering


def trial_cpus(sweep: Sweep) -> float:
    """CPUs one trial holds at most: its driver, the widest stage's Train workers and, for a stage fed by
    Ray Data, its preprocessing actors (stages of a chain run one after the other)."""
    from updetr.tasks import task_class

    need = 0.0
    for cell in sweep.cells:
        for st in cell.experiment.stages:
            cfg = st.cfg
            cpus = cfg.ray.num_workers * cfg.ray.cpus_per_worker
            if st.action == "train" and task_class(cfg.task).ray_data:
                cpus += max(1, cfg.data.num_workers) * cfg.data.preprocess_cpus
            need = max(need, cpus)
    return need + DRIVER_CPU


def plan_concurrency(sweep: Sweep, cluster_cpus: float) -> int:
    """Trials at once: what the cluster's CPUs hold (never more, so no trial waits forever for a placement
    group), capped by options.max_concurrent."""
    need = trial_cpus(sweep)
    if need > cluster_cpus + 1e-9:
        raise SweepError(f"{sweep.path}: one trial needs {need:g} CPUs (Train workers + Ray Data actors) and the "
                         f"cluster has {cluster_cpus:g}; lower ray.num_workers / ray.cpus_per_worker / "
                         f"data.num_workers / data.preprocess_cpus")
    fit = max(1, math.floor((cluster_cpus + 1e-9) / need))
    cap = sweep.spec.options.max_concurrent
    return min(fit, cap) if cap else fit


def _trial(config: dict) -> None:
    """One Tune trial: the cell's chain, then its final metrics to Tune and its parameters to MLflow.

    With early stopping, the watched stage's per-epoch results reach Tune while it trains (TrialDriver); a
    tracking server that stopped answering makes the rest of the trial run untracked instead of failing."""
    from ray import tune

    from updetr.pipeline import run_chain
    from updetr.sweep.early_stop import FINISHED_KEY
    from updetr.sweep.trial_driver import TrialDriver, tracking_down, untracked_experiment

    sweep = load_sweep(config["path"], config["overrides"], name=config["sweep"])
    cell = next(c for c in sweep.cells if c.name == config["cell"])
    exp = sweep.trial(cell)
    driver = TrialDriver(exp, sweep.spec.options.early_stopping)
    lost = tracking_down(exp.stages[0].cfg)
    if lost:
        print(f"[{exp.name}] note: {lost}; this trial runs untracked", flush=True)
        driver.tracking_lost, exp = lost, untracked_experiment(exp)
    outcome = run_chain(exp, driver, parent_run_id=None if lost else config["parent_run_id"])
    if outcome.parent.run_id and outcome.tracking_uri:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(outcome.tracking_uri).log_batch(
                outcome.parent.run_id, params=[Param(k, str(v)) for k, v in cell.params.items()],
                tags=[RunTag(TAG_TRIAL, cell.name), RunTag(TAG_CELL, cell.cell),
                      *([RunTag(TAG_SEED, str(cell.seed))] if cell.seed is not None else [])])
        except Exception as e:  # noqa: BLE001 - the store went away after the chain: the trial still counts
            driver.tracking_lost = driver.tracking_lost or f"MLflow at {outcome.tracking_uri}: {type(e).__name__}"
    if not getattr(outcome.parent, "healthy", True):    # went away while the chain ran (calls were dropped)
        driver.tracking_lost = driver.tracking_lost or f"MLflow at {outcome.tracking_uri} stopped answering"
    tune.report({FINISHED_KEY: 1, "tracking_lost": driver.tracking_lost or "",
                 **{f"eval/{k}": float(v) for k, v in outcome.final_metrics.items()}})


def _absolute(overrides: list[str], sweep: Sweep) -> list[str]:
    """Trials run with another working directory: pin the output folder and the tracking store."""
    from updetr.tracking import resolve_tracking_uri

    first = sweep.cells[0].experiment.stages[0].cfg
    return [*overrides, f"runtime.output_dir={Path(first.runtime.output_dir).resolve()}",
            f"tracking.uri={resolve_tracking_uri(first.tracking.uri)}"]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def trial_error(err: BaseException) -> str:
    """A failed trial in one line: the last line of Ray's wrapped traceback is the exception itself
    (`updetr.tasks.detect.DatasetError: data (train split): ...`)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(err)).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def format_results(outcome: SweepOutcome) -> str:
    metric = outcome.sweep.spec.options.metric
    width = max(len(t.name) for t in outcome.trials)
    lines = [f"sweep {outcome.sweep.name}: {len(outcome.trials)} trials in {outcome.seconds:.0f} s "
             f"({outcome.concurrency} at a time); Ray CPUs free: {outcome.cpus_free[0]:g} before, "
             f"{outcome.cpus_free[1]:g} after"]
    for t in outcome.trials:
        value = t.metrics.get(metric)
        shown = f"{100 * value:.1f}" if value is not None and metric.startswith("eval/") else (
            f"{value:.4g}" if value is not None else "-")
        lines.append(f"  {t.name:<{width}}  {metric} {shown}" + (f"  FAILED: {t.error}" if t.error else "")
                     + (f"  EARLY-STOPPED: {t.stopped}" if t.stopped else ""))
    lost = [t for t in outcome.trials if t.tracking_lost]
    if lost or outcome.tracking_lost:
        why = outcome.tracking_lost or lost[0].tracking_lost
        lines.append(f"tracking lost during the sweep ({why}); the trials ran on, untracked from then on "
                     f"({len(lost)} trial(s) affected); their metrics are in the run folders and Ray storage")
    return "\n".join(lines)


SETTINGS_FILE = "updetr-sweep-settings.json"   # beside Tune's state: what the sweep's cells resolved to


def cell_settings(sweep: Sweep) -> dict[str, list[str]]:
    """Cell -> the identity hash of each of its stages (every setting that changes the arithmetic)."""
    from updetr.orchestration.run_plan import config_hash

    return {c.name: [f"{st.name}:{config_hash(st.cfg)}" for st in c.experiment.stages] for c in sweep.cells}


def check_same_settings(sweep: Sweep, folder: Path) -> list[str]:
    """A re-run resumes the sweep Tune saved in `folder`, whose trials keep the settings they started with.
    Refuse (before any work) when the cells now resolve to other settings: resuming would silently report the
    old ones. Cells added to the sweep (e.g. a seed more) are allowed when every saved cell is unchanged;
    returns their names ([] when the sweep is the same or new)."""
    saved_path = folder / SETTINGS_FILE
    if not saved_path.is_file():
        return []
    saved, now = json.loads(saved_path.read_text()), cell_settings(sweep)
    if saved == now:
        return []
    if set(saved) <= set(now) and all(saved[k] == now[k] for k in saved):
        return [k for k in now if k not in saved]
    changed = sorted(set(saved) - set(now)) or sorted(k for k in saved if saved[k] != now.get(k))
    raise SweepError(f"{sweep.path}: sweep '{sweep.name}' in {folder} was started with other settings "
                     f"(cells changed: {', '.join(changed)}); re-run with the same file and overrides to resume "
                     f"it, or give the changed study a new name (--name NEW)")


def run_sweep(path: str | Path, overrides: Optional[list[str]] = None, name: Optional[str] = None,
              address: Optional[str] = None, out: TextIO = STDOUT) -> SweepOutcome:
    """Validate every cell, open the sweep's MLflow parent, run the trials on Ray Tune, summarise."""
    t0 = time.monotonic()
    path = Path(path).resolve()
    sweep = load_sweep(path, overrides, name=name)          # every cell, before anything starts
    overrides = _absolute(list(overrides or []), sweep)
    sweep = load_sweep(path, overrides, name=name)
    first = sweep.cells[0].experiment.stages[0].cfg
    storage = Path(first.runtime.output_dir) / "sweeps"
    folder = storage / sweep.name
    # One driver per sweep (updetr/run_lock.py), before anything is written or Ray starts.
    from updetr.run_lock import hold_run

    with hold_run(folder, f"sweep '{sweep.name}'", "use --name NAME for a separate sweep"):
        return _run_sweep(sweep, path, overrides, folder, storage, first, address, out, t0)


def _run_sweep(sweep: Sweep, path: Path, overrides: list[str], folder: Path, storage: Path, first,
               address: Optional[str], out: TextIO, t0: float) -> SweepOutcome:
    import ray
    from ray import tune

    from updetr.orchestration.ray_session import connect_ray
    from updetr.tracking import MlflowTracker, NullTracker

    added = check_same_settings(sweep, folder)
    uri = first.tracking.uri if first.tracking.enabled else None
    parent = (MlflowTracker.open(uri, sweep.name, sweep.name, identity={TAG_SWEEP: sweep.name},
                                 tags={"updetr.sweep_file": str(path)}) if uri else NullTracker())
    parent.log_text(path.read_text(), "sweep.yaml")
    connect_ray(address, first, dashboard=True)  # early stopping: Train's cleaner needs the State API
    from updetr.orchestration import console

    # the trials' own lines without Ray's prefix; Ray's own (Tune's tables included) to the sweep's log file
    console.install([f"[{sweep.name}-"], console.default_log_path(first.runtime.output_dir, f"sweep-{sweep.name}"), out)
    console.quiet_tune()
    fetch_warnings = console.fetch_warnings()
    fetch_warnings.trials.clear()
    concurrency = plan_concurrency(sweep, float(ray.cluster_resources().get("CPU", 0.0)))
    print(f"sweep {sweep.name}: {len(sweep.cells)} trials, {concurrency} at a time "
          f"({trial_cpus(sweep):g} CPUs each); tracking -> {parent.describe()}", file=out, flush=True)
    es = sweep.spec.options.early_stopping
    if es is not None:
        # Results without the scheduler's metric (a trial's final one) are expected: only the watched stage's
        # epochs carry it (updetr/sweep/early_stop.py).
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        print(f"sweep {sweep.name}: early stopping: ASHA on {es.metric} ({es.mode}) per {es.time_attr}, grace "
              f"{es.grace_period}, reduction {es.reduction_factor:g}, last rung {max_epochs(sweep, es)}",
              file=out, flush=True)
    trainable = tune.with_resources(_trial, {"cpu": DRIVER_CPU})
    if added:
        # Tune cannot add trials to a saved run: start its run again over every cell. The cells run before
        # find their chains finished (run folders and chain state are the trial's own) and only report again.
        print(f"sweep {sweep.name}: {len(added)} new trial(s) ({', '.join(added)}); the "
              f"{len(sweep.cells) - len(added)} earlier ones report their finished results", file=out, flush=True)
    if tune.Tuner.can_restore(str(folder)) and not added:
        print(f"sweep {sweep.name}: resuming from {folder}", file=out, flush=True)
        tuner = tune.Tuner.restore(str(folder), trainable, resume_errored=True)
    else:
        space = {"cell": tune.grid_search([c.name for c in sweep.cells]), "path": str(path),
                 "overrides": overrides, "sweep": sweep.name, "parent_run_id": parent.run_id}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, scheduler=asha(sweep),
                                        trial_name_creator=lambda t: t.config["cell"],
                                        trial_dirname_creator=lambda t: t.config["cell"]),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1)))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SETTINGS_FILE).write_text(json.dumps(cell_settings(sweep), indent=1))
    before = float(ray.available_resources().get("CPU", 0.0))
    grid = tuner.fit()
    # A trial stopped by Tune can leave its Train placement group behind (ray-mlflow-notes §3.4); Ray's
    # cleaner (needs the dashboard) frees it within seconds: wait for it, then report what is free.
    deadline = time.monotonic() + 30
    while float(ray.available_resources().get("CPU", 0.0)) < before - 1e-6 and time.monotonic() < deadline:
        time.sleep(1)
    after = float(ray.available_resources().get("CPU", 0.0))
    trials = []
    for result in grid:
        cell = (result.config or {}).get("cell", "?")
        err = None if result.error is None else trial_error(result.error)
        last = result.metrics or {}
        metrics = {k: v for k, v in last.items() if k.startswith("eval/")}
        stopped = stopped_at(last, es) if err is None else None
        trials.append(TrialResult(cell, metrics, err, stopped, last.get("tracking_lost") or None))
    if fetch_warnings.trials:
        # Tune found no saved result for trials that were running when the sweep stopped; they ran again
        # from their chains' checkpoints above (finished stages skipped)
        print(f"sweep {sweep.name}: {len(fetch_warnings.trials)} interrupted trial(s) restart: finished stages "
              f"skipped, the unfinished one from its last checkpoint (Tune kept no result of theirs from before "
              f"the stop)", file=out, flush=True)
    order = {c.name: i for i, c in enumerate(sweep.cells)}
    trials.sort(key=lambda t: order.get(t.name, len(order)))
    by_name = {c.name: c for c in sweep.cells}
    for t in trials:
        if t.stopped and uri and t.name in by_name:
            mark_stopped(uri, sweep.name, sweep.trial(by_name[t.name]).name, by_name[t.name].params, t.name, t.stopped)
    outcome = SweepOutcome(sweep, trials, parent.run_id, uri, concurrency, time.monotonic() - t0, (before, after))
    table = format_results(outcome)
    parent.log_text(table + "\n", "results.txt")
    parent.set_tags({"updetr.failed_trials": str(sum(t.error is not None for t in trials)),
                     "updetr.early_stopped_trials": str(sum(t.stopped is not None for t in trials))})
    parent.end("FINISHED")
    if not getattr(parent, "healthy", True):
        outcome.tracking_lost = f"MLflow at {uri} stopped answering"
    return outcome
