"""Patch box sampling, DETR resize, augmentation draws and the per-sample function."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from updetr.config import PretextConfig
from updetr.data import skips
from updetr.data.image_io import BadImage
from updetr.data.pretext import (adjust_hue, augment_patch, draw_patch_aug, draw_sample, make_pretrain_record,
                                 make_pretrain_sample, record_from_bytes, resized_size, sample_patch_boxes)
from updetr.data.tensors import normalize_image
from updetr.data.seeding import numpy_rng, sample_id_from_key
from updetr.data.synthetic import synthetic_image


def test_box_bounds_and_distribution():
    rng = np.random.default_rng(0)
    w, h, n = 100, 60, 40000
    b = sample_patch_boxes(w, h, n, rng, min_px=8)
    sw, sh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert b.dtype == np.int64 and b.shape == (n, 4)
    assert sw.min() == 8 and sw.max() == w - 8 and sh.min() == 8 and sh.max() == h - 8
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 0] <= w - sw - 1).all() and (b[:, 1] <= h - sh - 1).all()  # never touches right/bottom edge
    assert (b[:, 2] <= w - 1).all() and (b[:, 3] <= h - 1).all()
    # side uniform on [8, side-8]: mean (8 + side - 8) / 2, std (range+1)/sqrt(12)
    assert abs(sw.mean() - w / 2) < 0.5 and abs(sh.mean() - h / 2) < 0.3
    assert abs(sw.std() - (w - 15) / np.sqrt(12)) < 0.5
    counts = np.bincount(sw - 8)
    assert counts.min() > 0.8 * n / len(counts)  # every side value drawn about equally often
    # x | sw uniform on [0, w - sw - 1]: mean of x / (w - sw - 1) is 1/2
    assert abs((b[:, 0] / np.maximum(w - sw - 1, 1)).mean() - 0.5) < 0.01


def test_box_sampling_rejects_tiny_images():
    with pytest.raises(ValueError):
        sample_patch_boxes(15, 100, 1, np.random.default_rng(0))


def _detr_get_size(w, h, size, max_size):
    # Independent restatement of DETR's get_size_with_aspect_ratio (reference-notes §2.1), returns (h, w).
    mn, mx = float(min(w, h)), float(max(w, h))
    if mx / mn * size > max_size:
        size = int(round(max_size * mn / mx))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    return (int(size * h / w), size) if w < h else (size, int(size * w / h))


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (333, 500), (640, 480), (1000, 200), (480, 480),
                                 (97, 131), (600, 320)])
@pytest.mark.parametrize("s", [320, 400, 480])
def test_resize_matches_detr(w, h, s):
    ow, oh = resized_size(w, h, s, 600)
    assert (oh, ow) == _detr_get_size(w, h, s, 600)
    assert max(ow, oh) <= 600


def test_resize_examples():
    assert resized_size(500, 375, 480, 600) == (600, 450)  # long side capped: s = round(600*375/500)
    assert resized_size(500, 375, 320, 600) == (426, 320)  # int() truncation of 426.67
    assert resized_size(320, 480, 320, 600) == (320, 480)  # already at size


def test_aug_draw_rates():
    a = draw_patch_aug(np.random.default_rng(1), 20000)
    assert abs(a.jitter.mean() - 0.8) < 0.015 and abs(a.gray.mean() - 0.2) < 0.015
    assert abs(a.blur.mean() - 0.5) < 0.015
    assert a.sigma.min() >= 0.1 and a.sigma.max() <= 2.0
    assert (a.factors[:, :3] >= 0.6).all() and (a.factors[:, :3] <= 1.4).all()
    assert (np.abs(a.factors[:, 3]) <= 0.1).all()
    assert (np.sort(a.order, axis=1) == np.arange(4)).all()  # each row a permutation
    assert len({tuple(r) for r in a.order[:2000]}) == 24


def _pcfg(**kw):
    base = dict(scales=[64, 80], max_size=100, patch_size=32, num_patches=6)
    base.update(kw)
    return PretextConfig(**base)


def test_deterministic_and_no_global_rng():
    img = synthetic_image(1, 0, (60, 90))
    pcfg = _pcfg()
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    a = make_pretrain_sample(img, pcfg, (42, 3, 77))
    random.seed(2); np.random.seed(2); torch.manual_seed(2)
    b = make_pretrain_sample(img, pcfg, (42, 3, 77))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["patches"], b["patches"])
    assert torch.equal(a["target"]["boxes"], b["target"]["boxes"])
    c = make_pretrain_sample(img, pcfg, (42, 4, 77))  # another epoch: new draws
    assert not torch.equal(a["target"]["boxes"], c["target"]["boxes"])
    assert random.random() == random.Random(2).random()  # global RNG untouched (same state as fresh)


def test_sample_shapes_and_target():
    img = synthetic_image(2, 0, (60, 90))
    pcfg = _pcfg()
    s = make_pretrain_sample(img, pcfg, (1, 0, 5))
    t = s["target"]
    h, w = t["size"].tolist()
    assert s["image"].shape == (3, h, w) and s["image"].dtype == torch.float32
    assert s["patches"].shape == (6, 3, 32, 32)
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [1] * 6
    assert t["boxes"].shape == (6, 4) and t["boxes"].dtype == torch.float32
    assert (t["boxes"] > 0).all() and (t["boxes"] <= 1).all()
    assert t["orig_size"].tolist() == [img.height, img.width] and int(t["image_id"]) == 5
    assert min(h, w) in (64, 80) or max(h, w) == 100


def test_normalisation_matches_torchvision():
    img = synthetic_image(3, 0, (60, 90))
    rec = make_pretrain_record(img, _pcfg(augment=False), (0, 0, 0))
    ref = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    assert torch.allclose(normalize_image(rec["image"]), ref(Image.fromarray(rec["image"])), atol=2e-6, rtol=0)


def test_boxes_match_crops_with_augment_off():
    img = synthetic_image(4, 0, (70, 90))
    pcfg = _pcfg(augment=False, num_patches=8)
    rec = make_pretrain_record(img, pcfg, (9, 0, 4))
    d = draw_sample(img.width, img.height, pcfg, (9, 0, 4))
    oh, ow = rec["size"].tolist()
    resized = Image.fromarray(rec["image"])
    for i, (cx, cy, bw, bh) in enumerate(rec["boxes"]):
        # the patch is the original crop at the sampled box, resized to P x P (torch's uint8 antialiased
        # bilinear kernel: within one grey level of PIL's Resize)
        ref = np.asarray(img.crop(tuple(int(v) for v in d.boxes[i])).resize((32, 32), Image.BILINEAR))
        diff = np.abs(rec["patches"][i].astype(np.int16) - ref)
        assert diff.max() <= 1 and diff.mean() < 0.5
        # and the normalised box, mapped onto the resized image, cuts out the same content
        box = ((cx - bw / 2) * ow, (cy - bh / 2) * oh, (cx + bw / 2) * ow, (cy + bh / 2) * oh)
        np.testing.assert_allclose(box, d.boxes[i] * np.array([ow / img.width, oh / img.height] * 2), atol=1e-3)
        crop = np.asarray(resized.resize((32, 32), Image.BILINEAR, box=box), dtype=np.float32)
        assert np.abs(crop - rec["patches"][i].astype(np.float32)).mean() < 12


def test_augment_changes_patches_but_not_boxes():
    img = synthetic_image(5, 0, (70, 90))
    off = make_pretrain_record(img, _pcfg(augment=False, num_patches=10), (3, 1, 2))
    on = make_pretrain_record(img, _pcfg(augment=True, num_patches=10), (3, 1, 2))
    assert np.array_equal(off["boxes"], on["boxes"]) and np.array_equal(off["image"], on["image"])
    aug = draw_sample(img.width, img.height, _pcfg(num_patches=10), (3, 1, 2)).aug
    changed = [not np.array_equal(a, b) for a, b in zip(off["patches"], on["patches"])]
    touched = aug.jitter | aug.gray | aug.blur
    assert changed == list(touched)


def test_too_small_raises_bad_image():
    with pytest.raises(BadImage) as e:
        make_pretrain_record(Image.new("RGB", (16, 50)), _pcfg(), (0, 0, 0))
    assert e.value.reason == skips.TOO_SMALL


def _jpeg(img, q=92):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue()


def test_reduced_decode_same_draws_close_pixels():
    big = synthetic_image(6, 0, (420, 440)).resize((880, 860), Image.BILINEAR)
    pcfg = _pcfg(scales=[200], max_size=400, patch_size=32, augment=False)
    data = _jpeg(big)
    ex = record_from_bytes(data, pcfg, (1, 0, 3), decode="full")
    rd = record_from_bytes(data, pcfg, (1, 0, 3), decode="reduced")
    assert np.array_equal(ex["boxes"], rd["boxes"]) and np.array_equal(ex["size"], rd["size"])
    assert np.array_equal(ex["orig_size"], rd["orig_size"])
    diff = np.abs(ex["image"].astype(np.float32) - rd["image"].astype(np.float32)).mean()
    assert diff < 3.0, diff
    pd = np.abs(ex["patches"].astype(np.float32) - rd["patches"].astype(np.float32)).mean()
    assert pd < 6.0, pd


def test_sample_id_stable():
    assert sample_id_from_key("n01440764/n01440764_10026.JPEG") == sample_id_from_key("n01440764\\n01440764_10026.JPEG")
    assert sample_id_from_key("a.jpg") != sample_id_from_key("b.jpg")
    assert 0 <= sample_id_from_key("x") < 2 ** 63
    assert numpy_rng((1, 2, 3)).random() == numpy_rng((1, 2, 3)).random()


def test_patch_ops_match_torchvision():
    import torchvision.transforms.functional as TF
    from PIL import ImageFilter

    img = synthetic_image(7, 0, (40, 50)).resize((32, 32))
    a = draw_patch_aug(np.random.default_rng(5), 64)
    for i in range(64):
        ref = img
        if a.jitter[i]:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for op in a.order[i]:
                ref = ops[op](ref, float(a.factors[i, op]))
        if a.gray[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if a.blur[i]:
            ref = ref.filter(ImageFilter.GaussianBlur(radius=float(a.sigma[i])))
        assert np.array_equal(np.asarray(augment_patch(img, a, i)), np.asarray(ref)), i
    for f in (-0.1, -0.03, 0.0, 0.07, 0.1):
        assert np.array_equal(np.asarray(adjust_hue(img, f)), np.asarray(TF.adjust_hue(img, f)))
