"""Chained stages of one experiment (e.g. pretrain -> finetune -> eval), for `updetr debug` and `updetr run`.

Each stage starts from the previous stage's final checkpoint (`init.checkpoint: previous`). The chain's
progress is a small JSON file, `<runtime.output_dir>/<experiment>/chain-<driver>.json`: a stage is recorded
there when it finished, with the hash of its resolved config, its checkpoint and its eval metrics. A re-run
skips recorded stages (same config) and resumes the first unfinished one from its own last checkpoint, so a
crash during fine-tuning never re-runs pre-training.

MLflow: one parent run per chain (found again on a re-run) with one child run per stage; the parent
carries the final evaluation metrics (`eval/AP`, ...) so chains compare in one table.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, TextIO

from updetr.config import Experiment, ExperimentConfig, config_to_dict
from updetr.tracking import NullTracker, Tracker
from updetr.phases import mark
from updetr.util.streams import STDOUT

TAG_CHAIN = "updetr.chain"
TAG_CHAIN_STATE = "updetr.chain_state"


@dataclass
class StageResult:
    checkpoint: Optional[str]         # file of our checkpoint schema (None for eval stages)
    metrics: dict = field(default_factory=dict)   # final eval metrics (empty when the stage has none)
    run_id: Optional[str] = None      # the stage's MLflow run


class StageDriver(Protocol):
    name: str

    def train(self, cfg: ExperimentConfig, parent_run_id: Optional[str]) -> StageResult: ...
    def evaluate(self, cfg: ExperimentConfig, checkpoint: str, parent_run_id: Optional[str]) -> StageResult: ...


@dataclass
class ChainOutcome:
    experiment: Experiment
    results: dict[str, StageResult]
    skipped: list[str]
    parent: Tracker
    tracking_uri: Optional[str]
    seconds: float

    @property
    def final_metrics(self) -> dict:
        return self.final_stage[1]

    @property
    def final_stage(self) -> tuple[Optional[ExperimentConfig], dict]:
        """(config, metrics) of the last stage that reported metrics; (None, {}) when none did."""
        for stage in reversed(self.experiment.stages):
            r = self.results.get(stage.name)
            if r is not None and r.metrics:
                return stage.cfg, r.metrics
        return None, {}


def stage_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def state_path(exp: Experiment, driver: str) -> Path:
    first = exp.stages[0].cfg
    return (Path(first.runtime.output_dir) / exp.name / f"chain-{driver}.json").resolve()


def _read_state(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_state(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def open_parent(exp: Experiment, path: Path, driver: str,
                parent_run_id: Optional[str] = None) -> tuple[Tracker, Optional[str]]:
    """The chain's parent MLflow run (re-attached on a re-run), or a NullTracker when tracking is off;
    `parent_run_id` nests it (a sweep's trial under the sweep's run)."""
    cfg = exp.stages[0].cfg
    if not cfg.tracking.enabled:
        return NullTracker(), None
    from updetr.tracking import MlflowTracker, TrackingError, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.uri)
    try:
        parent = MlflowTracker.open(uri, cfg.tracking.experiment or exp.name, exp.name,
                                    identity={TAG_CHAIN: exp.name, TAG_CHAIN_STATE: str(path)},
                                    tags={"updetr.driver": driver,
                                          "updetr.stages": ",".join(s.name for s in exp.stages),
                                          **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
    except TrackingError:
        raise
    return parent, uri


def run_chain(exp: Experiment, driver: StageDriver, out: TextIO = STDOUT,
              parent_run_id: Optional[str] = None) -> ChainOutcome:
    """Run every stage in order through `driver`, skipping stages a previous attempt finished. The chain is
    held for the whole call (updetr/run_lock.py): a second driver of it is refused before any work."""
    from updetr.run_lock import hold_run

    with hold_run(state_path(exp, driver.name).parent, f"chain '{exp.name}'"):
        return _run_chain(exp, driver, out, parent_run_id)


def _run_chain(exp: Experiment, driver: StageDriver, out: TextIO, parent_run_id: Optional[str]) -> ChainOutcome:
    t0 = time.monotonic()
    path = state_path(exp, driver.name)
    state = _read_state(path)
    done: dict = state.setdefault("stages", {})
    parent, uri = open_parent(exp, path, driver.name, parent_run_id)
    results: dict[str, StageResult] = {}
    skipped: list[str] = []
    previous: Optional[str] = None
    status = "FAILED"
    try:
        for i, stage in enumerate(exp.stages):
            cfg = stage.cfg
            if cfg.init.checkpoint == "previous":
                cfg = cfg.model_copy(update={"init": cfg.init.model_copy(update={"checkpoint": previous})})
            h = stage_hash(cfg)
            rec = done.get(stage.name)
            if rec and rec.get("hash") == h and (rec.get("checkpoint") is None or Path(rec["checkpoint"]).exists()):
                print(f"[{exp.name}] stage {i + 1}/{len(exp.stages)} {stage.name}: finished earlier, skipped"
                      + (f" (checkpoint {rec['checkpoint']})" if rec.get("checkpoint") else ""), file=out, flush=True)
                result = StageResult(rec.get("checkpoint"), rec.get("metrics") or {}, rec.get("run_id"))
                skipped.append(stage.name)
            else:
                print(f"[{exp.name}] stage {i + 1}/{len(exp.stages)} {stage.name}: {stage.action} {cfg.task}"
                      + (f" from {cfg.init.checkpoint}" if cfg.init.checkpoint else ""), file=out, flush=True)
                mark(f"chain_stage_start:{stage.name}")
                if stage.action == "eval":
                    result = driver.evaluate(cfg, cfg.init.checkpoint, parent.run_id)
                else:
                    result = driver.train(cfg, parent.run_id)
                mark(f"chain_stage_end:{stage.name}")
                done[stage.name] = {"hash": h, "checkpoint": result.checkpoint, "metrics": result.metrics,
                                    "run_id": result.run_id}
                _write_state(path, state)
            results[stage.name] = result
            if result.checkpoint:
                previous = result.checkpoint
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            parent.end(status)
    outcome = ChainOutcome(exp, results, skipped, parent, uri, time.monotonic() - t0)
    final = outcome.final_metrics
    if final:
        parent.log_metrics({f"eval/{k}": v for k, v in final.items()}, step=0)
        if "AP" in final:
            parent.set_tags({"updetr.final_AP": f"{final['AP']:.4f}"})
    parent.set_tags({f"updetr.stage.{n}.run_id": r.run_id for n, r in results.items() if r.run_id})
    parent.end("FINISHED")
    return outcome


def chain_summary(outcome: ChainOutcome) -> str:
    """The closing lines: the final COCO table, each stage's checkpoint, where the MLflow runs are."""
    from updetr.tasks import get_task
    from updetr.tracking import ui_hint

    exp = outcome.experiment
    lines = [f"[{exp.name}] chain of {len(exp.stages)} stage(s) finished in {outcome.seconds:.0f} s"
             + (f" ({', '.join(outcome.skipped)} skipped: finished earlier)" if outcome.skipped else "")]
    final_cfg, final = outcome.final_stage
    if final:
        lines.append(get_task(final_cfg).format_table(final, "  final evaluation (COCO-style, %):"))
    for stage in exp.stages:
        r = outcome.results.get(stage.name)
        if r is not None:
            lines.append(f"  {stage.name:<10} " + (f"checkpoint {r.checkpoint}" if r.checkpoint else "evaluated")
                         + (f"; mlflow run {r.run_id}" if r.run_id else ""))
    if outcome.parent.run_id:
        lines.append(f"  mlflow:     parent run {outcome.parent.run_id} in experiment "
                     f"'{exp.stages[0].cfg.tracking.experiment or exp.name}' at {outcome.tracking_uri}")
        lines.append(f"  look:       {ui_hint(outcome.tracking_uri)}")
    return "\n".join(lines)


class DebugDriver:
    """Stages in this process (`updetr debug`)."""

    name = "debug"

    def __init__(self, out: TextIO = STDOUT) -> None:
        self.out = out

    def train(self, cfg: ExperimentConfig, parent_run_id: Optional[str]) -> StageResult:
        from updetr.local import run_debug

        o = run_debug(cfg, resume=True, out=self.out, parent_run_id=parent_run_id)
        return StageResult(str(o.checkpoint), o.eval_metrics or {}, o.tracker.run_id)

    def evaluate(self, cfg: ExperimentConfig, checkpoint: str, parent_run_id: Optional[str]) -> StageResult:
        from updetr.local import eval_local, open_local_tracking, run_dir
        from updetr.tasks import get_task

        folder = run_dir(cfg)
        tracker = open_local_tracking(cfg, folder, parent_run_id, {"updetr.eval_checkpoint": str(checkpoint)})
        try:
            metrics = eval_local(cfg, checkpoint, out=self.out, results_path=folder / "detections.json")
        except BaseException:
            tracker.end("FAILED")
            raise
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
        tracker.end("FINISHED")
        print(get_task(cfg).format_table(metrics, f"[{cfg.name}] {checkpoint}: {int(metrics['images'])} images"),
              file=self.out, flush=True)
        return StageResult(None, metrics, tracker.run_id)
