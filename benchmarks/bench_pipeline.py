"""Per CPU core: the UP-DETR per-sample path vs the reference transforms (PIL + torchvision), in one run.

On a varied set of real JPEG photographs (`photo_set.py`: cut from the public-domain / CC0 sample photos in
`benchmarks/photos/`, 300-1400 px per side, quality 90) it measures, interleaved in chunks of 16 images:
  reference : the official dataset's transforms, as `datasets/selfdet.py` does them: full PIL decode,
              numpy global RNG boxes, per patch `crop` -> torchvision Resize((128, 128)) -> RandomApply(
              ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8) -> RandomGrayscale(0.2) -> RandomApply(GaussianBlur,
              0.5) -> ToTensor -> Normalize, the image through DETR's RandomResize + ToTensor + Normalize,
              DETR's padding collate; a DataLoader with num_workers=0;
  updetr    : the per-sample function every data path runs (`record_from_bytes`: decode, resize, M crops,
              query-patch augmentation) + the batch collate (uint8 records -> normalised, padded float
              batch), with the default settings (full decode).
Figures are images per CPU-second of this process (`time.process_time`, torch limited to one thread), which
is what "per core" means and is robust to other load on a shared machine; the ratio is taken per round and
the median over rounds is reported (and the range).

    python benchmarks/bench_pipeline.py [--images 300] [--rounds 5] [--decode full|reduced]
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from updetr.config import load_config  # noqa: E402
from updetr.data.collate import collate_records  # noqa: E402
from updetr.data.pretext import record_from_bytes, resized_size  # noqa: E402
from updetr.data.seeding import sample_id_from_key  # noqa: E402
from updetr.data.skips import SkipCounter  # noqa: E402
from photo_set import make_photo_set  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---------------------------------------------------------------- reference: the official transforms
class _GaussianBlur:
    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class NaiveSelfDet(Dataset):
    """The official dataset's `__getitem__`: full decode, global RNGs, per-patch torchvision pipeline."""

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
            print(f"round {r}: reference {base[-1]:6.1f} img/cpu-s   updetr {ours[-1]:6.1f} img/cpu-s   "
                  f"ratio {ours[-1] / base[-1]:.2f}")
    return base, ours


def bench_config(root: Path, batch_size: int, decode: str | None, overrides=()):
    """The default config pointed at the photo folder (decode: 'full' | 'reduced' | None = the default)."""
    ov = ["data.source=folder", f"data.path={root}", f"data.batch_size={batch_size}", "data.shuffle=false"]
    if decode is not None:
        ov.append(f"data.decode={decode}")
    return load_config(None, ov + list(overrides))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--decode", choices=("full", "reduced"), default="full")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for updetr's side, e.g. pretext.resize=pil")
    ap.add_argument("--keep", help="write the images here and keep them")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-core figures: no intra-op threads on either side

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="updetr_bench_"))
    try:
        t0 = time.time()
        paths = sorted(tmp.rglob("*.JPEG")) if args.keep and any(tmp.rglob("*.JPEG")) \
            else make_photo_set(tmp, args.images)
        sizes = np.array([Image.open(p).size for p in paths])
        kb = sum(p.stat().st_size for p in paths) / 1e3 / len(paths)
        print(f"{len(paths)} JPEG photographs, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px "
              f"(sides {sizes.min()}-{sizes.max()}), {kb:.0f} KB avg, made in {time.time() - t0:.1f}s")
        cfg = bench_config(tmp, args.batch_size, args.decode, args.set)
        print(f"updetr: data.decode={cfg.data.decode} pretext.resize={cfg.pretext.resize}")
        per_core_rates(paths[:16], tmp, cfg, 1, verbose=False)  # warm caches / lazy imports
        base, ours = per_core_rates(paths, tmp, cfg, args.rounds)
        ratios = [o / b for o, b in zip(ours, base)]
        print(f"\nper CPU core (single process, median of {args.rounds} rounds):")
        print(f"  reference transforms (PIL + torchvision) : {np.median(base):6.1f} img/s/core")
        print(f"  updetr (per-sample fn + collate)         : {np.median(ours):6.1f} img/s/core")
        print(f"  ratio updetr / reference                 : {np.median(ratios):5.2f}x "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
