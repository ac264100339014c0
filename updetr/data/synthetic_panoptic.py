"""A seeded synthetic COCO panoptic set: shapes (things) on sky / ground regions (stuff).

Writes `root/<split>/*.jpg`, `root/annotations/panoptic_<split>/*.png` (segment ids in COCO's RGB encoding)
and `root/annotations/panoptic_<split>.json` (images, annotations with segments_info, categories with
isthing). Every pixel belongs to exactly one segment (no void), as in a clean COCO panoptic map. The
detection view (one box per segment, for the box stage) is derived from the JSON when read
(`updetr.data.panoptic.detection_index`), so no second annotation file is needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from updetr.data.panoptic import id2rgb
from updetr.data.seeding import numpy_rng, sample_id_from_key
from updetr.data.synthetic import _SYNTH_TAG, _draw_shape

# (id, name, isthing, shape); ids are not contiguous on purpose (num_classes = max id + 1 = 10)
PANOPTIC_CATEGORIES = ((1, "square", 1, "square"), (2, "circle", 1, "circle"), (3, "triangle", 1, "triangle"),
                       (8, "sky", 0, None), (9, "ground", 0, None))
_THINGS = [c for c in PANOPTIC_CATEGORIES if c[2]]


def _stuff_layers(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB float `[h, w, 3]`, region map int `[h, w]`: 0 sky, 1 ground) with a random wavy horizon."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.35, 0.65) + h * 0.08 * np.sin(xx[0] / w * 2 * np.pi * rng.uniform(0.5, 2)
                                                               + rng.uniform(0, 6.3))
    ground = yy >= horizon[None, :]
    sky_top, sky_bottom = rng.uniform([20, 60, 150], [90, 140, 255]), rng.uniform([140, 180, 220], [220, 230, 255])
    t = (yy / max(h - 1, 1))[..., None]
    sky = sky_top * (1 - t) + sky_bottom * t
    base = rng.uniform([60, 40, 10], [140, 120, 60])
    cell = int(rng.integers(4, 10))
    checker = ((((xx // cell) + (yy // cell)) % 2) * 2 - 1)[..., None] * rng.uniform(10, 30)
    grd = base + checker
    img = np.where(ground[..., None], grd, sky)
    return img.astype(np.float32), ground.astype(np.int64)


def _panoptic_image(rng: np.random.Generator, w: int, h: int, max_things: int = 3):
    """(PIL image, segment id map int64 `[h, w]`, segments_info) of one image."""
    img_arr, region = _stuff_layers(rng, w, h)
    ids = np.zeros((h, w), dtype=np.int64)
    used: set[int] = set()

    def new_id() -> int:
        while True:
            i = int(rng.integers(1, 256 ** 3))
            if i not in used:
                used.add(i)
                return i

    segs = []
    for r, cat in ((0, 8), (1, 9)):  # stuff first, things painted over them
        m = region == r
        if m.any():
            sid = new_id()
            ids[m] = sid
            segs.append({"id": sid, "category_id": cat})
    img = Image.fromarray(np.clip(img_arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, max_things + 1)) * 4):
        if len(boxes) >= max_things:
            break
        sw = int(rng.integers(max(12, w // 5), max(13, w // 2)))
        sh = int(rng.integers(max(12, h // 5), max(13, h // 2)))
        x, y = int(rng.integers(0, w - sw)), int(rng.integers(0, h - sh))
        box = (x, y, x + sw, y + sh)
        if any(not (box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1]) for o in boxes):
            continue
        cid, _, _, kind = _THINGS[int(rng.integers(len(_THINGS)))]
        shape = Image.new("L", (w, h), 0)
        _draw_shape(ImageDraw.Draw(shape), kind, box, 255)
        m = np.asarray(shape) > 0
        if m.sum() < 16:
            continue
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        _draw_shape(draw, kind, box, color)
        sid = new_id()
        ids[m] = sid
        segs.append({"id": sid, "category_id": cid})
        boxes.append(box)
    img = img.filter(ImageFilter.GaussianBlur(0.7))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    info = []
    for s in segs:  # a stuff region fully covered by things has no pixels left: no segment
        ys, xs = np.nonzero(ids == s["id"])
        if len(xs) == 0:
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        info.append({**s, "iscrowd": 0, "area": int(len(xs)),
                     "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
    return img, ids, info


def write_panoptic_dataset(root: str | os.PathLike, num_images: int = 8, seed: int = 0,
                           size_range: Sequence[int] = (96, 160), split: str = "train",
                           quality: int = 95) -> tuple[Path, Path, Path]:
    """Write one split; returns (image dir, panoptic JSON, PNG dir). Same seed and split, same files."""
    root = Path(root)
    img_dir, ann_dir = root / split, root / "annotations"
    png_dir = ann_dir / f"panoptic_{split}"
    for d in (img_dir, png_dir):
        d.mkdir(parents=True, exist_ok=True)
    rng = numpy_rng((seed, _SYNTH_TAG, 0x9A90, sample_id_from_key(split)))
    images, anns = [], []
    for i in range(num_images):
        w = int(rng.integers(size_range[0], size_range[1] + 1))
        h = int(rng.integers(size_range[0], size_range[1] + 1))
        img, ids, info = _panoptic_image(rng, w, h)
        stem = f"{i:012d}"
        img.save(img_dir / f"{stem}.jpg", quality=quality)
        Image.fromarray(id2rgb(ids), "RGB").save(png_dir / f"{stem}.png")
        images.append({"id": i + 1, "file_name": f"{stem}.jpg", "width": w, "height": h})
        anns.append({"image_id": i + 1, "file_name": f"{stem}.png", "segments_info": info})
    data = {"info": {"description": "updetr synthetic panoptic shapes"}, "licenses": [], "images": images,
            "annotations": anns,
            "categories": [{"id": cid, "name": name, "supercategory": "shape" if isthing else "region",
                            "isthing": isthing} for cid, name, isthing, _ in PANOPTIC_CATEGORIES]}
    ann_file = ann_dir / f"panoptic_{split}.json"
    ann_file.write_text(json.dumps(data))
    return img_dir, ann_file, png_dir
