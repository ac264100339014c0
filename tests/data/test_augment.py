"""Query-patch augmentation (updetr.data.augment) against torchvision + PIL, and the resize bound."""
from __future__ import annotations

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from updetr.config import PretextConfig
from updetr.data.augment import adjust_hue_u8, augment_patches, hsv_to_rgb_u8, rgb_to_hsv_u8
from updetr.data.pretext import draw_patch_aug, draw_sample, make_pretrain_record
from updetr.data.synthetic import synthetic_image


def _all_colours(chunk: int, n_chunks: int = 4) -> np.ndarray:
    """Chunk `chunk` of all 2^24 byte triples, as a uint8 `[1024, 4096, 3]` image."""
    c = np.arange(chunk << 22, (chunk + 1) << 22, dtype=np.uint32)
    return np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255], -1).astype(np.uint8).reshape(1024, 4096, 3)


@pytest.mark.parametrize("chunk", range(4))
def test_hsv_conversions_equal_pil_on_every_colour(chunk):
    x = _all_colours(chunk)
    assert np.array_equal(rgb_to_hsv_u8(x), np.asarray(Image.fromarray(x).convert("HSV")))
    assert np.array_equal(hsv_to_rgb_u8(x), np.asarray(Image.fromarray(x, "HSV").convert("RGB")))


def _patches(seed: int, m: int, p: int = 32) -> np.ndarray:
    """m photo-like uint8 patches `[m, p, p, 3]` (crops of synthetic scenes, resized like the reference)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(m):
        img = synthetic_image(seed * 100 + i, 0, (60, 120))
        w, h = img.size
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        out.append(np.asarray(img.crop((x0, y0, x0 + w // 2, y0 + h // 2)).resize((p, p), Image.BILINEAR)))
    return np.stack(out)


def test_hue_matches_torchvision_on_a_stack():
    x = _patches(1, 6)
    factors = [-0.1, -0.037, 0.0, 0.004, 0.071, 0.1]
    ours = adjust_hue_u8(x.copy(), factors)
    for i, f in enumerate(factors):
        assert np.array_equal(ours[i], np.asarray(TF.adjust_hue(Image.fromarray(x[i]), f))), f


def _reference(patch: np.ndarray, a, i: int) -> np.ndarray:
    """torchvision's PIL path for patch i with the drawn parameters (the official query transform)."""
    img = Image.fromarray(patch)
    if a.jitter[i]:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in a.order[i]:
            img = ops[op](img, float(a.factors[i, op]))
    if a.gray[i]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if a.blur[i]:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(a.sigma[i])))
    return np.asarray(img)


@pytest.mark.parametrize("seed", range(6))
def test_augment_patches_equals_torchvision_per_patch(seed):
    m = 10
    x = _patches(seed, m)
    a = draw_patch_aug(np.random.default_rng(seed), m)
    ours = augment_patches(x.copy(), a)
    for i in range(m):
        assert np.array_equal(ours[i], _reference(x[i], a, i)), i
    untouched = ~(a.jitter | a.gray | a.blur)
    assert np.array_equal(ours[untouched], x[untouched])


@pytest.mark.parametrize("augment", [False, True])
def test_default_and_pil_resize_share_draws_and_stay_within_one_grey_level(augment):
    """pretext.resize: 'torch' (default) vs 'pil' (the reference's pixels): same boxes / sizes / draws;
    the resize itself (image, patches before augmentation) is within 1 grey level, mean far below it.
    After augmentation the mean stays small; single pixels can move more (a 1-level input step can cross
    an 8-bit HSV bin in the hue op, or be scaled by contrast / saturation up to 1.4x)."""
    img = synthetic_image(11, 0, (180, 260)).resize((520, 390), Image.BICUBIC)
    fast = make_pretrain_record(img, PretextConfig(augment=augment), (3, 0, 9))
    ref = make_pretrain_record(img, PretextConfig(augment=augment, resize="pil"), (3, 0, 9))
    for key in ("boxes", "size", "orig_size"):
        assert np.array_equal(fast[key], ref[key])
    d_img = np.abs(fast["image"].astype(np.int16) - ref["image"])
    assert d_img.max() <= 1 and d_img.mean() < 0.05
    d_p = np.abs(fast["patches"].astype(np.int16) - ref["patches"])
    if augment:
        assert d_p.mean() < 0.25, d_p.mean()
    else:
        assert d_p.max() <= 1 and d_p.mean() < 0.25, (d_p.max(), d_p.mean())


def test_pil_resize_is_the_reference_pixels():
    img = synthetic_image(12, 0, (90, 140))
    pcfg = PretextConfig(resize="pil", scales=[64], max_size=100, patch_size=32, num_patches=5)
    rec = make_pretrain_record(img, pcfg, (1, 2, 3))
    d = draw_sample(img.width, img.height, pcfg, (1, 2, 3))
    assert np.array_equal(rec["image"], np.asarray(img.resize((d.out_w, d.out_h), Image.BILINEAR)))
    for i, box in enumerate(d.boxes.tolist()):
        crop = np.asarray(img.crop(tuple(box)).resize((32, 32), Image.BILINEAR))
        assert np.array_equal(rec["patches"][i], _reference(crop, d.aug, i)), i


@pytest.mark.parametrize("box,out_hw", [((0, 0, 260, 180), (300, 433)), ((13, 7, 141, 96), (32, 32)),
                                        ((40, 21, 49, 170), (32, 32)), ((5, 5, 255, 175), (61, 90))])
def test_resize_u8_in_place_equals_torch_interpolate(box, out_hw):
    """`resize_u8` writes the kernel's channels-last result straight into the HWC array (no NCHW round
    trip); the pixels are `F.interpolate(antialias=True)`'s, for crop views, up- and down-scaling."""
    import torch
    import torch.nn.functional as F
    from updetr.data.pretext import resize_u8

    arr = np.asarray(synthetic_image(5, 0, (180, 260)))
    x0, y0, x1, y1 = box
    crop = arr[y0:y1, x0:x1]
    ref = F.interpolate(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None], size=out_hw,
                        mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(resize_u8(crop, out_hw[1], out_hw[0]), ref)
    stack = np.zeros((3,) + out_hw + (3,), dtype=np.uint8)
    resize_u8(crop, out_hw[1], out_hw[0], out=stack[1])
    assert np.array_equal(stack[1], ref) and not stack[0].any() and not stack[2].any()


@pytest.mark.parametrize("op", [0, 1, 2])
def test_blend_ops_equal_pil_enhance_bit_for_bit(op):
    """Brightness / contrast / saturation in numpy float32 give PIL's `Image.blend` bytes: on 2 x 2^20
    colours spread over the whole RGB cube and on photo-like patches, for
    factors across ColorJitter's range and its ends (both the interpolating and the clipping branch)."""
    from PIL import ImageEnhance

    from updetr.data.augment import blend_op_u8

    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    images = [_all_colours(op)[::4], _all_colours(3)[1::4]] + list(_patches(op, 3))
    for img in images:
        for f in (0.6, 0.6180339, 0.93, 1.0, 1.2345678, 1.4):
            ref = np.asarray(enhancers[op](Image.fromarray(img)).enhance(f))
            assert np.array_equal(blend_op_u8(img.copy(), op, f), ref), (op, f)


def test_grey_patch_blur_on_one_band_equals_rgb_blur():
    """A grey patch is blurred as one L band and replicated: the same bytes as PIL's RGB blur."""
    for i, g in enumerate(_patches(7, 4, p=48)):
        lum = np.asarray(Image.fromarray(g).convert("L"))
        grey = np.repeat(lum[..., None], 3, axis=-1)
        for sigma in (0.1, 0.77, 1.3, 2.0):
            blur = ImageFilter.GaussianBlur(radius=sigma)
            ref = np.asarray(Image.fromarray(grey).filter(blur))
            assert np.array_equal(np.asarray(Image.fromarray(lum).filter(blur)), ref[..., 0]), (i, sigma)
            assert (ref == ref[..., :1]).all()
