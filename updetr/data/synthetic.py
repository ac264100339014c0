"""Seeded synthetic data: unlabeled images for pre-training, and small COCO / VOC detection sets on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from updetr.data.seeding import numpy_rng, sample_id_from_key

_SYNTH_TAG = 0x5717  # keeps synthetic-content streams apart from sampling streams


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """float32 `[h, w, 3]` in 0..255: a two-colour linear gradient plus a sinusoidal or checker texture."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    t = (np.cos(ang) * xx / max(w, 1) + np.sin(ang) * yy / max(h, 1))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    kind = rng.integers(3)
    amp = rng.uniform(10, 50)
    if kind == 0:  # stripes / waves
        f = rng.uniform(0.05, 0.4)
        a2 = rng.uniform(0, np.pi)
        tex = np.sin(f * (np.cos(a2) * xx + np.sin(a2) * yy))
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(4, 24))
        tex = (((xx // cell) + (yy // cell)) % 2) * 2 - 1
    else:  # blotchy noise (upsampled random field)
        small = rng.normal(0, 1, (max(h // 8, 2), max(w // 8, 2))).astype(np.float32)
        tex = np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BILINEAR))
    img = img + amp * tex[..., None] * rng.uniform(0.3, 1.0, 3)
    return img.astype(np.float32)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Sequence[int], color: tuple) -> None:
    """Fill `kind` so that its pixels span exactly `box` = (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    if kind == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
    elif kind == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=color)
    elif kind == "triangle":
        draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=color)
    elif kind == "ring":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), outline=color, width=max(2, (x1 - x0) // 6))
    else:
        raise ValueError(f"unknown shape {kind!r}")


def synthetic_image(index: int, seed: int, size_range: Sequence[int] = (96, 128)) -> Image.Image:
    """Unlabeled RGB image number `index` of the synthetic source (same for every epoch and process).

    Sides are uniform in [size_range[0], size_range[1]]; content: gradient + texture + 2-6 shapes + noise.
    """
    rng = numpy_rng((seed, _SYNTH_TAG, index))
    lo, hi = int(size_range[0]), int(size_range[1])
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img = Image.fromarray(np.clip(_background(rng, w, h), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        kind = ("square", "circle", "triangle", "ring")[int(rng.integers(4))]
        sw, sh = int(rng.integers(max(4, w // 10), max(5, w // 2))), int(rng.integers(max(4, h // 10), max(5, h // 2)))
        x, y = int(rng.integers(0, max(1, w - sw))), int(rng.integers(0, max(1, h - sh)))
        _draw_shape(draw, kind, (x, y, x + sw, y + sh), tuple(int(c) for c in rng.integers(0, 256, 3)))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(0, 8), (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_image_folder(root: str | os.PathLike, n: int, seed: int = 0, size_range: Sequence[int] = (96, 128),
                       nested: bool = True, quality: int = 90) -> list[str]:
    """Write n synthetic JPEGs under root (ImageNet-like `class_k/img_i.jpg` when nested). Returns rel paths."""
    root = Path(root)
    rels = []
    for i in range(n):
        rel = f"n{i % 3:08d}/img_{i:05d}.jpg" if nested else f"img_{i:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(i, seed, size_range).save(root / rel, quality=quality)
        rels.append(rel)
    return rels


# Detection sets: (category id, name, shape). Ids are not contiguous on purpose (num_classes = max id + 1).
COCO_CATEGORIES = ((1, "square", "square"), (2, "circle", "circle"), (3, "triangle", "triangle"),
                   (7, "ring", "ring"))
# VOC names for the same shapes (a subset of the 20 VOC classes, enough for the loaders' tests).
VOC_SHAPES = (("aeroplane", "square"), ("bicycle", "circle"), ("bird", "triangle"), ("boat", "ring"))


def _detection_image(rng: np.random.Generator, w: int, h: int, kinds: Sequence[str], max_objects: int = 4):
    """Textured background with 1..max_objects non-overlapping shapes -> (PIL image, [(kind_idx, xyxy)])."""
    img = Image.fromarray(np.clip(_background(rng, w, h), 0, 255).astype(np.uint8), "RGB")
    img = img.filter(ImageFilter.GaussianBlur(1.0))  # soften the texture so shapes stand out
    draw = ImageDraw.Draw(img)
    objs: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(int(rng.integers(1, max_objects + 1)) * 4):  # a few tries per object
        if len(objs) >= max_objects:
            break
        sw = int(rng.integers(max(8, w // 8), max(9, w // 3)))
        sh = int(rng.integers(max(8, h // 8), max(9, h // 3)))
        x, y = int(rng.integers(0, w - sw)), int(rng.integers(0, h - sh))
        box = (x, y, x + sw, y + sh)
        if any(not (box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1]) for _, o in objs):
            continue
        k = int(rng.integers(len(kinds)))
        _draw_shape(draw, kinds[k], box, tuple(int(c) for c in rng.integers(0, 256, 3)))
        objs.append((k, box))
    return img, objs


def write_coco_dataset(root: str | os.PathLike, num_images: int = 8, seed: int = 0,
                       size_range: Sequence[int] = (96, 160), split: str = "train",
                       quality: int = 95) -> tuple[Path, Path]:
    """Write `root/<split>/*.jpg` + `root/annotations/instances_<split>.json` (COCO format, exact boxes).

    Returns (image dir, annotation file). Categories: `COCO_CATEGORIES` (ids 1, 2, 3, 7).
    """
    root = Path(root)
    img_dir, ann_dir = root / split, root / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = numpy_rng((seed, _SYNTH_TAG, 0xC0C0, sample_id_from_key(split)))
    images, anns = [], []
    kinds = [c[2] for c in COCO_CATEGORIES]
    for i in range(num_images):
        w, h = int(rng.integers(size_range[0], size_range[1] + 1)), int(rng.integers(size_range[0], size_range[1] + 1))
        img, objs = _detection_image(rng, w, h, kinds)
        name = f"{i:012d}.jpg"
        img.save(img_dir / name, quality=quality)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for k, (x0, y0, x1, y1) in objs:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": COCO_CATEGORIES[k][0],
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0})
    coco = {"info": {"description": "updetr synthetic shapes"}, "licenses": [], "images": images,
            "annotations": anns,
            "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in COCO_CATEGORIES]}
    ann_file = ann_dir / f"instances_{split}.json"
    ann_file.write_text(json.dumps(coco))
    return img_dir, ann_file


def _voc_xml(name: str, w: int, h: int, objs: Sequence[tuple[str, tuple[int, int, int, int], int]]) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{escape(name)}</filename>",
             f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"]
    for cls, (x0, y0, x1, y1), difficult in objs:
        # VOC pixel indices are 1-based and inclusive: pixels x0..x1-1 -> xmin=x0+1, xmax=x1.
        parts.append(f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_voc_dataset(root: str | os.PathLike, year: str = "2007", n_trainval: int = 6, n_test: int = 4,
                      seed: int = 0, size_range: Sequence[int] = (96, 160),
                      difficult_prob: float = 0.2) -> Path:
    """Write a Pascal VOC layout under `root/VOC<year>/`: JPEGImages/*.jpg, Annotations/*.xml,
    ImageSets/Main/{trainval,test}.txt (test only when n_test > 0). Returns the VOC<year> dir."""
    base = Path(root) / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = numpy_rng((seed, _SYNTH_TAG, 0x70C, int(year)))
    kinds = [s for _, s in VOC_SHAPES]
    splits: dict[str, list[str]] = {"trainval": [], "test": []}
    for i in range(n_trainval + n_test):
        split = "trainval" if i < n_trainval else "test"
        stem = f"{year}_{i:06d}"
        w, h = int(rng.integers(size_range[0], size_range[1] + 1)), int(rng.integers(size_range[0], size_range[1] + 1))
        img, objs = _detection_image(rng, w, h, kinds)
        img.save(base / "JPEGImages" / f"{stem}.jpg", quality=95)
        voc_objs = [(VOC_SHAPES[k][0], box, int(rng.random() < difficult_prob)) for k, box in objs]
        (base / "Annotations" / f"{stem}.xml").write_text(_voc_xml(f"{stem}.jpg", w, h, voc_objs))
        splits[split].append(stem)
    for split, stems in splits.items():
        if stems or split == "trainval":
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
    return base


def write_bad_files(root: str | os.PathLike, min_image_px: int = 17, seed: int = 0) -> dict[str, str]:
    """Write one file per bad-data case under root (for tests / drills). Returns {case: relative path}.

    Cases: empty, not_an_image, truncated jpeg, too_small, cmyk, gray, rgba, 16-bit grayscale png, palette.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    good = synthetic_image(0, seed, (64, 80))
    out: dict[str, str] = {}

    def save(case: str, name: str, fn) -> None:
        fn(root / name)
        out[case] = name

    save("empty", "empty.jpg", lambda p: p.write_bytes(b""))
    save("not_an_image", "text.jpg", lambda p: p.write_text("this is not an image\n"))

    def truncated(p: Path) -> None:
        good.save(p, quality=90)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    save("truncated", "truncated.jpg", truncated)
    save("too_small", "small.png", lambda p: good.resize((min_image_px - 1, 40)).save(p))
    save("cmyk", "cmyk.jpg", lambda p: good.convert("CMYK").save(p, quality=90))
    save("gray", "gray.png", lambda p: good.convert("L").save(p))
    save("rgba", "rgba.png", lambda p: good.convert("RGBA").save(p))
    arr16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save("sixteen_bit", "gray16.png", lambda p: Image.fromarray(arr16).save(p))
    save("palette", "palette.png", lambda p: good.convert("P").save(p))
    return out


def default_size_range(cfg_size: Optional[Sequence[int]]) -> tuple[int, int]:
    lo, hi = (cfg_size or (96, 128))
    return int(min(lo, hi)), int(max(lo, hi))
