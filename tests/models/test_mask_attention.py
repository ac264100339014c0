"""The panoptic mask head's attention map: per-head softmax by default (UP-DETR's code, checked against the
official module), DETR's joint softmax over heads x H x W as `panoptic.mask_attention_norm: joint`."""
import torch
import torch.nn.functional as F

from tests.reference_modules import official
from updetr.config import load_config
from updetr.models import build_detr_segm
from updetr.models.segmentation import MHAttentionMap


def _inputs(seed=0, b=2, n=5, c=32, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, n, c, generator=g), torch.randn(b, c, h, w, generator=g)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1, :, 5:] = True  # padding on the second image
    return q, k, mask


def test_per_head_default_equals_the_official_up_detr_module():
    with official("up-detr") as load:
        ref = load("models.segmentation").MHAttentionMap(32, 32, 4, dropout=0.0)
    ours = MHAttentionMap(32, 32, 4, dropout=0.0)
    assert ours.norm == "per_head"
    ours.load_state_dict(ref.state_dict(), strict=True)
    q, k, mask = _inputs()
    got, want = ours(q, k, mask), ref(q, k, mask)
    assert torch.allclose(got, want, atol=1e-6)
    # each (query, head) map is a distribution over H x W; padding gets nothing
    assert torch.allclose(got.sum((-1, -2)), torch.ones(2, 5, 4), atol=1e-5)
    assert got[1, :, :, :, 5:].abs().max() == 0


def test_joint_option_is_detrs_softmax_over_heads_and_pixels():
    with official("up-detr") as load:
        ref = load("models.segmentation").MHAttentionMap(32, 32, 4, dropout=0.0)
    ours = MHAttentionMap(32, 32, 4, dropout=0.0, norm="joint")
    ours.load_state_dict(ref.state_dict(), strict=True)
    q, k, mask = _inputs(1)
    got = ours(q, k, mask)
    # DETR's code: the official logits, softmax over flatten(2)
    ref_logits = torch.einsum("bqnc,bnchw->bqnhw", ref.q_linear(q).view(2, 5, 4, 8) * ref.normalize_fact,
                              F.conv2d(k, ref.k_linear.weight[:, :, None, None], ref.k_linear.bias).view(2, 4, 8, 6, 7))
    ref_logits = ref_logits.masked_fill(mask[:, None, None], float("-inf"))
    assert torch.allclose(got, F.softmax(ref_logits.flatten(2), -1).view_as(got), atol=1e-6)
    assert torch.allclose(got.sum((-1, -2, -3)), torch.ones(2, 5), atol=1e-5)
    assert not torch.allclose(got, ref(q, k, mask), atol=1e-3)


def test_config_selects_the_norm_and_defaults_to_per_head():
    base = ["task=panoptic", "data.source=synthetic_panoptic", "model.backbone=resnet18", "model.hidden_dim=32",
            "model.nheads=4", "model.dim_feedforward=32", "model.enc_layers=1", "model.dec_layers=1",
            "model.num_queries=5", "tracking.enabled=false"]
    cfg = load_config(None, base)
    assert cfg.panoptic.mask_attention_norm == "per_head"
    assert build_detr_segm(cfg, 3, {1: True, 2: False})[0].bbox_attention.norm == "per_head"
    joint = load_config(None, base + ["panoptic.mask_attention_norm=joint"])
    assert build_detr_segm(joint, 3, {1: True, 2: False})[0].bbox_attention.norm == "joint"
