"""`updetr sweep SWEEP.yaml [k=v ...] --dry-run`: expand and validate a sweep, list its trials."""
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
    from updetr.cli import fail
    from updetr.sweep.spec import SweepError, load_sweep

    try:
        sweep = load_sweep(args.sweep, args.overrides, name=args.name)
    except SweepError as e:
        return fail(str(e))
    print(format_plan(sweep), flush=True)
    if args.dry_run:
        return 0
    return fail("running a sweep on Ray Tune is not available yet; --dry-run validates every cell and lists "
                "the trials", 3)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="a grid of experiment variants (see experiments/sweeps/)")
    p.add_argument("sweep", help="sweep YAML: base experiment, grid / zip / variants, options")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to every cell after the sweep's own (stages.<s>.k: only where stage s exists)")
    p.add_argument("--name", help="sweep name instead of the file's name: / stem")
    p.add_argument("--dry-run", action="store_true", help="validate every cell and list the trials; run nothing")
    p.set_defaults(func=cmd_sweep)
