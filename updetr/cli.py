"""The `updetr` command: argparse subcommands; each area registers its own (data, orchestration)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Optional

from updetr.command_line import fail, user_errors
from updetr.config import ConfigError, config_to_yaml, load_experiment

# Areas that add subcommands through a `register(subparsers)` function in their own module.
COMMAND_MODULES = ("updetr.data.commands", "updetr.orchestration.commands", "updetr.sweep.commands",
                   "updetr.demo", "updetr.compare", "updetr.tracking_sync")


# One example per command, shown at the end of its --help (tests/core/test_cli_help.py checks that every
# command has one and that it parses). Groups (`config`, `data`, ...) show their actions' examples.
EXAMPLES = {
    "config show": "updetr config show experiments/smoke.yaml pretext.num_patches=5 model.num_queries=20",
    "config validate": "updetr config validate experiments/smoke_chain.yaml",
    "debug": "updetr debug experiments/smoke.yaml schedule.max_steps=10",
    "eval": "updetr eval experiments/smoke_chain.yaml --checkpoint runs/smoke_chain-finetune/checkpoints/last.pt",
    "checkpoint convert": "updetr checkpoint convert updetr_pretrain.pth pre.pt",
    "visualize": "updetr visualize runs/smoke IMAGE.jpg --random 2 --compare --out fig5.png",
    "data shard": "updetr data shard /data/imagenet/train /data/imagenet-shards --shard-size 1000",
    "data synth": "updetr data synth demo_images --kind images --n 8",
    "run": "updetr run experiments/smoke_chain.yaml",
    "submit": "updetr submit experiments/smoke.yaml --address http://127.0.0.1:8265 --follow",
    "jobs list": "updetr jobs list --address http://127.0.0.1:8265",
    "jobs status": "updetr jobs status raysubmit_XXXX --address http://127.0.0.1:8265",
    "jobs logs": "updetr jobs logs raysubmit_XXXX --follow --address http://127.0.0.1:8265",
    "jobs stop": "updetr jobs stop raysubmit_XXXX --address http://127.0.0.1:8265",
    "mlflow-server": "updetr mlflow-server --port 5000",
    "tracking sync": "updetr tracking sync runs/smoke",
    "local-cluster": "updetr local-cluster up",
    "sweep": "updetr sweep experiments/sweeps/table5_frozen-cnn_feature-recon_smoke.yaml --dry-run",
    "demo": "updetr demo",
    "compare": "updetr compare demo --baseline run=random-init",
}


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps text as usual, but keeps the example lines of the epilog whole (a command is copied, not read)."""

    def _fill_text(self, text, width, indent):
        if not text.startswith("example"):
            return super()._fill_text(text, width, indent)
        return "".join(indent + line for line in text.splitlines(keepends=True))


def command_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, help, parser) below `parser`, depth first, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield path + (name,), helps.get(name) or "", sub
                yield from command_parsers(sub, path + (name,))


def _add_examples(parser: argparse.ArgumentParser) -> None:
    for path, _, sub in command_parsers(parser):
        name = " ".join(path)
        lines = [EXAMPLES[name]] if name in EXAMPLES else [v for k, v in EXAMPLES.items() if k.startswith(name + " ")]
        sub.formatter_class = _HelpFormatter
        if lines:
            sub.epilog = "example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(f"  {ln}" for ln in lines)


def command_table(parser: argparse.ArgumentParser) -> str:
    """What `updetr` alone prints: every command (and action) in one line each."""
    rows = [(" ".join(path), text) for path, text, sub in command_parsers(parser)
            if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["updetr: UP-DETR pre-training, fine-tuning, sweeps and comparisons on Ray, tracked in MLflow",
                      "", "commands:", *(f"  {name:<{width}}  {text}" for name, text in rows), "",
                      "`updetr COMMAND --help` shows a command's options and an example; "
                      "start with `updetr demo` (a small study on CPU, a few minutes)."])


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment YAML (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. schedule.max_steps=10")


def cmd_config_show(args) -> int:
    try:
        exp = load_experiment(args.experiment, args.overrides)
    except ConfigError as e:
        return fail(str(e))
    for stage in exp.stages:
        if exp.chained:
            sys.stdout.write(f"# --- stage {stage.name} ({stage.action})\n")
        sys.stdout.write(config_to_yaml(stage.cfg))
    return 0


def cmd_config_validate(args) -> int:
    try:
        exp = load_experiment(args.experiment, args.overrides)
    except ConfigError as e:
        return fail(str(e))
    parts = ", ".join(f"{s.name}: {s.action} {s.cfg.task}" if exp.chained else f"{s.cfg.task}" for s in exp.stages)
    print(f"{args.experiment}: OK ({parts} '{exp.name}')")
    return 0


def cmd_debug(args) -> int:
    from updetr.local import DebugInterrupted, run_debug

    try:
        exp = load_experiment(args.experiment, args.overrides)
        if exp.chained:
            from updetr.pipeline import DebugDriver, chain_summary, run_chain

            if args.overwrite:
                return fail("--overwrite does not apply to a chained experiment: finished stages are skipped and "
                            "an unfinished one resumes; set name=... for a fresh chain")
            print(chain_summary(run_chain(exp, DebugDriver())), flush=True)
        else:
            run_debug(exp.stages[0].cfg, resume=args.resume, overwrite=args.overwrite)
    except user_errors() as e:
        return fail(str(e))
    except DebugInterrupted as e:
        return fail(str(e), 130)
    except KeyboardInterrupt:
        return fail("interrupted before training started; nothing to keep", 130)
    return 0


def _norm_of_the_weights(cfg, experiment, overrides, checkpoint):
    """Evaluating given weights: an unset model.pre_norm follows the checkpoint's transformer (the per-task
    default assumes training from scratch, post-norm, for a detect stage without init.checkpoint)."""
    from updetr.checkpoint import weights_pre_norm
    from updetr.config import resolve_dict
    from updetr.config.task_defaults import sets_pre_norm

    if sets_pre_norm(resolve_dict(experiment, None), overrides):
        return cfg
    pre_norm = weights_pre_norm(checkpoint)
    if pre_norm is None or pre_norm == cfg.model.pre_norm:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"pre_norm": pre_norm})})


def cmd_eval(args) -> int:
    """`updetr eval EXP --checkpoint PATH`: the COCO table of any checkpoint on the experiment's eval split."""
    from updetr.tasks import get_task, task_class

    try:
        exp = load_experiment(args.experiment, args.overrides)
        evals = [s for s in exp.stages if task_class(s.cfg.task).has_eval]
        if not evals:
            return fail(f"{args.experiment}: no detection or one-shot stage to take the evaluation split from")
        cfg = evals[-1].cfg
        cfg = cfg.model_copy(update={"init": cfg.init.model_copy(update={"checkpoint": None})})
        cfg = _norm_of_the_weights(cfg, args.experiment, args.overrides, args.checkpoint)
        if args.ray or args.address:
            from updetr.orchestration.launch import run_eval
            from updetr.orchestration.run_plan import LaunchError

            try:
                metrics, _ = run_eval(cfg, args.checkpoint, address=args.address)
            except LaunchError as e:
                return fail(str(e))
        else:
            from updetr.local import eval_local

            out = Path(args.results) if args.results else None
            metrics = eval_local(cfg, args.checkpoint, results_path=out)
    except user_errors() as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    speed = metrics["images"] / max(metrics["seconds"], 1e-9)
    print(get_task(cfg).format_table(metrics, f"[{cfg.name}] {args.checkpoint}: {int(metrics['images'])} images, "
                                f"{speed:.1f} img/s per process"), flush=True)
    return 0


def cmd_checkpoint_convert(args) -> int:
    from updetr.checkpoint import CheckpointError, convert_official

    try:
        report = convert_official(args.src, args.dst)
    except CheckpointError as e:
        return fail(str(e))
    kind = "UP-DETR pre-training" if report["pretrain_heads"] else "DETR / fine-tuned"
    if report["detector"] == "deformable_detr":
        variant = [name for key, name in (("with_box_refine", "box refinement"), ("two_stage", "two-stage"))
                   if report[key]]
        kind = "Deformable DETR" + (f" ({', '.join(variant)})" if variant else "")
    norm = "pre-norm" if report["pre_norm"] else "post-norm"
    print(f"converted {args.src} -> {args.dst}: {report['keys']} tensors, {kind} model, {norm} transformer")
    return 0


def cmd_visualize(args) -> int:
    """`updetr visualize CHECKPOINT IMAGE`: Fig. 5, the boxes a pre-trained model finds for query patches."""
    from updetr.visualize import VisualizeError, format_result, visualize

    if args.width < 64:
        return fail(f"--width {args.width}: must be at least 64")
    try:
        results = visualize(args.checkpoint, args.image, patches=args.patches, random=args.random, out=args.out,
                            compare=args.compare, config=args.config, seed=args.seed, size=args.size,
                            width=args.width)
    except (VisualizeError, *user_errors()) as e:
        return fail(str(e))
    print(f"wrote {args.out}")
    for r in results:
        print(format_result(r))
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

    p = sub.add_parser("eval", help="COCO-style AP of a checkpoint on the experiment's evaluation split")
    _add_experiment_args(p)
    p.add_argument("--checkpoint", required=True, help="updetr checkpoint (ours, or converted official .pth)")
    p.add_argument("--results", help="also write the detections as a COCO results JSON file here")
    p.add_argument("--ray", action="store_true", help="evaluate on Ray Train workers (ray.num_workers)")
    p.add_argument("--address", help="Ray cluster address (implies --ray)")
    p.set_defaults(func=cmd_eval)

    p_ck = sub.add_parser("checkpoint", help="checkpoint tools")
    ck_sub = p_ck.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    p = ck_sub.add_parser("convert", help="convert an official UP-DETR/DETR/Deformable DETR .pth to updetr's format (loaded as data only)")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_checkpoint_convert)

    p = sub.add_parser("visualize", help="Fig. 5: where a pre-trained model finds query patches (PNG)",
                       description="Crop query patches from IMAGE, run the pre-trained model with them and draw "
                                   "the best box of each patch's query group into a PNG.")
    p.add_argument("checkpoint", help="pre-training checkpoint: file, debug run folder or Ray checkpoint directory; "
                                      "ours or converted with `updetr checkpoint convert`")
    p.add_argument("image", help="image file")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--patches", nargs="+", metavar="x,y,w,h", help="query patches in image pixels")
    g.add_argument("--random", type=int, metavar="M",
                   help="draw M patches with the pre-training sampler (default: pretext.num_patches)")
    p.add_argument("--out", default="patch_queries.png", help="PNG to write (default: patch_queries.png)")
    p.add_argument("--compare", action="store_true", help="also draw the patch boxes (dashed) and the IoU")
    p.add_argument("--config", help="pre-training experiment YAML, for a checkpoint that stores no config")
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    p.add_argument("--size", type=int, help="shorter side of the model input (default: largest pretext.scales)")
    p.add_argument("--width", type=int, default=800, help="PNG width in pixels (default 800)")
    p.set_defaults(func=cmd_visualize)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module, not an absent area
                raise
            continue
        module.register(sub)
    _add_examples(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        print(command_table(parser))
        return 0
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
