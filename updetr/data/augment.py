"""Query-patch augmentation of the M patches of an image together (uint8 numpy in, uint8 out).

The reference applies, per patch and in this order, `RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)`,
`RandomGrayscale(p=0.2)` and `RandomApply(GaussianBlur(sigma), p=0.5)` to 8-bit PIL images. The parameters
are drawn beforehand (`updetr.data.pretext.draw_patch_aug`); this module only renders them, bit for bit
as torchvision + PIL do (tests/data/test_augment.py):
    hue                 PIL's RGB -> HSV -> RGB as table look-ups on contiguous planes of the stack of
                        patches whose hue is due (numpy, ~2x faster than PIL per patch); equal on all
                        2^24 colours.
    brightness, contrast, saturation
                        PIL's `Image.blend(degenerate, img, f)` arithmetic (float32, truncation) in numpy
                        per patch with a reused scratch buffer, ~2x faster than a PIL image + enhancer.
    grayscale           PIL's integer RGB -> L, for all grey patches at once.
    blur                PIL's own `GaussianBlur` per patch, as torchvision calls it: its C loops are the
                        fastest exact path found (a batched torch blur that reproduces PIL's fixed-point
                        box passes was no faster on CPU).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image, ImageFilter

# ------------------------------------------------------------------------------------------------ hue
# torchvision's PIL adjust_hue is RGB -> HSV (8 bit) -> H += shift -> RGB, in PIL's C code
# (libImaging/Convert.c). Here the same maps are table look-ups over whole patch stacks (numpy):
#   RGB -> HSV: V = max; S depends only on (max, max - min); H only on which channel is the max (first of
#   R, G, B) and the other two channels' distances to the max. Both tables are filled by PIL itself.
#   HSV -> RGB: each output channel is one of v, p, q, t with p = round(v (1 - fs)),
#   q = round(v (1 - fs f)), t = round(v (1 - fs (1 - f))) where f, fs depend on (H, S) only; the factors in
#   brackets are tabulated over (S, H) with the C code's float32 / float64 steps, and so is which of them
#   each channel takes (its sector): one factor table per channel; the multiply by v and the C round() are
#   done here. Bit for bit on all 2^24 colours (tests/data/test_augment.py).
_TABLES: dict = {}
_FX = 23  # v (8 bit) x factor (23 bit) stays in int32; 22 bits would miss 6 of the 2^24 (v, s, h)
_HALF = 1 << (_FX - 1)


def _fixed(g: np.ndarray) -> np.ndarray:
    return np.rint(g * float(1 << _FX)).astype(np.int32)


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
    # candidate factors in fixed point over (S, H): v (factor 1), p, q, t; each output channel's factor is the
    # candidate its sector picks, so HSV -> RGB is one table look-up and one multiply per channel
    cand = np.stack([np.full((256, 256), 1 << _FX, dtype=np.int32), np.repeat(_fixed(g_p)[:, None], 256, 1),
                     _fixed(g_q), _fixed(g_t)])                                    # [4, S, H]
    pick = sel[i_of_h.astype(np.int64) % 6].T                                     # [3, H]: candidate per channel
    factor = np.take_along_axis(cand, np.broadcast_to(pick[:, None, :], (3, 256, 256)), axis=0)  # [3, S, H]
    _TABLES.update(hue=hue, sat=sat, factor=[np.ascontiguousarray(f.reshape(-1)) for f in factor])
    return _TABLES


def _planes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 `[..., 3]` -> three contiguous uint8 planes `[N]`: one transposing copy, after which every
    elementwise op below runs on contiguous data (numpy is several times slower on stride-3 views)."""
    a, b, c = np.ascontiguousarray(x.reshape(-1, 3).T)
    return a, b, c


def _interleave(a: np.ndarray, b: np.ndarray, c: np.ndarray, shape) -> np.ndarray:
    return np.stack([a, b, c], axis=-1).reshape(shape)


def _hsv_planes(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's RGB -> HSV on uint8 planes `[N]` -> uint8 planes (h, s, v)."""
    t = _hue_tables()
    v = np.maximum(np.maximum(r, g), b)
    dr, dg, db = v - r, v - g, v - b  # uint8 throughout: every difference is >= 0
    cr = np.maximum(np.maximum(dr, dg), db)  # max - min
    r_max = dr == 0
    g_max = ~r_max & (dg == 0)
    # case 0 (R is max): key (dG, dB); case 1 (G, R below): (dR, dB); case 2 (B, R and G below): (dG, dR)
    key = np.where(g_max, dr, dg).astype(np.intp)
    key <<= 8
    key |= np.where(r_max | g_max, db, dr)
    key |= (2 - 2 * r_max.view(np.uint8) - g_max.view(np.uint8)).astype(np.intp) << 16
    h = t["hue"].take(key)
    key = v.astype(np.intp)
    key <<= 8
    key |= cr
    return h, t["sat"].take(key), v


def _rgb_planes(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PIL's HSV -> RGB on uint8 planes `[N]` -> uint8 planes (r, g, b)."""
    t = _hue_tables()
    sh = s.astype(np.intp)
    sh <<= 8
    sh |= h
    vi = v.astype(np.int32)
    # C round(v * factor) in fixed point (factor * 2^23, v * factor < 2^31): equal to the C double
    # computation on every (v, s, h) (checked exhaustively in the tests); factor 1 (the v candidate) gives v.
    out = []
    for c in range(3):
        f = t["factor"][c].take(sh)
        f *= vi
        f += _HALF
        f >>= _FX
        out.append(f.astype(np.uint8))
    return out[0], out[1], out[2]


def rgb_to_hsv_u8(rgb: np.ndarray) -> np.ndarray:
    """PIL's `convert("HSV")`: uint8 `[..., 3]` -> uint8 `[..., 3]`, bit for bit."""
    return _interleave(*_hsv_planes(*_planes(rgb)), rgb.shape)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """PIL's `convert("RGB")` of an HSV image: uint8 `[..., 3]` -> uint8 `[..., 3]`, bit for bit."""
    return _interleave(*_rgb_planes(*_planes(hsv)), hsv.shape)


def adjust_hue_u8(rgb: np.ndarray, factors) -> np.ndarray:
    """torchvision's PIL `adjust_hue` on a stack: uint8 `[K, H, W, 3]`, factors `[K]` in [-0.5, 0.5].
    HSV stays in planes between the two conversions (no interleaved HSV image)."""
    shift = np.array([int(float(f) * 255) % 256 for f in factors], dtype=np.uint8)
    h, s, v = _hsv_planes(*_planes(rgb))
    h = h.reshape(len(shift), -1)
    h += shift[:, None]  # uint8 wrap-around = hue rotation
    return _interleave(*_rgb_planes(h.reshape(-1), s, v), rgb.shape)


# ColorJitter's op indices (torchvision's order of its four ops).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# ------------------------------------------------------------------------- brightness, contrast, saturation
# torchvision's PIL backend runs each of these as `ImageEnhance.X(img).enhance(f)`, i.e. PIL's
# `Image.blend(degenerate, img, f)`, whose C loop computes, per byte and in float32 (`alpha` is a C float):
#     out = (uint8) clip(d + alpha * (x - d), 0, 255)      (truncation toward zero)
# with the degenerate d = 0 (brightness), the rounded mean of the patch's L image (contrast:
# int(mean + 0.5), as ImageStat computes it), or the pixel's own L value (saturation). The same float32
# operations in numpy give the same bytes (checked on all 256 x 256 (d, x) pairs in the tests), without a
# PIL image, an enhancer, a degenerate image and two numpy <-> PIL copies per op (~2-3x faster).
_L_WEIGHTS = np.array([19595.0, 38470.0, 7471.0], dtype=np.float32)


def _luma_f32(y: np.ndarray) -> np.ndarray:
    """PIL's integer `convert("L")`, (19595 R + 38470 G + 7471 B + 2^15) >> 16, of an integer-valued
    float32 `[..., 3]` -> float32 `[...]`. Exact in float32: every product and partial sum is an integer
    below 2^24 (the weights sum to 2^16 and 2^16 * 255 + 2^15 < 2^24), and the scaling is by 2^-16."""
    return np.floor((y @ _L_WEIGHTS + np.float32(32768.0)) * np.float32(1.0 / 65536.0))


def blend_op_u8(x: np.ndarray, op: int, factor: float, work: Optional[np.ndarray] = None) -> np.ndarray:
    """torchvision's PIL `adjust_brightness` (op 0) / `adjust_contrast` (1) / `adjust_saturation` (2) on one
    uint8 `[P, P, 3]` patch, in place (returned), bit for bit. `work`: optional float32 scratch of x's
    shape; reusing it across calls matters (a fresh 200 KB array is a fresh mmap whose page faults cost
    about as much as the arithmetic)."""
    y = np.empty(x.shape, dtype=np.float32) if work is None else work
    alpha = np.float32(factor)
    if op == BRIGHTNESS:
        np.multiply(x, alpha, out=y)  # uint8 * float32 -> float32 in one pass
    else:
        np.copyto(y, x)
        lum = _luma_f32(y)
        if op == CONTRAST:  # ImageStat's mean: exact integer sum / count in double, then int(mean + 0.5)
            d = np.float32(int(float(lum.sum(dtype=np.float64)) / lum.size + 0.5))
            y -= d
            y *= alpha
            y += d
        elif op == SATURATION:
            d = np.repeat(lum[..., None], 3, axis=-1)  # no inner broadcasting below (numpy's slow case)
            y -= d
            y *= alpha
            y += d
        else:
            raise ValueError(f"blend op must be 0, 1 or 2, got {op}")
    if not 0.0 <= alpha <= 1.0:
        # PIL clips only when extrapolating; for alpha in [0, 1], d + alpha * (x - d) stays within [d, x]
        # even after float32 rounding (rounding is monotonic and x - d is exact), so there is nothing to clip.
        np.clip(y, 0.0, 255.0, out=y)
    np.copyto(x, y, casting="unsafe")  # float -> uint8 truncates toward zero, as the C cast
    return x


# ------------------------------------------------------------------------------------- grey, pipeline
def gray3_u8(x: np.ndarray) -> np.ndarray:
    """PIL's `convert("L")` replicated to 3 channels on uint8 `[..., 3]`:
    L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (integer, bit for bit)."""
    xi = x.astype(np.int32)
    lum = ((xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)
    return np.repeat(lum[..., None], 3, axis=-1)


def _jitter(patches: np.ndarray, aug, jit: np.ndarray) -> None:
    """ColorJitter of the patches `jit` (in place), in four rounds: round k applies every jittered patch's
    k-th op; the patches whose k-th op is the hue share one batched hue call."""
    work = np.empty(patches.shape[1:], dtype=np.float32)
    for k in range(4):
        hue_rows = []
        for i in jit:
            op = int(aug.order[i, k])
            if op == HUE:
                hue_rows.append(i)
            else:
                blend_op_u8(patches[i], op, float(aug.factors[i, op]), work)
        if hue_rows:
            patches[hue_rows] = adjust_hue_u8(patches[hue_rows], aug.factors[hue_rows, HUE])


def augment_patches(patches: np.ndarray, aug) -> np.ndarray:
    """All M patches of an image: uint8 `[M, P, P, 3]` (modified in place and returned).

    Per patch i, torchvision's order: if jitter[i], ColorJitter's four ops in order[i] with factors[i]; if
    gray[i], grayscale; if blur[i], GaussianBlur(sigma[i]). The jitter in numpy (`_jitter`), the
    grayscale on all grey patches at once, the blur per patch with PIL's own C code (as torchvision: the
    fastest exact path for it)."""
    jit = np.flatnonzero(aug.jitter)
    _jitter(patches, aug, jit)
    rows = np.flatnonzero(aug.gray)
    if len(rows):
        patches[rows] = gray3_u8(patches[rows])
    for i in np.flatnonzero(aug.blur):
        blur = ImageFilter.GaussianBlur(radius=float(aug.sigma[i]))
        if aug.gray[i]:
            # R = G = B: PIL blurs each band with the same integer box passes, so blurring the one L band
            # gives every channel's result at a third of the work (bit for bit: tests/data/test_augment.py).
            patches[i] = np.asarray(Image.fromarray(patches[i, :, :, 0]).filter(blur))[..., None]
        else:
            patches[i] = np.asarray(Image.fromarray(patches[i]).filter(blur))
    return patches
