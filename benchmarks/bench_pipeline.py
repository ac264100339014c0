"""Throughput of the UP-DETR patch-cropping pipeline vs a plain torchvision Dataset + DataLoader, per CPU core.

Generates ImageNet-sized JPEGs (about 500x375, quality 90) in a temp dir, then measures in the same run:
  baseline  : torch Dataset + DataLoader(num_workers=0) doing the transforms the straightforward way
              (full-size PIL decode, numpy global RNG boxes, torchvision Compose with its global RNG,
              per-patch ToTensor + Normalize, DETR-style padding collate);
  ours      : the per-sample function the Ray stage runs (`record_from_bytes`) + the batch collate
              (uint8 records -> normalised, padded float batch), single process;
  ours/ray  : the same through Ray Data (`build_pretrain_dataset` + `iter_worker_batches`) on `--cpus`
              CPUs, divided by that CPU count (reading, decode actors and the consuming collate included),
              next to the baseline DataLoader with `--cpus` worker processes on the same CPUs (system level:
              float tensors cross process boundaries there, uint8 records in ours).
Single-process figures are images per CPU-second of the process (`time.process_time`, torch limited to
one thread), which is what "per core" means and is robust to other load on a shared machine; rounds
alternate baseline/ours and the best round of each is reported. The Ray figure is wall-clock based.

    python benchmarks/bench_pipeline.py [--images 300] [--rounds 3] [--cpus 2] [--no-ray]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updetr.config import load_config  # noqa: E402
from updetr.data.collate import collate_records  # noqa: E402
from updetr.data.pretext import record_from_bytes, resized_size  # noqa: E402
from updetr.data.seeding import sample_id_from_key  # noqa: E402
from updetr.data.skips import SkipCounter  # noqa: E402
from updetr.data.synthetic import _background  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n photo-like JPEGs (gradient + texture + shapes + sensor noise), about 500x375 (some portrait), q=90."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        w += int(rng.integers(-40, 41))
        h += int(rng.integers(-30, 31))
        arr = _background(rng, w, h)
        for _ in range(int(rng.integers(3, 8))):  # soft blobs of colour, like objects
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
            yy, xx = np.ogrid[:h, :w]
            m = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))[..., None]
            arr = arr * (1 - m) + rng.uniform(0, 255, 3) * m
        arr = arr + rng.normal(0, 10, arr.shape)  # sensor-like noise: ~100 KB files, as ImageNet's average
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        p = root / f"n{i % 10:08d}" / f"img_{i:05d}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, quality=90)
        paths.append(p)
    return paths


# ---------------------------------------------------------------- baseline: the straightforward way
class _GaussianBlur:
    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class NaiveSelfDet(Dataset):
    """What a direct port of the reference does: full decode, global RNGs, per-patch torchvision pipeline."""

    def __init__(self, paths, pcfg):
        self.paths, self.p = paths, pcfg
        self.query_tf = T.Compose([
            T.Resize((pcfg.patch_size, pcfg.patch_size)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([_GaussianBlur()], p=0.5),
            T.ToTensor(), T.Normalize(MEAN, STD)])
        self.img_tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        w, h = img.size
        boxes, patches = [], []
        for _ in range(self.p.num_patches):
            sw, sh = np.random.randint(8, w - 8 + 1), np.random.randint(8, h - 8 + 1)
            x, y = np.random.randint(w - sw), np.random.randint(h - sh)
            patches.append(self.query_tf(img.crop((x, y, x + sw, y + sh))))
            boxes.append([x, y, x + sw, y + sh])
        ow, oh = resized_size(w, h, random.choice(self.p.scales), self.p.max_size)
        img = img.resize((ow, oh), Image.BILINEAR)
        b = torch.tensor(boxes, dtype=torch.float32) * torch.tensor([ow / w, oh / h] * 2)
        b = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
        target = {"boxes": b / torch.tensor([ow, oh, ow, oh]), "labels": torch.ones(len(boxes), dtype=torch.int64),
                  "orig_size": torch.tensor([h, w]), "size": torch.tensor([oh, ow])}
        return self.img_tf(img), torch.stack(patches), target


def naive_collate(batch):
    imgs = [b[0] for b in batch]
    hm, wm = max(t.shape[1] for t in imgs), max(t.shape[2] for t in imgs)
    out = torch.zeros(len(imgs), 3, hm, wm)
    mask = torch.ones(len(imgs), hm, wm, dtype=torch.bool)
    for i, t in enumerate(imgs):
        out[i, :, : t.shape[1], : t.shape[2]].copy_(t)
        mask[i, : t.shape[1], : t.shape[2]] = False
    return out, mask, torch.stack([b[1] for b in batch]), [b[2] for b in batch]


def baseline_chunk(ds: "NaiveSelfDet", idx, bs: int) -> tuple[int, float]:
    """(images, CPU seconds) of the baseline DataLoader (0 workers) over the images `idx`."""
    loader = DataLoader(torch.utils.data.Subset(ds, list(idx)), batch_size=bs, num_workers=0,
                        collate_fn=naive_collate)
    t0 = time.process_time()
    n = sum(b[0].shape[0] for b in loader)
    return n, time.process_time() - t0


def _seed_worker(_):
    torch.set_num_threads(1)


def run_baseline_workers(paths, cfg, workers: int) -> float:
    """Wall-clock images/s of the baseline DataLoader with `workers` processes (after the first batch)."""
    loader = DataLoader(NaiveSelfDet(paths, cfg.pretext), batch_size=cfg.data.batch_size, num_workers=workers,
                        collate_fn=naive_collate, worker_init_fn=_seed_worker, prefetch_factor=2)
    n, t_first = 0, None
    for b in loader:
        if t_first is None:
            t_first, n0 = time.perf_counter(), b[0].shape[0]
        n += b[0].shape[0]
    return (n - n0) / (time.perf_counter() - t_first)


# ---------------------------------------------------------------- ours
def ours_chunk(paths, root, cfg) -> tuple[int, float]:
    """(images, CPU seconds) of the per-sample Ray-stage function + batch collate, one process
    (reads the file bytes like the Ray reader does)."""
    bs, counter = cfg.data.batch_size, SkipCounter()
    t0 = time.process_time()
    n = 0
    for s in range(0, len(paths), bs):
        recs = []
        for p in paths[s: s + bs]:
            sid = sample_id_from_key(str(p.relative_to(root)))
            recs.append(record_from_bytes(p.read_bytes(), cfg.pretext, (cfg.seed, 0, sid), counter, cfg.data.decode))
        n += collate_records(recs)["images"].shape[0]
    return n, time.process_time() - t0


def per_core_rates(paths, root, cfg, rounds: int, chunk: int = 16,
                   verbose: bool = True) -> tuple[list[float], list[float]]:
    """Per round: (baseline, ours) images per CPU-second. Chunks of `chunk` images alternate between the
    two so that load from other processes on a shared machine affects both alike."""
    ds = NaiveSelfDet(paths, cfg.pretext)
    base, ours = [], []
    for r in range(rounds):
        nb = tb = no = to = 0.0
        for s in range(0, len(paths), chunk):
            n, t = baseline_chunk(ds, range(s, min(s + chunk, len(paths))), cfg.data.batch_size)
            nb, tb = nb + n, tb + t
            n, t = ours_chunk(paths[s: s + chunk], root, cfg)
            no, to = no + n, to + t
        base.append(nb / tb)
        ours.append(no / to)
        if verbose:
            print(f"round {r}: baseline {base[-1]:6.1f} img/cpu-s   ours {ours[-1]:6.1f} img/cpu-s")
    return base, ours


def run_ray(root, cfg, cpus: int) -> tuple[float, float]:
    """(images/s per CPU over the epoch after the first batch, seconds to the first batch)."""
    import logging

    import ray

    from updetr.data.ray_pipeline import build_pretrain_dataset, iter_worker_batches

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = build_pretrain_dataset(cfg)
        best, first = 0.0, 0.0
        for epoch in range(2):  # epoch 0 warms the worker processes
            t0 = time.perf_counter()
            n, t_first = 0, None
            for b in iter_worker_batches(ds.iterator(), cfg, epoch):
                if t_first is None:
                    t_first = time.perf_counter()
                    n0 = b["images"].shape[0]
                n += b["images"].shape[0]
            rate = (n - n0) / max(time.perf_counter() - t_first, 1e-9)
            best = max(best, rate)
            first = t_first - t0
        return best / cpus, first
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--decode", choices=("full", "reduced"), default="reduced")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--keep", help="write the images here and keep them")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-core figures: no intra-op threads on either side

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="updetr_bench_"))
    try:
        t0 = time.time()
        paths = sorted(tmp.rglob("*.JPEG")) if args.keep and any(tmp.rglob("*.JPEG")) else make_images(tmp, args.images)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} JPEGs, {mb / len(paths) * 1000:.0f} KB avg, made in {time.time() - t0:.1f}s")
        cfg = load_config(None, ["data.source=folder", f"data.path={tmp}", f"data.batch_size={args.batch_size}",
                                 f"data.num_workers={args.cpus}", f"data.decode={args.decode}", "data.shuffle=false"])
        per_core_rates(paths[:16], tmp, cfg, 1, verbose=False)  # warm caches / lazy imports
        base, ours = per_core_rates(paths, tmp, cfg, args.rounds)
        b, o = max(base), max(ours)
        print(f"\nper CPU core (single process, best of {args.rounds}):")
        print(f"  baseline torchvision Dataset+DataLoader : {b:6.1f} img/s/core")
        print(f"  ours (per-sample fn + collate)          : {o:6.1f} img/s/core")
        print(f"  ratio ours / baseline                   : {o / b:5.2f}x")
        if not args.no_ray:
            print(f"\nsystem level on {args.cpus} CPUs (wall clock, images/s divided by {args.cpus}):")
            bw = run_baseline_workers(paths, cfg, args.cpus) / args.cpus
            print(f"  baseline DataLoader({args.cpus} workers)          : {bw:6.1f} img/s/core")
            r, first = run_ray(tmp, cfg, args.cpus)
            print(f"  ours through Ray Data                   : {r:6.1f} img/s/core "
                  f"({r / bw:4.2f}x; first batch after {first:.1f}s)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
