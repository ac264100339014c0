"""A varied set of real JPEG photographs at ImageNet-like sizes, cut from the sample photos in `photos/`.

Each image is a random crop (50-100 % of each side) of one of the seven photographs, rescaled (PIL
bicubic, at most 1.6x up) so that its longer side is 400-640 px for 60 % of the images and 640-1400 px for
the rest, the shorter side 0.6-1.0 of it and never below 300 px; saved as JPEG quality 90. The same seed
gives the same set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path(__file__).resolve().parent / "photos"


def make_photo_set(root: Path, n: int, seed: int = 0) -> list[Path]:
    """Write n JPEGs under root/<class>/img_XXXXX.JPEG (10 class folders, like ImageNet); returns the paths."""
    sources = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
    if not sources:
        raise FileNotFoundError(f"no sample photographs in {PHOTOS}")
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        long_side = int(rng.uniform(400, 640) if rng.random() < 0.6 else rng.uniform(640, 1400))
        short_side = max(300, int(long_side * rng.uniform(0.6, 1.0)))
        landscape = rng.random() < 0.75
        tw, th = (long_side, short_side) if landscape else (short_side, long_side)
        # a source big enough that the crop is upscaled at most 1.6x (the largest one otherwise)
        fits = [s for s in sources if s.width * 1.6 >= tw and s.height * 1.6 >= th]
        src = fits[int(rng.integers(len(fits)))] if fits else max(sources, key=lambda s: s.width * s.height)
        cw = min(src.width, max(int(src.width * rng.uniform(0.5, 1.0)), int(np.ceil(tw / 1.6))))
        ch = min(src.height, max(int(src.height * rng.uniform(0.5, 1.0)), int(np.ceil(th / 1.6))))
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize((tw, th), Image.BICUBIC)
        p = root / f"n{i % 10:08d}" / f"img_{i:05d}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, quality=90)
        paths.append(p)
    return paths
