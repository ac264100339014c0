"""PostProcessPanoptic's segment map equals the official module's PNG after the resize to the original size
(PIL NEAREST there; torch `nearest-exact` here, where plain `nearest` differs), up to float ties."""
import io

import numpy as np
import torch
from PIL import Image

from tests.reference_modules import official
from updetr.data.panoptic import id2rgb, rgb2id
from updetr.models.panoptic_postprocess import PostProcessPanoptic


def test_segment_map_equals_the_official_png_after_resize():
    g = torch.Generator().manual_seed(0)
    is_thing = {1: True, 2: True, 3: False, 4: False}
    b, n, h, w = 2, 6, 24, 32
    logits = torch.full((b, n, 6), -10.0)
    labels = torch.tensor([[1, 2, 3, 3, 4, 1], [2, 3, 4, 1, 1, 4]])
    logits.scatter_(2, labels[..., None], 10.0)           # every query kept, confident
    # smooth blob-like mask logits (large segments: no query falls under the minimum area)
    masks = torch.nn.functional.interpolate(torch.randn(b, n, 4, 5, generator=g), size=(h, w), mode="bilinear")
    outputs = {"pred_logits": logits, "pred_masks": masks, "pred_boxes": torch.rand(b, n, 4, generator=g)}
    processed = torch.tensor([[96, 128], [80, 128]])
    target = torch.tensor([[427, 640], [333, 500]])
    ours = PostProcessPanoptic(is_thing, threshold=0.85, min_area=4)(outputs, processed, target)
    with official("up-detr") as load:
        mod = load("models.segmentation")
        mod.id2rgb, mod.rgb2id = id2rgb, rgb2id  # panopticapi's encoders (not installed): the same formula
        ref = mod.PostProcessPanoptic(is_thing, threshold=0.85)(outputs, processed, target)
    for o, r in zip(ours, ref):
        ref_ids = rgb2id(np.asarray(Image.open(io.BytesIO(r["png_string"])).convert("RGB")))
        assert o["segments"].shape == ref_ids.shape
        # equal but where two mask logits tie to float rounding (DETR takes the argmax of their softmax):
        # measured 4 of 166,500 pixels (one model-resolution pixel) on the second image; torch's plain
        # "nearest" resize moves segment borders by a pixel (0.42 % of the first image)
        assert (o["segments"].numpy() != ref_ids).mean() < 1e-4
        assert [s["category_id"] for s in o["segments_info"]] == [s["category_id"] for s in r["segments_info"]]
        for s, t in zip(o["segments_info"], r["segments_info"]):
            assert abs(s["area"] - t["area"]) <= 4
