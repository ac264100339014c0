"""Benchmark: one Deformable DETR training step (forward + focal/L1/GIoU loss with the Hungarian matching +
backward + clip 0.1 + AdamW, the official optimizer groups) of updetr against the official model's PyTorch
path, side by side in one process.

The official model (`../shared/reference/deformable-detr`, Apache-2.0) is built at run time with the CPU shims
of `tests/models/deformable/official.py` (its CUDA op has no CPU path, so its attention runs through
`ms_deform_attn_core_pytorch`, the official code's own PyTorch core). updetr's model loads the official
state dict strictly, so both hold the same weights, and both see the same two images of different sizes
(the batch is padded) with the same targets. The paths are interleaved step by step (official, updetr
default, updetr reference path with every speed-up off, ...) after warm-up, so a change in the machine's
load hits all of them; the figure is the median step.

    python benchmarks/bench_deformable_step.py                              # plain, the paper's shapes
    python benchmarks/bench_deformable_step.py --variant box_refine --scale 0.5 --steps 3

Paper shapes: ResNet-50 (layers 2-4 training at lr_backbone 2e-5), 6 + 6 layers, width 256, FFN 1024, 300
queries, 4 levels, 4 points, batch 2 with images of 800 x 1066 and 736 x 1104 pixels (`--scale` shrinks the
images only).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.models.deformable.official import official_deformable, official_param_groups  # noqa: E402
from updetr.config import load_config  # noqa: E402
from updetr.engine_setup import build_optimizer, use_fused_adamw  # noqa: E402
from updetr.tasks import build_model  # noqa: E402

OFFICIAL_FLAGS = {"plain": [], "box_refine": ["--with_box_refine"],
                  "two_stage": ["--with_box_refine", "--two_stage"]}
OUR_FLAGS = {"plain": [], "box_refine": ["model.with_box_refine=true"],
             "two_stage": ["model.with_box_refine=true", "model.two_stage=true"]}
REFERENCE = ["runtime.fold_frozen_bn=false", "runtime.channels_last=false", "runtime.fused_adamw=false",
             "runtime.onednn_linear=false", "runtime.bool_dropout_masks=false",
             "runtime.prefetch_dropout_masks=false", "runtime.compile=false"]
SIZES = [(800, 1066), (736, 1104)]


def batch(scale: float):
    """Two images (different sizes: the batch pads) and their COCO-id targets (cxcywh)."""
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(3, int(h * scale), int(w * scale), generator=g) for h, w in SIZES]
    targets = [{"labels": torch.tensor([1, 17, 62, 90]), "boxes": torch.tensor(
                    [[0.5, 0.5, 0.4, 0.3], [0.25, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5], [0.1, 0.8, 0.1, 0.2]])},
               {"labels": torch.tensor([3, 17]), "boxes": torch.tensor([[0.4, 0.45, 0.5, 0.6], [0.8, 0.2, 0.2, 0.1]])}]
    return images, targets


def official_optimizer(model, args) -> torch.optim.AdamW:
    """dd:main.py L188-208: AdamW over the three groups by parameter name (an empty group left out)."""
    groups = [g for g in official_param_groups(model, args) if g["params"]]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def train_step(model, criterion, optimizer, images, targets) -> float:
    """Seconds of one training step as both training loops run it (engine.py L43-69 of the official code)."""
    t0 = time.perf_counter()
    out = model(images)
    losses = criterion(out, targets)
    loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=list(OFFICIAL_FLAGS), default="plain")
    ap.add_argument("--scale", type=float, default=1.0, help="image size factor (1 = the paper's 800 px)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per path")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Deformable DETR {args.variant}, images {[(int(h * args.scale), int(w * args.scale)) for h, w in SIZES]}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per path, interleaved", flush=True)
    with official_deformable() as dd:
        torch.manual_seed(0)
        oargs = dd.args("--dataset_file", "coco", *OFFICIAL_FLAGS[args.variant])
        theirs, their_criterion, _ = dd.models.build_model(oargs)
        paths = {"official": (theirs, their_criterion, official_optimizer(theirs, oargs))}
    base = ["task=detect", "data.source=coco", "data.path=/nonexistent", "model.num_classes=91",
            "model.detector=deformable_detr", "model.backbone=resnet50", "tracking.enabled=false",
            *OUR_FLAGS[args.variant]]
    for name, extra in (("updetr default", []), ("updetr reference path", REFERENCE)):
        cfg = load_config(None, base + extra)
        model, criterion, _ = build_model(cfg)
        model.load_state_dict(theirs.state_dict(), strict=True)
        paths[name] = (model, criterion, build_optimizer(model, cfg.optim, fused=use_fused_adamw(cfg, torch.device("cpu"))))
    images, targets = batch(args.scale)
    for m, _, _ in paths.values():
        m.train()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.warmup + args.steps):
        for name, (model, criterion, optimizer) in paths.items():
            seconds = train_step(model, criterion, optimizer, images, targets)
            if i >= args.warmup:
                times[name].append(seconds)
            print(f"  step {i + 1} {name}: {seconds:.2f} s{' (warm-up)' if i < args.warmup else ''}", flush=True)
    base_s = statistics.median(times["official"])
    print(f"\nmedian step (ratio to the official model's PyTorch path, same run):")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<24} {med:7.2f} s/step   x{med / base_s:.2f}   (steps: {', '.join(f'{t:.2f}' for t in ts)})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
