"""Evaluation throughput: images/s of `updetr eval` in one process vs on 2 Ray Train workers, and the cost of
the DDP gather (each rank's detections to rank 0 before the one COCOeval), in the same benchmark run.

Both paths score the same randomly initialised checkpoint of the smoke model (ResNet-18, d=64, N=10) on the
same synthetic COCO split, with DETR's evaluation transform (shorter side 800, longer <= 1333, one image
per batch). "Forward" rates are images over the time spent in the model loop (on Ray: the whole split over
rank 0's loop time; ranks hold equal parts); "wall" includes loading, COCOeval and, on Ray, start-up.

    python benchmarks/bench_eval.py --images 32
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    import torch

    from updetr.checkpoint import make_checkpoint, save_checkpoint
    from updetr.config import load_config
    from updetr.local import eval_local
    from updetr.orchestration.launch import run_eval
    from updetr.tasks import get_task

    store = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    common = [f"data.synthetic_val_images={args.images}", "data.synthetic_images=2", "data.source=synthetic_coco",
              f"data.path={store}/coco", "task=detect", "detection.eval_size=800", "detection.max_size=1333",
              "tracking.enabled=false", "runtime.device=cpu", f"ray.storage_path={store}/ray", "data.num_workers=0"]
    base = load_config(REPO / "experiments" / "smoke.yaml", common)
    torch.manual_seed(0)
    model, _, _ = get_task(base).build()
    ckpt = save_checkpoint(make_checkpoint(model.state_dict()), store / "model.pt")

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    single = eval_local(load_config(REPO / "experiments" / "smoke.yaml", common + [f"runtime.threads={args.threads}"]),
                        ckpt)
    single_wall = time.perf_counter() - t0

    t0 = time.perf_counter()
    ray_m, _ = run_eval(load_config(REPO / "experiments" / "smoke.yaml",
                                    common + ["ray.num_workers=2", "ray.cpus_per_worker=1", "runtime.threads=1"]),
                        str(ckpt))
    ray_wall = time.perf_counter() - t0
    assert ray_m["AP"] == single["AP"] and ray_m["images"] == single["images"], (ray_m, single)

    n = single["images"]
    f1 = n / single["seconds"]
    f2 = n / ray_m["seconds"]
    print(f"images: {int(n)} (synthetic, resized to shorter side 800); AP identical on both paths: {single['AP']:.4f}")
    print("| path | forward images/s | wall s | gather s |")
    print("|---|---|---|---|")
    print(f"| 1 process, {args.threads} threads | {f1:.2f} | {single_wall:.1f} | - |")
    print(f"| 2 Ray workers x 1 thread | {f2:.2f} | {ray_wall:.1f} | {ray_m['gather_seconds']:.4f} |")
    print(f"ratio 2 workers / 1 process (forward): x{f2 / f1:.2f}; gather = "
          f"{100 * ray_m['gather_seconds'] / ray_m['seconds']:.2f} % of rank 0's evaluation time")


if __name__ == "__main__":
    main()
