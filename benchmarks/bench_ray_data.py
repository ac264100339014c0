"""End to end on 1 and 2 CPUs: the Ray Data pipeline into a consumer vs a DataLoader with the reference
transforms, images/s per CPU, and the scaling from 1 to 2 CPUs.

On the photo set of `photo_set.py` (real JPEG photographs, 300-1400 px per side) each measurement runs in
its own process pinned to the first `cpus` cores (`sched_setaffinity`, inherited by every child: the
DataLoader workers, the raylet and the Ray workers), so both sides get exactly the same CPUs:
  reference : `DataLoader(num_workers=cpus)` over the official dataset transforms (`bench_pipeline.
              NaiveSelfDet`: PIL + torchvision per patch, float tensors cross the process boundary) with
              DETR's padding collate, consumed in the main process;
  updetr    : `ray.init(num_cpus=cpus)`, `build_pretrain_dataset` (read_binary_files -> preprocessing
              actors, one per CPU) and `iter_worker_batches` in the driver, which is what a Ray Train
              worker runs (the consumer pads and normalises, uint8 records cross the object store),
              default settings (full decode).
Both are timed over the middle of the epoch (25 % to 85 % of the images: steady state, start-up and the
final drain left out; the Ray pass is the second one, the first warms Ray's worker processes), in wall
clock per CPU and in images per CPU-second of every process involved (robust to other load). Runs are
interleaved (reference, updetr, for 1 and 2 CPUs, `--reps` times) and the medians are reported, since
the machine may be shared.

    python benchmarks/bench_ray_data.py [--images 240] [--reps 3] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _pin(cpus: int) -> None:
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) < cpus:
        raise SystemExit(f"need {cpus} CPUs, this process may use {len(avail)}")
    os.sched_setaffinity(0, set(avail[:cpus]))


class Meter:
    """Images, wall time and CPU time of this process and all its descendants (DataLoader workers; the
    raylet, GCS and Ray workers) over the middle of the epoch: from the batch that completes 25 % of the
    images to the one that completes 85 %. Both ends then fall in the steady state with full prefetch
    queues, so images decoded before the window but consumed in it roughly cancel those decoded in it
    but consumed after it (start-up and the final drain are left out)."""

    def __init__(self, total: int, start: float = 0.25, end: float = 0.85) -> None:
        import psutil

        self.proc, self.total = psutil.Process(), total
        self.start, self.end = int(start * total), int(end * total)
        self.n = 0
        self.n0 = self.t0 = self.t1 = self.c1 = None
        self.c0: dict = {}
        self.t_first = None

    def _cpu(self) -> dict:
        out = {}
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except Exception:  # noqa: BLE001 - a process that just ended
                pass
        return out

    def add(self, images: int) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.n += images
        if self.t0 is None and self.n >= self.start:
            self.t0, self.n0, self.c0 = time.perf_counter(), self.n, self._cpu()
        elif self.t0 is not None and self.t1 is None and self.n >= self.end:
            self.t1, self.n1, end = time.perf_counter(), self.n, self._cpu()
            self.c1 = sum(v - self.c0.get(pid, 0.0) for pid, v in end.items())

    def result(self) -> dict:
        if self.t1 is None:
            raise RuntimeError(f"epoch ended after {self.n} of {self.total} images")
        k = self.n1 - self.n0
        return {"images": self.n, "rate": k / (self.t1 - self.t0), "cpu_rate": k / self.c1}


def measure_reference(root: Path, cpus: int, batch_size: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from bench_pipeline import NaiveSelfDet, bench_config, naive_collate

    torch.set_num_threads(1)
    cfg = bench_config(root, batch_size, "full")
    paths = sorted(root.rglob("*.JPEG"))
    loader = DataLoader(NaiveSelfDet(paths, cfg.pretext), batch_size=batch_size, num_workers=cpus,
                        collate_fn=naive_collate, worker_init_fn=lambda _: torch.set_num_threads(1),
                        prefetch_factor=2)
    meter = Meter(len(paths))
    for b in loader:
        meter.add(b[0].shape[0])
    return meter.result()


def measure_ray(root: Path, cpus: int, batch_size: int) -> dict:
    import logging

    import ray
    import torch

    from bench_pipeline import bench_config
    from updetr.data.ray_pipeline import build_pretrain_dataset, iter_worker_batches

    torch.set_num_threads(1)
    # one actor per CPU; the fractional request leaves room for the 0.25-CPU read tasks (logical CPUs:
    # the physical ones are fixed by the affinity mask)
    cfg = bench_config(root, batch_size, "full",
                       [f"data.num_workers={cpus}", f"data.preprocess_cpus={(cpus - 0.25) / cpus:.4f}"])
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             _temp_dir=os.environ.get("RAY_TMPDIR"))
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = build_pretrain_dataset(cfg)
        total = len(list(root.rglob("*.JPEG")))
        for epoch in range(2):  # epoch 0 warms Ray's worker processes
            t0 = time.perf_counter()
            meter = Meter(total)
            for b in iter_worker_batches(ds.iterator(), cfg, epoch):
                meter.add(b["images"].shape[0])
        return dict(meter.result(), first_batch_s=meter.t_first - t0)
    finally:
        ray.shutdown()


def run_one(kind: str, root: Path, cpus: int, batch_size: int) -> dict:
    """One measurement in a fresh pinned process (own RAY_TMPDIR, removed afterwards)."""
    tmp = tempfile.mkdtemp(prefix="rb_", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=tmp, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, __file__, "--one", kind, "--root", str(root), "--cpus", str(cpus),
           "--batch-size", str(batch_size)]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} on {cpus} CPU(s) failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--keep", help="write the images here and keep them")
    ap.add_argument("--one", choices=("reference", "ray"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--cpus", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _pin(args.cpus)
        fn = measure_reference if args.one == "reference" else measure_ray
        print(json.dumps(fn(Path(args.root), args.cpus, args.batch_size)))
        return 0

    from photo_set import make_photo_set

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="updetr_raybench_"))
    try:
        paths = sorted(root.rglob("*.JPEG")) if args.keep and any(root.rglob("*.JPEG")) \
            else make_photo_set(root, args.images)
        print(f"{len(paths)} JPEG photographs; {os.cpu_count()} CPUs on this machine, "
              f"load average {os.getloadavg()[0]:.1f} at start")
        runs: dict = {(k, c): [] for k in ("reference", "ray") for c in (1, 2)}
        for rep in range(args.reps):
            for cpus in (1, 2):
                for kind in ("reference", "ray"):
                    r = run_one(kind, root, cpus, args.batch_size)
                    runs[(kind, cpus)].append(r)
                    extra = f", first batch after {r['first_batch_s']:.1f}s" if "first_batch_s" in r else ""
                    print(f"rep {rep} {kind:9s} {cpus} CPU: wall {r['rate'] / cpus:6.1f} img/s per CPU, "
                          f"{r['cpu_rate']:6.1f} img per CPU-second{extra}", flush=True)
        print(f"\nmedians of {args.reps}, middle of the epoch "
              f"(load average {os.getloadavg()[0]:.1f} at the end):")
        for key, label in (("rate", "wall clock, images/s per CPU"), ("cpu_rate", "images per CPU-second "
                                                                                  "(all processes)")):
            med = {k: float(np.median([r[key] for r in v])) for k, v in runs.items()}
            div = {c: (c if key == "rate" else 1) for c in (1, 2)}
            print(f"  {label}:")
            print("    CPUs | reference DataLoader | updetr Ray Data | ratio")
            for c in (1, 2):
                print(f"    {c}    | {med[('reference', c)] / div[c]:20.1f} | {med[('ray', c)] / div[c]:15.1f} | "
                      f"{med[('ray', c)] / med[('reference', c)]:5.2f}x")
            for kind in ("reference", "ray"):
                eff = med[(kind, 2)] / div[2] / (med[(kind, 1)] / div[1])
                print(f"    1 -> 2 CPUs, {kind}: per-CPU efficiency {100 * eff:.0f} %")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
