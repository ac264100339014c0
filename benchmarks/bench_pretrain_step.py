"""Benchmark: one UP-DETR pre-training step (forward + backward + AdamW step) at the paper's shapes.

ResNet-50, N=100 queries, M=10 patches of 128x128, a batch of 2 images with shorter side in
320-480 and longer side <= 600. Compares, in the same run and each in its own fresh process:

  frozen   - updetr's frozen backbone: the CNN runs under no_grad (no graph, no gradient memory)
  naive    - the same model with the frozen CNN run under autograd (requires_grad on, lr 0),
             i.e. frozen by the optimizer rather than by the graph

and prints time per step, peak RSS growth during the steps, and the ratios naive / frozen.

    python benchmarks/bench_pretrain_step.py [--steps 5] [--warmup 2] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(variant: str, steps: int, warmup: int, threads: int | None) -> dict:
    import psutil
    import torch

    from updetr.config import load_config
    from updetr.engine import Trainer, train_step

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone=resnet50", "model.num_queries=100", "pretext.num_patches=10",
                             "model.freeze_backbone=true", "runtime.device=cpu"])
    trainer = Trainer(cfg, torch.device("cpu"))
    model = trainer.model
    if variant == "naive":
        # Frozen "by the optimizer": the CNN takes part in autograd but no step ever updates it.
        model.freeze_backbone = False
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    sizes = [(400, 533), (448, 597)]  # (h, w): shorter side from the paper's scales, longer <= 600
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(2, 3, hmax, wmax)
    mask = torch.ones(2, hmax, wmax, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    patches = torch.randn(2, 10, 3, 128, 128, generator=g)
    targets = []
    for _ in sizes:
        c = torch.rand(10, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(10, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.ones(10, dtype=torch.int64), "boxes": torch.cat([c, wh], 1)})
    batch = {"images": images, "mask": mask, "patches": patches, "targets": targets}

    def step():
        return train_step(model, trainer.criterion, batch, trainer.optimizer, device=torch.device("cpu"),
                          clip_max_norm=0.1)

    for _ in range(warmup):
        step()
    rss0 = psutil.Process().memory_info().rss
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    return {"variant": variant, "step_s": sorted(times)[len(times) // 2], "mean_s": sum(times) / len(times),
            "peak_rss_mb": peak / 2**20, "peak_over_steady_mb": (max(peak, peak0) - rss0) / 2**20,
            "grad_values": grads, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", choices=["frozen", "naive"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.warmup, a.threads)))
        return
    results = {}
    for variant in ("frozen", "naive"):
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:7s} median {r['step_s']:.3f} s/step (mean {r['mean_s']:.3f}), peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"grad values {r['grad_values']:,}, threads {r['threads']}")
    f, n = results["frozen"], results["naive"]
    print(f"naive/frozen: time x{n['step_s'] / f['step_s']:.2f}, peak RSS x{n['peak_rss_mb'] / f['peak_rss_mb']:.2f} "
          f"(+{n['peak_rss_mb'] - f['peak_rss_mb']:.0f} MB), gradient values x{n['grad_values'] / f['grad_values']:.2f}")


if __name__ == "__main__":
    main()
