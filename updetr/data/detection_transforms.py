"""DETR's detection augmentation (hflip, multi-scale resize, random size crop) with an explicit numpy Generator.

Targets use DETR's intermediate form: boxes float `[K, 4]` xyxy in absolute pixels of the current image,
labels int64 `[K]`, area float `[K]`, iscrowd int64 `[K]`, size `[2]` (h, w), and for panoptic data masks
bool `[K, H, W]` (flipped, resized nearest and cropped with the image). `normalize` finishes the
sample: image -> float `[3, H, W]` ImageNet-normalised, boxes -> cxcywh normalised by (W, H).
Randomness: every draw uses the `rng` argument (seeded per (run seed, epoch, image id) by the dataset).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from updetr.data.pretext import resized_size
from updetr.data.tensors import normalize_image

# DETR's COCO scales (shorter side 480..800 step 32) and its crop branch settings.
TRAIN_SCALES = tuple(range(480, 801, 32))
CROP_RESIZE = (400, 500, 600)
CROP_MIN, CROP_MAX = 384, 600
MAX_SIZE = 1333
VAL_SIZE = 800

Transform = Callable[[Image.Image, dict, np.random.Generator], tuple]


def hflip(img: Image.Image, target: dict) -> tuple[Image.Image, dict]:
    w = img.width
    target = dict(target)
    b = target["boxes"]
    target["boxes"] = b[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([w, 0.0, w, 0.0])
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return img.transpose(Image.FLIP_LEFT_RIGHT), target


def resize(img: Image.Image, target: dict, size: int, max_size: Optional[int]) -> tuple[Image.Image, dict]:
    """Shorter side -> size (longer side capped at max_size), DETR semantics; boxes and area scaled."""
    ow, oh = resized_size(img.width, img.height, size, max_size)
    rw, rh = ow / img.width, oh / img.height
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
    target["area"] = target["area"] * (rw * rh)
    target["size"] = torch.tensor([oh, ow], dtype=torch.int64)
    if "masks" in target:  # DETR: nearest interpolation of the float masks, then > 0.5
        m = target["masks"]
        target["masks"] = (torch.nn.functional.interpolate(m[:, None].float(), size=(oh, ow), mode="nearest")[:, 0]
                           > 0.5) if m.shape[0] else m.new_zeros((0, oh, ow))
    return img.resize((ow, oh), Image.BILINEAR), target


def crop(img: Image.Image, target: dict, top: int, left: int, h: int, w: int) -> tuple[Image.Image, dict]:
    """Crop (top, left, h, w); boxes shifted and clipped to the crop, boxes left empty are removed."""
    target = dict(target)
    b = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    b = torch.min(b.reshape(-1, 2, 2), torch.tensor([w, h], dtype=torch.float32)).clamp(min=0)
    keep = (b[:, 1, :] > b[:, 0, :]).all(dim=1)
    target["area"] = (b[:, 1, :] - b[:, 0, :]).prod(dim=1)
    target["boxes"] = b.reshape(-1, 4)
    if "masks" in target:
        target["masks"] = target["masks"][:, top: top + h, left: left + w]
    for k in ("boxes", "labels", "area", "iscrowd", "masks"):
        if k in target:
            target[k] = target[k][keep]
    target["size"] = torch.tensor([h, w], dtype=torch.int64)
    return img.crop((left, top, left + w, top + h)), target


def random_hflip(p: float = 0.5) -> Transform:
    def t(img, target, rng):
        return hflip(img, target) if rng.random() < p else (img, target)
    return t


def random_resize(sizes: Sequence[int], max_size: Optional[int] = None) -> Transform:
    def t(img, target, rng):
        return resize(img, target, int(sizes[int(rng.integers(len(sizes)))]), max_size)
    return t


def random_size_crop(min_size: int, max_size: int) -> Transform:
    """Crop of random w in [min, min(W, max)] and h in [min, min(H, max)] at a uniform position."""
    def t(img, target, rng):
        w = int(rng.integers(min_size, min(img.width, max_size) + 1)) if img.width >= min_size else img.width
        h = int(rng.integers(min_size, min(img.height, max_size) + 1)) if img.height >= min_size else img.height
        top = int(rng.integers(0, img.height - h + 1))
        left = int(rng.integers(0, img.width - w + 1))
        return crop(img, target, top, left, h, w)
    return t


def random_select(a: Transform, b: Transform, p: float = 0.5) -> Transform:
    def t(img, target, rng):
        return a(img, target, rng) if rng.random() < p else b(img, target, rng)
    return t


def compose(*ts: Transform) -> Transform:
    def t(img, target, rng):
        for f in ts:
            img, target = f(img, target, rng)
        return img, target
    return t


def normalize(img: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
    """PIL -> float `[3, H, W]` normalised; boxes xyxy abs -> cxcywh / (W, H) (DETR's Normalize)."""
    image = normalize_image(np.asarray(img, dtype=np.uint8))
    h, w = image.shape[-2:]
    target = dict(target)
    b = target["boxes"]
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    target["boxes"] = (cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)).reshape(-1, 4)
    return image, target


def make_detection_transforms(train: bool, multi_scale: bool = True, params=None) -> Transform:
    """DETR COCO recipe. train: hflip, then 50/50 multi-scale resize (480..800, max 1333) or
    resize {400, 500, 600} -> RandomSizeCrop(384, 600) -> multi-scale resize. eval: 800 / max 1333.

    `params` (a `config.DetectionConfig`) replaces those sizes (tiny CPU runs); None keeps DETR's."""
    scales_all = tuple(params.scales) if params is not None else TRAIN_SCALES
    max_size = params.max_size if params is not None else MAX_SIZE
    val_size = params.eval_size if params is not None else VAL_SIZE
    crop_resize = tuple(params.crop_resize) if params is not None else CROP_RESIZE
    crop_min, crop_max = (params.crop_min, params.crop_max) if params is not None else (CROP_MIN, CROP_MAX)
    if not train:
        return random_resize([val_size], max_size)
    scales = scales_all if multi_scale else (val_size,)
    return compose(
        random_hflip(),
        random_select(random_resize(scales, max_size),
                      compose(random_resize(crop_resize), random_size_crop(crop_min, crop_max),
                              random_resize(scales, max_size))))
