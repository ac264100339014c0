"""ASHA early stopping of sweep trials (`options.early_stopping`), on results relayed from Ray Train.

A trial is a driver function that runs its chain's stages as Ray Train runs, so Tune sees nothing of a
stage unless it is relayed. For the one stage early stopping watches (`watched_stage`), the workers report
every closed epoch's `epoch/*` metrics and every evaluation's `eval/*` (`report_epochs`, see
orchestration/worker.RayReport), and `EpochRelay`, a Train callback on that stage's controller, forwards
rank 0's report to the trial as a Tune result `{metric, epoch, stage}` whenever it carries the metric (through
the trial session's queue, the way Ray's `TuneReportCallback` does). The workers send a closed epoch's
results with the checkpoint taken right after it when there is one, and Train callbacks run in order (the
metric commit first), so a trial stopped on an epoch keeps that checkpoint and its committed metrics. `asha()` compares those results on
`epoch`, the stage's epochs done: Tune's own iteration count restarts at 1 after `Tuner.restore`, an
explicit epoch does not (ray-mlflow-notes §3.3).

When ASHA stops a trial, Tune ends the trial's actor; the stage's Train controller and workers go with it
and the checkpoints already written stay in storage (Ray's cleaner frees the placement group: §3.4). The
trial's last result then lacks `trial_finished` (`stopped_at` reads it), and the sweep marks the trial's
MLflow runs (`mark_stopped`): tag `updetr.early_stopped`, status KILLED (stopped, not failed).
"""
from __future__ import annotations

from typing import Any, Optional

from updetr.config import Experiment
from updetr.sweep.spec import EarlyStopping, Sweep

TAG_EARLY_STOPPED = "updetr.early_stopped"
FINISHED_KEY = "trial_finished"      # in a trial's last Tune result when its whole chain ran


def watched_stage(exp: Experiment, es: EarlyStopping) -> Optional[str]:
    """Name of the stage of `exp` whose per-epoch results ASHA compares (None: the cell has no such stage,
    so it is never stopped): `es.stage`, else the first training stage of a task that evaluates while
    training for an `eval/*` metric, else the first training stage."""
    from updetr.tasks import task_class

    trains = [s for s in exp.stages if s.action == "train"]
    if es.stage is not None:
        return es.stage if any(s.name == es.stage for s in trains) else None
    if es.metric.startswith("eval/"):
        trains = [s for s in trains if task_class(s.cfg.task).has_eval]
    return trains[0].name if trains else None


def max_epochs(sweep: Sweep, es: EarlyStopping) -> int:
    """ASHA's last rung: `es.max_t`, else the watched stage's epochs, the longest over the cells."""
    if es.max_t is not None:
        return es.max_t
    epochs = [s.cfg.schedule.epochs for c in sweep.cells for s in c.experiment.stages
              if s.name == watched_stage(c.experiment, es)]
    return max(epochs, default=1)


def asha(sweep: Sweep):
    """The Tune scheduler of `options.early_stopping` (None when the sweep has none)."""
    es = sweep.spec.options.early_stopping
    if es is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial that reaches max_t in the watched stage still has its later stages to run.
    return ASHAScheduler(time_attr=es.time_attr, metric=es.metric, mode=es.mode, max_t=max_epochs(sweep, es),
                         grace_period=es.grace_period, reduction_factor=es.reduction_factor, stop_last_trials=False)


def epoch_relay(stage: str, es: EarlyStopping):
    """A Train callback for the watched stage's `TorchTrainer` (built inside a Tune trial)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochRelay(TuneReportCallback):
        """On the Train controller: rank 0's reports that carry the metric, to the trial as Tune results."""

        def __init__(self) -> None:
            super().__init__()      # the trial session's inter-actor queue (picklable: a Ray actor handle)
            self.stage, self.metric, self.time_attr = stage, es.metric, es.time_attr

        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            m = metrics[0] if metrics else {}
            # Only a fresh value: a checkpoint report also carries the last (older) eval metrics.
            if self.metric in m.get("fresh", ()) and self.time_attr in m:
                self._training_actor_item_queue.put({self.metric: float(m[self.metric]),
                                                     self.time_attr: int(m[self.time_attr]), "stage": self.stage})

    return EpochRelay()


def stopped_at(metrics: dict, es: Optional[EarlyStopping]) -> Optional[str]:
    """How a trial without error ended early, from its last Tune result (None: it ran its whole chain)."""
    if es is None or not metrics or metrics.get(FINISHED_KEY):
        return None
    if es.time_attr not in metrics or es.metric not in metrics:
        return None       # no relayed result yet, e.g. a trial cut off by the sweep's end: not ASHA's doing
    return (f"ASHA at {es.time_attr} {metrics[es.time_attr]} of stage {metrics.get('stage', '?')} "
            f"({es.metric} {metrics[es.metric]:.4g})")


def mark_stopped(tracking_uri: str, experiment: str, chain: str, params: dict, trial: str, reason: str) -> None:
    """Tag the early-stopped trial's chain run and its unfinished stage runs (status KILLED) and give the
    chain run the cell's params, as a finished trial has. Tracking problems only warn."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    from updetr.pipeline import TAG_CHAIN
    from updetr.tracking import _warn

    try:
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        found = [] if exp is None else client.search_runs([exp.experiment_id],
                                                          filter_string=f"tags.`{TAG_CHAIN}` = '{chain}'")
        for parent in found:
            children = client.search_runs([exp.experiment_id],
                                          filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
            for run in children:
                # The stopped stage: RUNNING, or FAILED with the error of its Train run dying with the trial.
                if run.info.status != "FINISHED":
                    client.set_tag(run.info.run_id, TAG_EARLY_STOPPED, reason)
                    if "updetr.error" in run.data.tags:
                        client.delete_tag(run.info.run_id, "updetr.error")
                    client.set_terminated(run.info.run_id, "KILLED")
            client.log_batch(parent.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                             tags=[RunTag("updetr.trial", trial), RunTag(TAG_EARLY_STOPPED, reason)])
            client.set_terminated(parent.info.run_id, "KILLED")
    except Exception as e:  # noqa: BLE001 - tracking never fails a sweep
        _warn(f"cannot mark early-stopped trial {trial} in MLflow at {tracking_uri}: {type(e).__name__}: {e}")
