"""Query-patch augmentation of the M patches of an image as one batch (torch, uint8 in / uint8 out).

The reference applies, per patch and in this order, `RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)`,
`RandomGrayscale(p=0.2)` and `RandomApply(GaussianBlur(sigma), p=0.5)` to 8-bit PIL images. The parameters
are drawn beforehand (`updetr.data.pretext.draw_patch_aug`); this module only renders them.

What is exact and what is not (tests/data/test_augment.py checks both):
    brightness, contrast, saturation  PIL's 8-bit `ImageEnhance` via per-patch lookup tables: bit for bit.
    hue                               PIL's RGB -> HSV -> RGB re-done in torch with the C code's float /
                                      double steps: bit for bit on all 2^24 colours, for the M patches at once.
    grayscale                         PIL's integer RGB -> L: bit for bit.
    blur (`pretext.fast_blur`)        PIL's GaussianBlur is three fixed-point box passes per axis, each
                                      rounded to 8 bits; the fast path applies the same three boxes as one
                                      13-tap kernel per axis (float32, rounded once). Differs from PIL by at
                                      most 2 grey levels on a pixel, about 0.1 on average (bounds tested).
"""
from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

# ------------------------------------------------------------------------------------------------ hue
# torchvision's PIL adjust_hue is RGB -> HSV (8 bit) -> H += shift -> RGB, in PIL's C code
# (libImaging/Convert.c). Here the same maps are table look-ups over whole patch stacks (numpy):
#   RGB -> HSV: V = max; S depends only on (max, max - min); H only on which channel is the max (first of
#   R, G, B) and the other two channels' distances to the max. Both tables are filled by PIL itself.
#   HSV -> RGB: each output channel is one of v, p, q, t with p = round(v (1 - fs)),
#   q = round(v (1 - fs f)), t = round(v (1 - fs (1 - f))) where f, fs depend on (H, S) only; the factors in
#   brackets are tabulated over (S, H) with the C code's float32 / float64 steps, the multiply by v and the
#   C round() are done here. Bit for bit on all 2^24 colours (tests/data/test_augment.py).
_TABLES: dict = {}


_FX = 44
_HALF = 1 << (_FX - 1)


def _fixed(g: np.ndarray) -> np.ndarray:
    return np.rint(g * float(1 << _FX)).astype(np.int64)


def _hue_tables() -> dict:
    if _TABLES:
        return _TABLES
    d = np.arange(256, dtype=np.int64)
    d1, d2 = np.meshgrid(d, d, indexing="ij")  # [256, 256]
    top = np.full_like(d1, 255)
    pix = np.stack([
        np.stack([top, 255 - d1, 255 - d2], -1),   # case 0, R max: (dG, dB)
        np.stack([255 - d1, top, 255 - d2], -1),   # case 1, G max: (dR, dB) (dR >= 1 in use)
        np.stack([255 - d2, 255 - d1, top], -1),   # case 2, B max: (dG, dR)
    ]).astype(np.uint8).reshape(3 * 256, 256, 3)
    hue = np.asarray(Image.fromarray(pix).convert("HSV"))[..., 0].reshape(-1).copy()  # [3 * 65536]
    mx, cr = np.meshgrid(d, d, indexing="ij")  # pixel (max, max - cr, max - cr) where cr <= max
    grey = np.clip(mx - cr, 0, 255)
    sat_pix = np.stack([mx, grey, grey], -1).astype(np.uint8)
    sat = np.asarray(Image.fromarray(sat_pix).convert("HSV"))[..., 1].reshape(-1).copy()  # [max * 256 + cr]
    h8 = np.arange(256, dtype=np.float64)
    i_of_h = np.floor(h8 * 6.0 / 255.0)
    f32 = (h8 * 6.0 / 255.0 - i_of_h).astype(np.float32)                                # float f
    fs32 = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)                # float fs
    g_p = 1.0 - fs32.astype(np.float64)                                                 # [S]
    g_q = 1.0 - (fs32[:, None] * f32[None, :]).astype(np.float64)                       # [S, H] float product
    g_t = 1.0 - fs32.astype(np.float64)[:, None] * (1.0 - f32.astype(np.float64))[None, :]
    # output channel -> candidate (0 v, 1 p, 2 q, 3 t) for i % 6, colorsys order
    sel = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], dtype=np.int64)
    shift = 8 * sel[i_of_h.astype(np.int64) % 6].T  # [3, H]: bit offset of each channel's candidate
    _TABLES.update(hue=hue, sat=sat, shift=np.ascontiguousarray(shift),
                   fx_p=_fixed(g_p), fx_q=_fixed(g_q).reshape(-1), fx_t=_fixed(g_t).reshape(-1))
    return _TABLES


def rgb_to_hsv_u8(rgb: np.ndarray) -> np.ndarray:
    """PIL's `convert("HSV")`: uint8 `[..., 3]` -> uint8 `[..., 3]`, bit for bit."""
    t = _hue_tables()
    r, g, b = (rgb[..., c].astype(np.int32) for c in range(3))
    v = np.maximum(np.maximum(r, g), b)
    cr = v - np.minimum(np.minimum(r, g), b)
    dr, dg, db = v - r, v - g, v - b
    not_r = dr != 0
    case = not_r.astype(np.int32) + (not_r & (dg != 0))  # 0: R is max, 1: G, 2: B (first max wins)
    first = np.where(case == 1, dr, dg)
    second = np.where(case == 2, dr, db)
    h = t["hue"][(case << 16) | (first << 8) | second]
    s = t["sat"][(v << 8) | cr]
    return np.stack([h, s, v.astype(np.uint8)], -1)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """PIL's `convert("RGB")` of an HSV image: uint8 `[..., 3]` -> uint8 `[..., 3]`, bit for bit."""
    t = _hue_tables()
    flat = hsv.reshape(-1, 3)
    h, s, v = (flat[:, c].astype(np.int64) for c in range(3))
    sh = (s << 8) | h
    # C round(v * factor) in fixed point (factor * 2^44, integer, v * factor < 2^52): equal to the double
    # computation on every (v, s, h) (checked exhaustively in the tests).
    p = (v * t["fx_p"].take(s) + _HALF) >> _FX
    q = (v * t["fx_q"].take(sh) + _HALF) >> _FX
    tt = (v * t["fx_t"].take(sh) + _HALF) >> _FX
    word = v | (p << 8) | (q << 16) | (tt << 24)  # the four candidates of each pixel, one byte each
    out = np.empty(flat.shape, dtype=np.uint8)
    for c in range(3):
        out[:, c] = (word >> t["shift"][c].take(h)) & 255  # channel c takes the candidate its sector says
    return out.reshape(hsv.shape)


def adjust_hue_u8(rgb: np.ndarray, factors) -> np.ndarray:
    """torchvision's PIL `adjust_hue` on a stack: uint8 `[K, H, W, 3]`, factors `[K]` in [-0.5, 0.5]."""
    shift = np.array([int(float(f) * 255) % 256 for f in factors], dtype=np.uint8)
    hsv = rgb_to_hsv_u8(rgb)
    hsv[..., 0] += shift.reshape((-1,) + (1,) * (rgb.ndim - 2))  # uint8 wrap-around = hue rotation
    return hsv_to_rgb_u8(hsv)


# ----------------------------------------------------------------------------------------------- blur
def _box_radius(sigma: float, passes: int = 3) -> float:
    """PIL's `_gaussian_blur_radius` (float32 C arithmetic): fractional box radius of one pass."""
    f32 = np.float32
    s = f32(sigma)  # PIL parses the radius as a C float
    sigma2 = f32(s * s / f32(passes))
    big_l = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    small_l = f32(math.floor((float(big_l) - 1.0) / 2.0))
    a = f32(f32(2) * small_l + f32(1)) * f32(small_l * f32(small_l + f32(1)) - f32(3) * sigma2)
    a = f32(a / f32(f32(6) * f32(sigma2 - f32(small_l + f32(1)) * f32(small_l + f32(1)))))
    return float(f32(small_l + a))


def _box_weights(radius: float) -> np.ndarray:
    """One PIL box pass as tap weights (fixed point / 2^24): `ww` on the 2r+1 centre taps, `fw` on the two
    next ones (libImaging/BoxBlur.c)."""
    r = int(radius)
    ww = int(np.float32(1 << 24) / (np.float32(radius) * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (2 * r + 1) * ww) // 2
    w = np.zeros(2 * r + 3)
    w[1:-1] = ww
    w[0] = w[-1] = fw
    return w / float(1 << 24)


def blur_kernel(sigma: float, taps: int = 13) -> np.ndarray:
    """The three box passes of PIL's GaussianBlur(sigma) composed into one 1-D kernel, centred, `[taps]`."""
    w = _box_weights(_box_radius(sigma))
    k = np.convolve(np.convolve(w, w), w)
    if len(k) > taps:
        raise ValueError(f"sigma {sigma} needs {len(k)} taps > {taps}")
    pad = (taps - len(k)) // 2
    return np.pad(k, (pad, pad))


def gaussian_blur_u8(x: torch.Tensor, sigmas) -> torch.Tensor:
    """uint8 `[K, H, W, 3]`, sigmas `[K]` -> uint8 `[K, H, W, 3]`: separable 13-tap blur per patch,
    edge pixels replicated (as PIL's box passes do), rounded once."""
    k, h, w, c = x.shape
    kern = torch.from_numpy(np.stack([blur_kernel(float(s)) for s in sigmas])).float()  # [K, 13]
    kern = kern.repeat_interleave(c, 0)  # one filter per (patch, channel)
    half = kern.shape[1] // 2
    t = x.permute(0, 3, 1, 2).reshape(1, k * c, h, w).float()
    t = F.pad(t, (half, half, half, half), mode="replicate")
    t = F.conv2d(t, kern.view(k * c, 1, 1, -1), groups=k * c)
    t = F.conv2d(t, kern.view(k * c, 1, -1, 1), groups=k * c)
    return t.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).view(k, c, h, w).permute(0, 2, 3, 1)


def gaussian_blur_pil(x: np.ndarray, sigma: float) -> np.ndarray:
    """The reference: PIL's GaussianBlur(radius=sigma) on one uint8 `[H, W, 3]` patch."""
    return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius=float(sigma))))


# ------------------------------------------------------------------------- blend ops (PIL, per patch)
_RAMP = np.arange(256, dtype=np.float32)


def _blend_lut(base: float, f: float) -> list:
    """768-entry `point` table of PIL's blend(constant base, img, f) = trunc(base + f * (x - base)), clipped.

    float32 arithmetic like PIL's C loop, so the table reproduces ImageEnhance bit for bit at a fraction
    of the cost (no constant image allocated, one lookup pass)."""
    lut = np.trunc(np.float32(base) + np.float32(f) * (_RAMP - np.float32(base)))
    return np.clip(lut, 0, 255).astype(np.uint8).tolist() * 3


def adjust_brightness(img: Image.Image, f: float) -> Image.Image:
    """= ImageEnhance.Brightness(img).enhance(f) (blend with black)."""
    return img.point(_blend_lut(0.0, f))


def adjust_contrast(img: Image.Image, f: float) -> Image.Image:
    """= ImageEnhance.Contrast(img).enhance(f) (blend with the rounded mean grey level)."""
    hist = np.asarray(img.convert("L").histogram(), dtype=np.float64)
    mean = int(float(hist @ _RAMP.astype(np.float64)) / max(hist.sum(), 1.0) + 0.5)
    return img.point(_blend_lut(float(mean), f))


def adjust_saturation(img: Image.Image, f: float) -> Image.Image:
    """= ImageEnhance.Color(img).enhance(f) (blend with the grey version)."""
    return ImageEnhance.Color(img).enhance(f)


def adjust_hue(img: Image.Image, f: float) -> Image.Image:
    """One PIL patch through `adjust_hue_u8` (torchvision's PIL `adjust_hue`)."""
    return Image.fromarray(adjust_hue_u8(np.asarray(img)[None], [f])[0])


def to_grayscale3(img: Image.Image) -> Image.Image:
    g = img.convert("L")
    return Image.merge("RGB", (g, g, g))


def gray3_u8(x: np.ndarray) -> np.ndarray:
    """PIL's `convert("L")` replicated to 3 channels on uint8 `[..., 3]`:
    L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (integer, bit for bit)."""
    xi = x.astype(np.int32)
    lum = ((xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)
    return np.repeat(lum[..., None], 3, axis=-1)


# The ColorJitter ops on 8-bit PIL images, as torchvision applies them (torchvision itself is not imported:
# it adds seconds to every Ray preprocessing actor's start).
_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
HUE = 3


def augment_patch(patch: Image.Image, aug, i: int) -> Image.Image:
    """The reference, one PIL patch at a time: patch i's ColorJitter / grayscale / blur (torchvision
    semantics, PIL's GaussianBlur). `aug` is a `pretext.PatchAug`."""
    if aug.jitter[i]:
        for op in aug.order[i]:
            patch = _JITTER_OPS[op](patch, float(aug.factors[i, op]))
    if aug.gray[i]:
        patch = to_grayscale3(patch)
    if aug.blur[i]:
        patch = patch.filter(ImageFilter.GaussianBlur(radius=float(aug.sigma[i])))
    return patch


def _blend_table(base: float, f: float) -> np.ndarray:
    """uint8 `[256]`: PIL's blend(constant base, x, f) = trunc(base + f * (x - base)), clipped, float32."""
    t = np.trunc(np.float32(base) + np.float32(f) * (_RAMP - np.float32(base)))
    return np.clip(t, 0, 255).astype(np.uint8)


def _lum(x: np.ndarray) -> np.ndarray:
    """PIL's RGB -> L on uint8 `[..., 3]` -> int32 `[...]`."""
    xi = x.astype(np.int32)
    return (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16


def brightness_u8(x: np.ndarray, f: float) -> np.ndarray:
    """`adjust_brightness` on uint8 `[P, P, 3]`, bit for bit."""
    return _blend_table(0.0, f).take(x)


def contrast_u8(x: np.ndarray, f: float) -> np.ndarray:
    """`adjust_contrast` on uint8 `[P, P, 3]`: blend with the rounded mean of L, bit for bit."""
    lum = _lum(x)
    mean = int(float(lum.sum()) / max(lum.size, 1) + 0.5)
    return _blend_table(float(mean), f).take(x)


def saturation_u8(x: np.ndarray, f: float) -> np.ndarray:
    """`adjust_saturation` on uint8 `[P, P, 3]`: float32 blend with L per pixel, bit for bit."""
    lum = _lum(x)[..., None]
    t = lum.astype(np.float32) + np.float32(f) * (x.astype(np.int32) - lum).astype(np.float32)
    return np.clip(t, 0, 255).astype(np.uint8)


_U8_OPS = (brightness_u8, contrast_u8, saturation_u8)


def augment_patches(patches: np.ndarray, aug, fast_blur: bool = True) -> np.ndarray:
    """All M patches of an image: uint8 `[M, P, P, 3]` (modified in place and returned).

    Same ops, order and parameters as `augment_patch` on each patch. The jitter runs in four rounds (the
    k-th op of every jittered patch in round k), so the patches whose k-th op is the hue share one batched
    hue call; brightness / contrast / saturation are per patch (numpy lookup tables / float32 blends).
    With `fast_blur` the blurred patches share one batched convolution (see the module docstring)."""
    jit = np.flatnonzero(aug.jitter)
    for k in range(4):
        hue_rows = []
        for i in jit:
            op = int(aug.order[i, k])
            if op == HUE:
                hue_rows.append(i)
            else:
                patches[i] = _U8_OPS[op](patches[i], float(aug.factors[i, op]))
        if hue_rows:
            patches[hue_rows] = adjust_hue_u8(patches[hue_rows], aug.factors[hue_rows, HUE])
    rows = np.flatnonzero(aug.gray)
    if len(rows):
        patches[rows] = gray3_u8(patches[rows])
    rows = np.flatnonzero(aug.blur)
    if len(rows):
        if fast_blur:
            patches[rows] = gaussian_blur_u8(torch.from_numpy(patches[rows]), aug.sigma[rows]).numpy()
        else:
            for i in rows:
                patches[i] = gaussian_blur_pil(patches[i], float(aug.sigma[i]))
    return patches
