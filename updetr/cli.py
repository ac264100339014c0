"""The `updetr` command: argparse subcommands; each area registers its own (data, orchestration)."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

from updetr.config import ConfigError, config_to_yaml, load_config

# Areas that add subcommands through a `register(subparsers)` function in their own module.
COMMAND_MODULES = ("updetr.data.commands", "updetr.orchestration.commands")


def cli_command() -> str:
    """How to call updetr in a printed hint: `updetr` when that is on PATH and is this installation, else
    this interpreter's `python -m updetr` (e.g. an unactivated venv)."""
    import os
    import shutil

    found = shutil.which("updetr")
    mine = os.path.join(os.path.dirname(sys.executable), "updetr")
    if found and (os.path.realpath(found) == os.path.realpath(mine) or not os.path.exists(mine)):
        return "updetr"
    if os.path.exists(mine):
        return mine
    return f"{sys.executable} -m updetr"


def fail(message: str, code: int = 2) -> int:
    """Print a one-line-per-cause error (no traceback) and return the exit code."""
    print(f"updetr: error: {message}", file=sys.stderr)
    return code


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment YAML (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. schedule.max_steps=10")


def cmd_config_show(args) -> int:
    try:
        cfg = load_config(args.experiment, args.overrides)
    except ConfigError as e:
        return fail(str(e))
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def cmd_config_validate(args) -> int:
    try:
        cfg = load_config(args.experiment, args.overrides)
    except ConfigError as e:
        return fail(str(e))
    print(f"{args.experiment}: OK ({cfg.stage} '{cfg.name}')")
    return 0


def cmd_debug(args) -> int:
    from updetr.checkpoint import CheckpointError
    from updetr.local import DebugInterrupted, RunDirError, run_debug

    try:
        cfg = load_config(args.experiment, args.overrides)
        run_debug(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, RunDirError) as e:
        return fail(str(e))
    except DebugInterrupted as e:
        return fail(str(e), 130)
    except KeyboardInterrupt:
        return fail("interrupted before training started; nothing to keep", 130)
    return 0


def cmd_checkpoint_convert(args) -> int:
    from updetr.checkpoint import CheckpointError, convert_official

    try:
        report = convert_official(args.src, args.dst)
    except CheckpointError as e:
        return fail(str(e))
    kind = "UP-DETR pre-training" if report["pretrain_heads"] else "DETR / fine-tuned"
    norm = "pre-norm" if report["pre_norm"] else "post-norm"
    print(f"converted {args.src} -> {args.dst}: {report['keys']} tensors, {kind} model, {norm} transformer")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from updetr import __version__

    parser = argparse.ArgumentParser(prog="updetr", description="UP-DETR experiment platform")
    parser.add_argument("--version", action="version", version=f"updetr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_cfg = sub.add_parser("config", help="show or validate an experiment config")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = cfg_sub.add_parser("show", help="print the resolved config (defaults + base + file + overrides)")
    _add_experiment_args(p)
    p.set_defaults(func=cmd_config_show)
    p = cfg_sub.add_parser("validate", help="check a config; exit 2 with the field and reason when invalid")
    _add_experiment_args(p)
    p.set_defaults(func=cmd_config_validate)

    p = sub.add_parser("debug", help="train in this process without Ray (CPU or one GPU)")
    _add_experiment_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from <output_dir>/<name>/checkpoints/last.pt (the default when it exists)")
    p.add_argument("--overwrite", action="store_true", help="start again from step 0 even if a checkpoint exists")
    p.set_defaults(func=cmd_debug)

    p_ck = sub.add_parser("checkpoint", help="checkpoint tools")
    ck_sub = p_ck.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    p = ck_sub.add_parser("convert", help="convert an official UP-DETR/DETR .pth (trusted input) to updetr's format")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_checkpoint_convert)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module, not an absent area
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`debug EXP --resume k=v`), which argparse leaves unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
