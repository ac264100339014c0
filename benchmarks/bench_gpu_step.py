"""Benchmark: one UP-DETR pre-training step on a GPU, the official code against updetr's paths, at several batch
sizes, each path in its own process.

Paper shapes: ResNet-50 frozen (`--fre_cnn`), pre-norm, feature reconstruction, N=100 queries, M=10 patches of
128x128, images of 400x533 and 448x597 in turn (padded to 448x597), AdamW, clip 0.1. Every step copies the batch
from host memory and reads the loss, as both training loops do.

  official    the official UP-DETR code (`../shared/reference/up-detr`, Apache-2.0) through its own
              `engine.train_one_epoch` (its per-term `.item()` logging included), CUDA defaults of PyTorch
  reference   updetr with every speed-up off (the official arithmetic op for op)
  default     updetr's defaults on CUDA as shipped (channels-last, BN fold, fused AdamW, torch.compile)
  eager       the defaults without torch.compile
  bf16        the defaults + bf16 autocast
  tf32        the defaults + TF32 matmuls (`runtime.tf32=true`)

Prints per path and batch: median s/step, images/s, ratio to the official step, first-step seconds (torch.compile
included where on), peak GPU memory, and achieved TFLOP/s (forward + backward FLOPs of one step counted once
with `torch.utils.flop_counter`, divided by the step time); then images/s at the largest batch over the smallest.
The batch sizes run in one process per path, smallest first (compile's shapes turn dynamic at the second).

    python benchmarks/bench_gpu_step.py                          # cuda, batches 2 16 64, every path
    python benchmarks/bench_gpu_step.py --device cpu --scale 0.25 --batches 2 --steps 2 --paths official,eager

`--scale` shrinks images and patches (a quick check on a CPU); `--budget` (seconds) stops starting paths
once spent, so one run fits a lent machine's time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO.parent / "shared" / "reference" / "up-detr"
SHAPE = ["model.backbone=resnet50", "model.num_queries=100", "pretext.num_patches=10", "model.pre_norm=true",
         "model.freeze_backbone=true", "tracking.enabled=false"]
REFERENCE = ["runtime.fold_frozen_bn=false", "runtime.channels_last=false", "runtime.fused_adamw=false",
             "runtime.onednn_linear=false", "runtime.bool_dropout_masks=false",
             "runtime.prefetch_dropout_masks=false", "runtime.compile=false", "runtime.precision=fp32"]
PATHS = {"official": None, "reference": REFERENCE, "default": [], "eager": ["runtime.compile=false"],
         "bf16": ["runtime.precision=bf16"], "tf32": ["runtime.tf32=true"]}


def make_batch(batch: int, scale: float, seed: int = 1):
    """(images list `[3, H_i, W_i]`, patches `[B, 10, 3, P, P]`, targets) on the host; sizes alternate."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sizes = [(int(400 * scale), int(533 * scale)), (int(448 * scale), int(597 * scale))]
    images = [torch.randn(3, *sizes[i % 2], generator=g) for i in range(batch)]
    p = max(16, int(128 * scale))
    patches = torch.randn(batch, 10, 3, p, p, generator=g)
    targets = []
    for _ in range(batch):
        c = torch.rand(10, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(10, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.ones(10, dtype=torch.int64), "boxes": torch.cat([c, wh], 1)})
    return images, patches, targets


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _official_runner(device: str, lr: float = 1e-4):
    """`run(images, patches, targets, steps)`: the official `train_one_epoch` over `steps` copies of the batch."""
    import contextlib
    import io

    import torch

    sys.path.insert(0, str(OFFICIAL))
    main, models, misc, engine = (__import__(m, fromlist=["_"]) for m in ("main", "models", "util.misc", "engine"))
    args = main.get_args_parser().parse_args(["--pre_norm", "--feature_recon", "--fre_cnn", "--num_patches", "10",
                                              "--device", device])
    args.dataset_file, args.masks = "ImageNet", None  # what up:main.py main() sets before building
    args.lr_backbone = 0
    # Its ResNet-50 fetches SwAV weights from the internet at build time; nothing may download here, and the
    # step's time does not depend on the values: the CNN keeps torchvision's random initialisation.
    fetch = torch.hub.load_state_dict_from_url
    torch.hub.load_state_dict_from_url = lambda *a, **k: {}
    try:
        model, criterion, _ = models.build_model(args)
    finally:
        torch.hub.load_state_dict_from_url = fetch
    model.to(device)
    groups = [{"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
              {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
               "lr": args.lr_backbone}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)

    def run(images, patches, targets, steps: int) -> None:
        samples = misc.nested_tensor_from_tensor_list(images)
        loader = [(samples, patches, targets)] * steps
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            engine.train_one_epoch(model, criterion, loader, optimizer, torch.device(device), 0, args.clip_max_norm)
    return run


def _updetr_runner(device: str, overrides: list[str]):
    import torch

    sys.path.insert(0, str(REPO))
    from updetr.config import load_config
    from updetr.data.collate import pad_images
    from updetr.engine import Trainer, train_step

    cfg = load_config(None, SHAPE + [f"runtime.device={device}"] + overrides)
    trainer = Trainer(cfg, torch.device(device))

    def run(images, patches, targets, steps: int) -> None:
        imgs, mask = pad_images(images)
        batch = {"images": imgs, "mask": mask, "patches": patches, "targets": targets}
        for _ in range(steps):
            train_step(trainer.train_model, trainer.criterion, batch, trainer.optimizer, device=torch.device(device),
                       clip_max_norm=cfg.optim.clip_max_norm, precision=cfg.runtime.precision)
    return run, trainer


def step_flops(device: str, batch: int, scale: float) -> float:
    """Forward + backward FLOPs of one step of the reference path (the work every path does)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    run, _ = _updetr_runner(device, REFERENCE)
    images, patches, targets = make_batch(batch, scale)
    with FlopCounterMode(display=False) as counter:
        run(images, patches, targets, 1)
    return float(counter.get_total_flops())


def child(path: str, device: str, batches: list[int], steps: int, warmup: int, scale: float) -> dict:
    import torch

    torch.manual_seed(0)
    run = _official_runner(device) if path == "official" else _updetr_runner(device, PATHS[path])[0]
    out = {"path": path, "batches": {}}
    for b in batches:
        images, patches, targets = make_batch(b, scale)
        t = time.perf_counter()
        run(images, patches, targets, 1)
        _sync(device)
        first = time.perf_counter() - t
        if warmup > 1:
            run(images, patches, targets, warmup - 1)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            _sync(device)
            t = time.perf_counter()
            run(images, patches, targets, 1)
            _sync(device)
            times.append(time.perf_counter() - t)
        row = {"step_s": statistics.median(times), "first_step_s": first}
        if device == "cuda":
            row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["batches"][str(b)] = row
    return out


def _spawn(args: list[str], timeout: float) -> dict:
    done = subprocess.run([sys.executable, __file__] + args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="2,16,64")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; no path starts after it is spent")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    if a.flops:
        print(json.dumps({str(b): step_flops(a.device, b, a.scale) for b in batches}))
        return 0
    if a.child:
        print(json.dumps(child(a.child, a.device, batches, a.steps, a.warmup, a.scale)))
        return 0
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (use --device cpu for a quick check of the script)")
        return 0
    t0 = time.perf_counter()
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    cuda = f", CUDA {torch.version.cuda}" if a.device == "cuda" else ""
    print(f"{where}; torch {torch.__version__}{cuda}; batches {batches}, images x{a.scale}; "
          f"{a.warmup} warm-up + {a.steps} timed steps; each path in its own process", flush=True)
    common = ["--device", a.device, "--batches", a.batches, "--scale", str(a.scale)]
    flops = _spawn(common + ["--flops"], a.budget)
    results = {}
    for path in a.paths.split(","):
        left = a.budget - (time.perf_counter() - t0)
        if left <= 0:
            print(f"  {path}: not run (budget spent)")
            continue
        results[path] = _spawn(common + ["--child", path, "--steps", str(a.steps), "--warmup", str(a.warmup)], left)
        print(f"  {path}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    official = results.get("official", {}).get("batches", {})
    print(f"\n{'path':<10} {'batch':>5} {'s/step':>8} {'img/s':>8} {'vs official':>11} {'first s':>8} "
          f"{'peak GB':>8} {'TFLOP/s':>8}")
    for path, res in results.items():
        if "error" in res:
            print(f"{path:<10} failed: {res['error']}")
            continue
        for b, row in res["batches"].items():
            ratio = f"x{row['step_s'] / official[b]['step_s']:.2f}" if b in official else "-"
            tflops = f"{flops[b] / row['step_s'] / 1e12:.2f}" if b in flops else "-"
            peak = f"{row['peak_gpu_gb']:.1f}" if "peak_gpu_gb" in row else "-"
            print(f"{path:<10} {b:>5} {row['step_s']:8.3f} {int(b) / row['step_s']:8.1f} {ratio:>11} "
                  f"{row['first_step_s']:8.1f} {peak:>8} {tflops:>8}")
        rows = res["batches"]
        lo, hi = str(min(batches)), str(max(batches))
        if lo != hi and lo in rows and hi in rows:
            gain = (int(hi) / rows[hi]["step_s"]) / (int(lo) / rows[lo]["step_s"])
            print(f"{'':<10} images/s at batch {hi} over batch {lo}: x{gain:.1f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
