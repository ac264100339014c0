"""Random query patch detection: patch boxes, DETR resize, query-patch augmentation, one training sample.

Every random draw of a sample comes from one `numpy.random.Generator` built from
`seed_tuple = (run seed, epoch, sample id)` (`updetr.data.seeding.numpy_rng`), in a fixed order:
scale choice, then the M boxes, then the augmentation parameters of all M patches (always drawn, even
with `augment=False`). The draws depend only on the original (w, h), so they are known before the pixels
are decoded; that is what lets `record_from_bytes` pick a reduced JPEG decode without changing them.

A *record* (`make_pretrain_record`) is the compact, uint8 form that crosses process / Ray boundaries:
    image    uint8   [H, W, 3]     resized image (H, W = `size`)
    patches  uint8   [M, P, P, 3]  augmented query patches (before ToTensor / Normalize)
    boxes    float32 [M, 4]        cxcywh normalised by the resized (W, H)
    image_id int64, orig_size int64 [2] (h, w), size int64 [2] (h, w)
uint8 is lossless here: the reference works on 8-bit PIL images until ToTensor, so normalising a record
(`updetr.data.tensors.normalize_*`) gives torchvision's ToTensor + Normalize floats (to 1e-6).

Fidelity to the reference transforms: the colour jitter / grayscale / blur ops reproduce torchvision's PIL
code paths bit for bit, the hue for the M patches at once (`updetr.data.augment`); resizes use torch's
uint8 antialiased bilinear kernel, which is ~3x faster than PIL's and within one grey level of it (tested).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from updetr.data import skips
from updetr.data.augment import augment_patches
from updetr.data.image_io import BadImage, decode_jpeg_rgb, draft_reduced, load_pixels, open_image, to_rgb
from updetr.data.seeding import numpy_rng
from updetr.data.skips import SkipCounter

# Decode modes (DataConfig.decode): see `record_from_bytes`.
DECODE_FULL = "full"  # the whole image at full resolution (reference behaviour)
DECODE_REDUCED = "reduced"


def sample_patch_boxes(w: int, h: int, m: int, rng: np.random.Generator, min_px: int = 8) -> np.ndarray:
    """M random patch boxes on a (w, h) image, official distribution -> int64 `[M, 4]` xyxy absolute pixels.

    Side lengths are uniform integers in [min_px, side - min_px] (width and height independent, so the
    aspect ratio is free); the top-left corner is uniform in [0, w - sw - 1] x [0, h - sh - 1], so a
    patch never touches the right/bottom edge (as in the reference `np.random.randint(w - sw)`).
    """
    if w < 2 * min_px or h < 2 * min_px:
        raise ValueError(f"image {w}x{h} too small for patches with min side {min_px}")
    sw = rng.integers(min_px, w - min_px + 1, size=m)
    sh = rng.integers(min_px, h - min_px + 1, size=m)
    x = rng.integers(0, w - sw)  # array `high`: one bound per patch
    y = rng.integers(0, h - sh)
    return np.stack([x, y, x + sw, y + sh], axis=1).astype(np.int64)


def resized_size(w: int, h: int, size: int, max_size: Optional[int]) -> tuple[int, int]:
    """DETR `RandomResize` target (ow, oh): shorter side -> size, unless the longer side would exceed
    max_size, in which case size = int(round(max_size * short / long)); the other side is truncated."""
    if max_size is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > max_size:
            size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


@dataclass(frozen=True)
class PatchAug:
    """Augmentation parameters of M query patches (reference order: jitter, grayscale, blur)."""

    jitter: np.ndarray      # bool [M]     RandomApply(ColorJitter, p=0.8)
    order: np.ndarray       # int  [M, 4]  ColorJitter op order: 0 brightness, 1 contrast, 2 saturation, 3 hue
    factors: np.ndarray     # float [M, 4] brightness, contrast, saturation in U[0.6, 1.4]; hue in U[-0.1, 0.1]
    gray: np.ndarray        # bool [M]     RandomGrayscale(p=0.2)
    blur: np.ndarray        # bool [M]     RandomApply(GaussianBlur, p=0.5)
    sigma: np.ndarray       # float [M]    blur sigma in U[0.1, 2.0]


def draw_patch_aug(rng: np.random.Generator, m: int) -> PatchAug:
    """Draw all augmentation parameters of M patches from `rng` (fixed number of draws)."""
    jitter = rng.random(m) < 0.8
    order = np.argsort(rng.random((m, 4)), axis=1)  # a uniform random permutation per patch
    bcs = rng.uniform(0.6, 1.4, size=(m, 3))
    hue = rng.uniform(-0.1, 0.1, size=(m, 1))
    gray = rng.random(m) < 0.2
    blur = rng.random(m) < 0.5
    sigma = rng.uniform(0.1, 2.0, size=m)
    return PatchAug(jitter, order, np.concatenate([bcs, hue], axis=1), gray, blur, sigma)


def normalized_boxes(boxes_xyxy: np.ndarray, w: int, h: int, ow: int, oh: int) -> np.ndarray:
    """int xyxy on the original (w, h) -> float32 `[M, 4]` cxcywh normalised by the resized (ow, oh),
    with DETR's op order (scale by the resize ratios, then convert, then divide)."""
    ratio = np.array([ow / w, oh / h, ow / w, oh / h], dtype=np.float32)
    b = boxes_xyxy.astype(np.float32) * ratio
    cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    return (cxcywh / np.array([ow, oh, ow, oh], dtype=np.float32)).astype(np.float32)


@dataclass(frozen=True)
class SampleDraws:
    """Everything random about one sample, drawn before any pixel work."""

    out_w: int
    out_h: int
    boxes: np.ndarray       # int64 [M, 4] xyxy on the original image
    aug: PatchAug


def draw_sample(w: int, h: int, pcfg, seed_tuple: Sequence[int]) -> SampleDraws:
    """All random draws of a (w, h) image for `seed_tuple`; raises BadImage(too_small)."""
    if min(w, h) < pcfg.min_image_px:
        raise BadImage(skips.TOO_SMALL, f"{w}x{h} < {pcfg.min_image_px}")
    rng = numpy_rng(seed_tuple)
    size = pcfg.scales[int(rng.integers(len(pcfg.scales)))]
    ow, oh = resized_size(w, h, size, pcfg.max_size)
    boxes = sample_patch_boxes(w, h, pcfg.num_patches, rng, pcfg.min_patch_px)
    aug = draw_patch_aug(rng, pcfg.num_patches)
    return SampleDraws(ow, oh, boxes, aug)


def resize_u8(arr: np.ndarray, out_w: int, out_h: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 `[h, w, 3]` (any strides, e.g. a crop view) -> uint8 `[out_h, out_w, 3]`, bilinear + antialias.

    torch's uint8 channels-last kernel: about 3x faster than PIL's resize here and within one grey level
    of it (mean abs difference ~0.002 levels), so it stands in for torchvision's PIL `Resize`. The result
    is written into `out` (a writable uint8 `[out_h, out_w, 3]`, e.g. one slot of the patch stack) or a new
    array. The kernel computes channels-last; `F.interpolate` would hand back an NCHW copy that then needs a
    second, strided copy back to HWC (together ~3x the resize itself), so the `.out` variant writes the HWC
    result in place (same values: tests/data/test_augment.py)."""
    if out is None:
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only numpy views (PIL buffers, Arrow); never written
        t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    dst = torch.from_numpy(out).permute(2, 0, 1)[None]
    torch.ops.aten._upsample_bilinear2d_aa.out(t, [out_h, out_w], False, None, None, out=dst)
    return out


def render_record(img, orig_w: int, orig_h: int, d: SampleDraws, pcfg, image_id: int,
                  scale: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Pixels of one sample from an RGB image (PIL, or uint8 `[H, W, 3]` for a full decode with
    `pretext.resize: torch`) that covers the original (orig_w, orig_h) image at `scale` (orig px per decoded
    px; (1, 1) for a full decode). Returns a record (module docstring)."""
    p = pcfg.patch_size
    sx, sy = scale
    if sx == 1.0 and sy == 1.0 and pcfg.resize == "pil":
        # The reference exactly: PIL resize of the image; crop at the integer box, then Resize((P, P)).
        image = np.asarray(img.resize((d.out_w, d.out_h), Image.BILINEAR))
        patches = [np.asarray(img.crop(tuple(b)).resize((p, p), Image.BILINEAR)) for b in d.boxes.tolist()]
    elif sx == 1.0 and sy == 1.0:
        arr = img if isinstance(img, np.ndarray) else np.asarray(img)
        image = resize_u8(arr, d.out_w, d.out_h)
        # Reference order: crop the original at the integer box, then Resize((P, P)), into the stack.
        patches = np.empty((len(d.boxes), p, p, 3), dtype=np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(d.boxes.tolist()):
            resize_u8(arr[y0:y1, x0:x1], p, p, out=patches[i])
    else:
        # Reduced decode: fractional boxes in decoded pixels, which PIL's resize(box=) takes exactly.
        image = np.asarray(img.resize((d.out_w, d.out_h), Image.BILINEAR, box=(0, 0, orig_w / sx, orig_h / sy)))
        patches = [np.asarray(img.resize((p, p), Image.BILINEAR, box=(b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy)))
                   for b in d.boxes.tolist()]
    if isinstance(patches, list):
        patches = np.stack(patches)
    if pcfg.augment:
        augment_patches(patches, d.aug)
    return {
        "image": image,
        "patches": patches,
        "boxes": normalized_boxes(d.boxes, orig_w, orig_h, d.out_w, d.out_h),
        "image_id": np.int64(image_id),
        "orig_size": np.array([orig_h, orig_w], dtype=np.int64),
        "size": np.array([d.out_h, d.out_w], dtype=np.int64),
    }


def make_pretrain_record(img: Image.Image, pcfg, seed_tuple: Sequence[int],
                         counter: Optional[SkipCounter] = None) -> dict:
    """One sample from a decoded PIL image (any mode; converted to RGB and counted). Raises BadImage."""
    img = to_rgb(img, counter)
    w, h = img.size
    d = draw_sample(w, h, pcfg, seed_tuple)
    return render_record(img, w, h, d, pcfg, image_id=int(seed_tuple[2]))


def record_from_bytes(data: bytes, pcfg, seed_tuple: Sequence[int], counter: Optional[SkipCounter] = None,
                      decode: str = DECODE_FULL) -> dict:
    """One sample from encoded bytes. Raises BadImage (empty, unreadable, truncated, too small, ...).

    decode='full' decodes the full image. decode='reduced' lets libjpeg decode at 1/2, 1/4 or 1/8
    scale (DCT domain, several times faster) when the result is still at least the *resized image*
    size; the box draws are made first on the original (w, h) from the header, so they are identical in
    both modes, and crops are taken from the reduced decode with scaled coordinates. Trade-off: the image
    is unchanged up to resampling, but a query patch whose original side is below P * factor is resampled
    from fewer pixels than in 'full' (it never has less detail than the same region in the resized
    input image). Only images at least twice the target size are affected (most ImageNet images are not).
    """
    img = open_image(data)
    w, h = img.size
    d = draw_sample(w, h, pcfg, seed_tuple)
    scale = (1.0, 1.0)
    if decode == DECODE_FULL and pcfg.resize != "pil":
        arr = decode_jpeg_rgb(data, img)  # the same pixels as PIL's decode, in half the time
        if arr is not None:
            return render_record(arr, w, h, d, pcfg, image_id=int(seed_tuple[2]))
    if decode == DECODE_REDUCED:
        scale = draft_reduced(img, d.out_w, d.out_h)
    elif decode != DECODE_FULL:
        raise ValueError(f"decode must be '{DECODE_FULL}' or '{DECODE_REDUCED}', got {decode!r}")
    load_pixels(img)
    img = to_rgb(img, counter)
    return render_record(img, w, h, d, pcfg, image_id=int(seed_tuple[2]), scale=scale)


def make_pretrain_sample(img: Image.Image, pcfg, seed_tuple: Sequence[int],
                         counter: Optional[SkipCounter] = None) -> dict:
    """One pre-training sample from a PIL image, shared by the local and Ray paths.

    Args:
        img: PIL image of any mode (converted to RGB, counted in `counter`).
        pcfg: `PretextConfig`.
        seed_tuple: (run seed, epoch, sample id); the sample id becomes `target['image_id']`.
    Returns:
        dict(image=float32 [3, H, W] normalised, patches=float32 [M, 3, P, P] normalised,
             target={labels int64 [M] (all 1), boxes float32 [M, 4] cxcywh normalised by (W, H),
                     image_id, orig_size (h, w), size (H, W)}).
    Raises:
        BadImage: image smaller than `pcfg.min_image_px` on a side.
    """
    from updetr.data.tensors import normalize_image, normalize_patches, record_target  # torch, lazily

    rec = make_pretrain_record(img, pcfg, seed_tuple, counter)
    return {"image": normalize_image(rec["image"]), "patches": normalize_patches(rec["patches"]),
            "target": record_target(rec)}


def safe_record(item, pcfg, seed_tuple: Sequence[int], counter: SkipCounter,
                decode: str = DECODE_FULL) -> Optional[dict]:
    """`record_from_bytes` / `make_pretrain_record` for bytes or a PIL image; a bad item is counted in
    `counter` by reason and gives None instead of raising (the one entry point of every data path)."""
    try:
        if isinstance(item, Image.Image):
            return make_pretrain_record(item, pcfg, seed_tuple, counter)
        return record_from_bytes(bytes(item), pcfg, seed_tuple, counter, decode)
    except BadImage as e:
        counter.add(e.reason)
        return None
