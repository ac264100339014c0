"""UPDETR: group attention mask, patch dropout, frozen backbone, eval branch, output shapes."""
import pytest
import torch

from updetr.tasks import build_model
from updetr.models.transformer import Transformer
from updetr.models.updetr import build_group_attention_mask, patch_keep_mask
from updetr.util.nested_tensor import to_nested_tensor

from .conftest import make_targets, tiny_cfg


def _inputs(b=2, m=4, p=32):
    return torch.randn(b, 3, 64, 96), torch.randn(b, m, 3, p, p)


def test_group_mask_block_diagonal_for_every_valid_n_m():
    for n in range(1, 301):
        for m in range(1, n + 1):
            if n % m:
                continue
            mask = build_group_attention_mask(n, m)
            per = n // m
            expected = torch.full((n, n), float("-inf"))
            for p in range(m):  # one open block per patch
                expected[p * per:(p + 1) * per, p * per:(p + 1) * per] = 0
            assert torch.equal(mask, expected), (n, m)
            assert (mask == 0).sum(dim=1).eq(per).all(), f"row without exactly N/M open keys, N={n}, M={m}"


def test_group_mask_rejects_bad_sizes():
    with pytest.raises(ValueError):
        build_group_attention_mask(100, 30)


def test_group_mask_no_nan_where_official_breaks():
    # N=100, M=20: the official loop leaves 75 rows fully masked -> NaN.
    tr = Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                     dropout=0.0, normalize_before=True, return_intermediate_dec=True)
    src, mask = torch.randn(2, 16, 3, 4), torch.zeros(2, 3, 4, dtype=torch.bool)
    hs, _ = tr(src, mask, torch.randn(100, 2, 16), torch.randn(2, 16, 3, 4), build_group_attention_mask(100, 20))
    assert hs.shape == (1, 2, 100, 16) and not torch.isnan(hs).any()


def test_group_mask_is_non_persistent_buffer_and_isolates_groups():
    model, _, _ = build_model(tiny_cfg("model.dropout=0.0", "pretext.patch_dropout=0.0"))
    assert not any("attention_mask" in k for k in model.state_dict())
    assert model.attention_mask.shape == (20, 20)
    model.eval()
    imgs, patches = _inputs()
    out = model(imgs, patches)
    patches2 = patches.clone()
    patches2[:, 1] = torch.randn_like(patches2[:, 1])  # change patch 1 only
    out2 = model(imgs, patches2)
    # With the block mask, groups 0, 2, 3 (queries 0-4, 10-19) do not see patch 1.
    same = torch.cat([torch.arange(0, 5), torch.arange(10, 20)])
    assert torch.allclose(out["pred_boxes"][:, same], out2["pred_boxes"][:, same], atol=1e-6)
    assert not torch.allclose(out["pred_boxes"][:, 5:10], out2["pred_boxes"][:, 5:10])


def test_patch_keep_mask_slot_rate_and_shape():
    torch.manual_seed(1)
    keep = patch_keep_mask(100, 10, 400, 0.1, "slot")
    assert keep.shape == (100, 400, 1)
    assert abs((1 - keep.mean().item()) - 0.1) < 0.01
    # slot mode is not constant inside a group
    grouped = keep.view(10, 10, 400)
    assert ((grouped.min(1).values != grouped.max(1).values)).any()


def test_patch_keep_mask_patch_mode_drops_whole_groups():
    torch.manual_seed(2)
    keep = patch_keep_mask(100, 10, 400, 0.3, "patch")
    grouped = keep.view(10, 10, 400)
    assert torch.equal(grouped.min(1).values, grouped.max(1).values)  # constant per (patch, image)
    assert abs((1 - keep.mean().item()) - 0.3) < 0.03


def test_dropout_placement_in_forward(monkeypatch):
    """Training: dropped slots get only the object query; eval: never dropped."""
    model, _, _ = build_model(tiny_cfg("pretext.patch_dropout=0.5", "model.dropout=0.0"))
    seen = {}
    orig = model.transformer.forward

    def spy(src, mask, query_embed, pos_embed, decoder_mask=None):
        seen["q"] = query_embed.detach().clone()
        seen["dm"] = decoder_mask
        return orig(src, mask, query_embed, pos_embed, decoder_mask)

    monkeypatch.setattr(model.transformer, "forward", spy)
    imgs, patches = _inputs()
    qe = model.query_embed.weight.detach()[:, None, :]  # [N, 1, C]
    model.train()
    torch.manual_seed(3)
    model(imgs, patches)
    q = seen["q"]
    is_query_only = torch.isclose(q, qe.expand_as(q), atol=1e-7).all(-1)  # [N, B]
    frac = is_query_only.float().mean().item()
    assert 0.2 < frac < 0.8  # p=0.5 over 40 slots
    assert seen["dm"] is not None and seen["dm"].shape == (20, 20)
    model.eval()
    model(imgs, patches)
    assert not torch.isclose(seen["q"], qe.expand_as(seen["q"]), atol=1e-7).all(-1).any()


def test_query_shuffle_only_in_training(monkeypatch):
    model, _, _ = build_model(tiny_cfg("pretext.query_shuffle=true", "pretext.patch_dropout=0.0",
                                       "model.dropout=0.0"))
    imgs, patches = _inputs()
    model.eval()
    a = model(imgs, patches)["pred_boxes"]
    b = model(imgs, patches)["pred_boxes"]
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(imgs, patches)["pred_boxes"]
    assert not torch.allclose(a, c)


def test_outputs_shapes_and_aux():
    cfg = tiny_cfg("model.dec_layers=3")
    model, _, _ = build_model(cfg)
    imgs, patches = _inputs(b=2)
    out = model(imgs, patches)
    assert out["pred_logits"].shape == (2, 20, 3)
    assert out["pred_boxes"].shape == (2, 20, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert out["pred_feature"].shape == (2, 20, 512)
    assert out["gt_feature"].shape == (8, 512)
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_boxes", "pred_feature", "gt_feature"}
        assert aux["gt_feature"] is out["gt_feature"]


def test_gt_feature_is_image_major_gap_of_shared_backbone():
    model, _, _ = build_model(tiny_cfg())
    model.eval()
    imgs, patches = _inputs()
    out = model(imgs, patches)
    direct = model.backbone[0](patches[1, 2:3])["0"].mean(dim=(2, 3))
    assert torch.allclose(out["gt_feature"][1 * 4 + 2], direct[0], atol=1e-5)


def test_no_feature_recon():
    model, crit, _ = build_model(tiny_cfg("pretext.feature_recon=false"))
    assert not hasattr(model, "feature_align")
    assert not any(k.startswith("feature_align") for k in model.state_dict())
    out = model(*_inputs())
    assert "pred_feature" not in out and "gt_feature" not in out
    assert "feature" not in crit.losses and "loss_feature" not in crit.weight_dict


def test_eval_fewer_patches():
    model, _, _ = build_model(tiny_cfg())
    model.eval()
    imgs, patches = _inputs(m=3)
    out = model(imgs, patches)
    assert out["pred_logits"].shape == (2, 15, 3) and out["gt_feature"].shape == (6, 512)
    model.train()
    with pytest.raises(ValueError, match="patches"):
        model(imgs, patches)
    with pytest.raises(ValueError):
        model.eval()(imgs, torch.randn(2, 5, 3, 32, 32))


def test_frozen_backbone_has_no_grad_and_no_graph():
    model, crit, _ = build_model(tiny_cfg())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    imgs, patches = _inputs()
    features, _ = model.backbone(to_nested_tensor(imgs))
    assert features[-1].tensors.grad_fn is None and not features[-1].tensors.requires_grad
    out = model(imgs, patches)
    assert out["gt_feature"].grad_fn is None and not out["gt_feature"].requires_grad
    losses = crit(out, make_targets(2, 4))
    total = sum(losses[k] * crit.weight_dict[k] for k in losses if k in crit.weight_dict)
    total.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.patch2query.weight.grad is not None and model.query_embed.weight.grad is not None
    assert model.feature_align.layers[1].weight.grad is not None


def test_unfrozen_backbone_follows_detr_rule():
    model, crit, _ = build_model(tiny_cfg("model.freeze_backbone=false"))
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(any(f"layer{i}" in n for i in (2, 3, 4)) for n in trainable)
    assert not any("layer1" in n or n.endswith("body.conv1.weight") for n in trainable)
    out = model(*_inputs())
    assert out["gt_feature"].requires_grad  # the reconstruction target carries gradients, as official
    losses = crit(out, make_targets(2, 4))
    sum(losses[k] * crit.weight_dict[k] for k in losses if k in crit.weight_dict).backward()
    assert model.backbone[0].body.layer4[0].conv1.weight.grad is not None
    assert model.backbone[0].body.conv1.weight.grad is None


def test_lr_backbone_zero_freezes():
    model, _, _ = build_model(tiny_cfg("model.freeze_backbone=false", "optim.lr_backbone=0"))
    assert not any(p.requires_grad for p in model.backbone.parameters())
