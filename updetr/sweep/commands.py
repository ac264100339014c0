"""`updetr sweep SWEEP.yaml [k=v ...] [--dry-run] [--address ADDR]`: validate every cell, list the trials, run
them on Ray Tune (updetr/sweep/tune.py)."""
from __future__ import annotations

import argparse


def format_plan(sweep) -> str:
    """The cells of a sweep, one line each: trial name, experiment file and the cell's settings."""
    lines = [f"sweep {sweep.name}: {len(sweep.cells)} cells ({sweep.path})"]
    width = max(len(c.name) for c in sweep.cells)
    for cell in sweep.cells:
        stages = " -> ".join(s.name for s in cell.experiment.stages)
        params = " ".join(f"{k}={v}" for k, v in cell.params.items()) or "-"
        lines.append(f"  {cell.name:<{width}}  {cell.experiment_path.name} [{stages}]  {params}")
    opts = sweep.spec.options
    lines.append(f"summary metric: {opts.metric} ({opts.mode})"
                 + (f"; early stopping: ASHA on {opts.early_stopping.metric}" if opts.early_stopping else ""))
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    from updetr.command_line import fail
    from updetr.sweep.spec import SweepError, load_sweep

    try:
        sweep = load_sweep(args.sweep, args.overrides, name=args.name)
    except SweepError as e:
        return fail(str(e))
    print(format_plan(sweep), flush=True)
    if args.dry_run:
        return 0
    from updetr.command_line import user_errors
    from updetr.orchestration.run_plan import LaunchError
    from updetr.sweep.tune import format_results, run_sweep

    try:
        outcome = run_sweep(args.sweep, args.overrides, name=args.name, address=args.address)
    except (SweepError, LaunchError, *user_errors()) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted; re-run the same command to resume the sweep", 130)
    print(format_results(outcome), flush=True)
    if outcome.parent_run_id:
        print(f"mlflow: sweep run {outcome.parent_run_id} at {outcome.tracking_uri}; "
              f"table: updetr compare {outcome.sweep.name} --tracking-uri {outcome.tracking_uri}")
    return 1 if any(t.error for t in outcome.trials) else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a grid of experiment variants (see experiments/sweeps/)")
    p.add_argument("sweep", help="sweep YAML: base experiment, grid / zip / variants, options")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to every cell after the sweep's own (stages.<s>.k: only where stage s exists)")
    p.add_argument("--name", help="sweep name instead of the file's name: / stem")
    p.add_argument("--dry-run", action="store_true", help="validate every cell and list the trials; run nothing")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=cmd_sweep)
