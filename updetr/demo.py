"""`updetr demo [k=v ...] [--name N]`: a complete small study on this machine's CPUs, in a few minutes.

Does UP-DETR pre-training help fine-tuning? The sweep `experiments/sweeps/demo_updetr-vs-random-init.yaml`
has two cells of the demo chain (experiments/demo_chain.yaml) on built-in synthetic data, each over 3 seeds:
`updetr-init` (pre-train -> fine-tune, evaluated) and `random-init` (the same fine-tuning and eval from random
weights). It runs through `updetr sweep`'s
machinery (`run_sweep`: Ray Tune on a local Ray, one MLflow parent run with a child per trial, in the
default local store `./mlflow.db`; run folders under `./runs`), then `updetr compare` reads the trials back
from MLflow and prints the table (deltas against random init) and writes the PNG curves. Re-running the same
command reuses what is there: finished trials are not run again (the table is printed again), an
interrupted one resumes from its checkpoints; `--name` starts a separate study.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO

from updetr.util.streams import STDOUT

if TYPE_CHECKING:
    from updetr.sweep.tune import SweepOutcome

DEMO_SWEEP = Path(__file__).resolve().parents[1] / "experiments" / "sweeps" / "demo_updetr-vs-random-init.yaml"
BASELINE_CELL = "random-init"
BASELINE = f"run={BASELINE_CELL}"  # deltas: what pre-training adds over random init
TREATED_CELL = "updetr-init"


@dataclass
class DemoOutcome:
    sweep: "SweepOutcome"
    table: Optional[str]            # the compare table (None when no trial has eval metrics)
    files: list[Path]               # PNG plots and the table file
    note: Optional[str]             # where the files were logged in MLflow (or a warning)
    error: Optional[str]            # why there is no table
    seconds: float
    conclusion: Optional[str] = None    # the answer in words, from the sweep's metric over the seeds


def demo_sweep_file() -> Path:
    from updetr.sweep.spec import SweepError

    if not DEMO_SWEEP.is_file():
        raise SweepError(f"{DEMO_SWEEP}: no such file; `updetr demo` runs from a clone of the repository "
                         f"(pip install -e .), which holds experiments/")
    return DEMO_SWEEP


def run_demo(overrides: Optional[list[str]] = None, name: Optional[str] = None, address: Optional[str] = None,
             out: TextIO = STDOUT) -> DemoOutcome:
    """Run the demo sweep, then compare its trials.

    Raises:
        SweepError / LaunchError / TrackingError: bad overrides or an unusable Ray / tracking store, before
            any trial starts (as `updetr sweep`).
    """
    from mlflow.tracking import MlflowClient

    from updetr.compare import DEFAULT_METRICS, CompareError, compare, log_to_sweep
    from updetr.sweep.spec import SweepError, load_sweep
    from updetr.sweep.tune import run_sweep
    from updetr.tracking_query import QueryError

    t0 = time.monotonic()
    path = demo_sweep_file()
    sweep = load_sweep(path, overrides, name=name)
    first = sweep.cells[0].experiment.stages[0].cfg
    if not first.tracking.enabled:
        raise SweepError("tracking.enabled=false: the demo reads its table back from MLflow; leave tracking on")
    seeds = sweep.spec.seeds or [first.seed]
    print(f"updetr demo: does UP-DETR pre-training help? {len(sweep.cells)} trials on built-in synthetic data "
          f"({path.name}), each cell over seeds {', '.join(map(str, seeds))}:\n"
          f"  updetr-init  pre-train (random query patch detection) -> fine-tune DETR from it, evaluated\n"
          f"  random-init  the same fine-tuning and evaluation from random weights\n"
          f"  answered by {sweep.spec.options.metric} (mean over the seeds, 95 % Welch interval of the difference)",
          file=out, flush=True)
    outcome = run_sweep(path, overrides, name=name, address=address, out=out)
    _shutdown_ray()             # flushes the trials' last lines before the summary
    folder = Path(outcome.sweep.cells[0].experiment.stages[0].cfg.runtime.output_dir) / "compare" / outcome.sweep.name
    table, files, note, error = None, [], None, None
    if outcome.tracking_uri:
        client = MlflowClient(tracking_uri=outcome.tracking_uri)
        try:
            table, files, sel = compare(client, [outcome.sweep.name], [], list(DEFAULT_METRICS),
                                        BASELINE if _has_baseline(outcome) else None, "table", folder)
            note = log_to_sweep(client, sel, files)
        except (QueryError, CompareError) as e:
            error = str(e)
    return DemoOutcome(outcome, table, files, note, error, time.monotonic() - t0, conclusion(outcome))


def _cell_values(outcome, cell: str, metric: str) -> list[float]:
    """The finished trials' values of `metric` in one cell (any seed)."""
    by_name = {c.name: c for c in outcome.sweep.cells}
    return [t.metrics[metric] for t in outcome.trials
            if t.name in by_name and by_name[t.name].cell == cell and not t.error and metric in t.metrics]


def _has_baseline(outcome) -> bool:
    """A random-init trial finished (else the table has no baseline row, and no deltas)."""
    return any(by.cell == BASELINE_CELL for by in outcome.sweep.cells
               for t in outcome.trials if t.name == by.name and not t.error)


def conclusion(outcome) -> Optional[str]:
    """The demo's answer in words: the difference of the sweep's metric (UP-DETR init minus random init) over
    the seeds, its 95 % Welch interval and what that interval supports (None without both cells)."""
    from updetr.stats import difference

    metric = outcome.sweep.spec.options.metric
    treated, base = _cell_values(outcome, TREATED_CELL, metric), _cell_values(outcome, BASELINE_CELL, metric)
    if not treated or not base:
        return None
    scale, label = (100, metric.removeprefix("eval/")) if metric.startswith("eval/") else (1, metric)
    d = difference(treated, base)
    seeds = f"over {len(treated)} seeds" if len(treated) == len(base) else f"over {len(treated)} vs {len(base)} seeds"
    head = f"UP-DETR init {scale * d.delta:+.1f} {label}"
    if d.ci is None:
        return (f"{head} {seeds} (no interval: a cell has fewer than 2 runs or no spread): no difference "
                f"detectable at this scale")
    ci = f"[CI {scale * d.ci[0]:+.1f}, {scale * d.ci[1]:+.1f}]"
    if not d.excludes_zero:
        return f"{head} {ci} {seeds}: no difference detectable at this scale"
    verdict = "pre-training helps" if d.delta > 0 else "pre-training hurts"
    return f"{head} {ci} {seeds}: {verdict} at this scale"


def _shutdown_ray() -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def format_demo(result: DemoOutcome) -> str:
    """The closing lines: the sweep summary, the compare table, the PNGs, the MLflow store and how to open it."""
    from updetr.command_line import cli_command
    from updetr.sweep.tune import format_results

    sw = result.sweep
    cli = cli_command()
    lines = [format_results(sw), ""]
    if result.table is not None:
        lines += ["UP-DETR init vs random init (COCO-style, %; Δ: the gap to random init *):",
                  result.table, ""]
    else:
        lines += [f"no table: {result.error}", ""]
    for f in result.files:
        lines.append(f"{'plot' if f.suffix == '.png' else 'table'}:  {f}")
    if sw.tracking_uri:
        lines.append(f"mlflow: {sw.tracking_uri} (experiment '{sw.sweep.name}', sweep run {sw.parent_run_id}; "
                     f"one child run per trial)")
        if result.note:
            lines.append(f"        {result.note}")
        lines.append(f"  open it:    mlflow ui --backend-store-uri {sw.tracking_uri}   (then http://127.0.0.1:5000; "
                     f"or the leaner {cli} mlflow-server --backend-store-uri {sw.tracking_uri})")
        lines.append(f"  the table:  {cli} compare {sw.sweep.name} --baseline {BASELINE} "
                     f"--tracking-uri {sw.tracking_uri}")
    lines.append(f"demo finished in {result.seconds:.0f} s; the same command again reuses the finished trials "
                 f"(--name NAME for a new study)")
    if result.conclusion:
        lines.append(result.conclusion)
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from updetr.command_line import fail, user_errors
    from updetr.orchestration.run_plan import LaunchError
    from updetr.sweep.spec import SweepError

    try:
        result = run_demo(args.overrides, name=args.name, address=args.address)
    except (SweepError, LaunchError, *user_errors()) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted; re-run the same command to resume the demo", 130)
    print(format_demo(result), flush=True)
    return 1 if result.table is None or any(t.error for t in result.sweep.trials) else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a small study on CPU: UP-DETR pre-trained vs random init over 3 seeds, "
                                    "table with intervals and plots",
                       description="Run experiments/sweeps/demo_updetr-vs-random-init.yaml with `updetr sweep`'s "
                                   "machinery on a local Ray (tracked in ./mlflow.db, run folders in ./runs), "
                                   "then print `updetr compare`'s table and write its plots. Re-running the same "
                                   "command reuses the finished trials.")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to both trials, e.g. stages.finetune.schedule.epochs=20")
    p.add_argument("--name", help="study (sweep) name instead of 'demo': a separate set of trials and runs")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=cmd_demo)
