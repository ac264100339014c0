"""Each switch of the ablation grid changes what the model computes, so a switch that is ignored fails here:
the group attention mask isolates the query groups of different patches (and only when on), M sets the group
of N/M query slots each patch feeds, query shuffle re-pairs slots in training only when on, feature
reconstruction adds the feature branch and its loss, a frozen CNN gets no gradient."""
import pytest
import torch

from tests.models.conftest import tiny_cfg
from updetr.tasks import build_model


def _changed_slots(m: int, attention_mask: bool, seed: int = 0) -> torch.Tensor:
    """Which of the N = 20 query slots change their boxes when only patch 0 changes: bool `[N]`."""
    torch.manual_seed(seed)
    model, _, _ = build_model(tiny_cfg(f"pretext.num_patches={m}", f"pretext.attention_mask={str(attention_mask).lower()}",
                                       "pretext.patch_dropout=0.0", "model.dropout=0.0"))
    model.eval()
    g = torch.Generator().manual_seed(seed)
    imgs, patches = torch.randn(1, 3, 64, 96, generator=g), torch.randn(1, m, 3, 32, 32, generator=g)
    other = patches.clone()
    other[:, 0] = torch.randn(other[:, 0].shape, generator=g)
    with torch.no_grad():
        a, b = model(imgs, patches)["pred_boxes"][0], model(imgs, other)["pred_boxes"][0]
    return ~torch.isclose(a, b, atol=1e-6, rtol=0).all(-1)


@pytest.mark.parametrize("m", [2, 4])
def test_attention_mask_confines_a_patch_to_its_own_query_group(m):
    per = 20 // m
    changed = _changed_slots(m, attention_mask=True)
    assert changed[:per].all() and not changed[per:].any()   # only the N/M slots patch 0 feeds
    unmasked = _changed_slots(m, attention_mask=False)
    assert unmasked.all()                                      # without the mask every slot sees patch 0


def test_single_patch_feeds_every_query():
    assert _changed_slots(1, attention_mask=True).all()


def test_query_shuffle_off_keeps_training_deterministic_on_re_pairs():
    imgs, patches = torch.randn(2, 3, 64, 96), torch.randn(2, 4, 3, 32, 32)
    for shuffle, same in (("false", True), ("true", False)):
        torch.manual_seed(0)
        model, _, _ = build_model(tiny_cfg(f"pretext.query_shuffle={shuffle}", "pretext.patch_dropout=0.0",
                                           "model.dropout=0.0"))
        model.train()
        a = model(imgs, patches)["pred_boxes"]
        b = model(imgs, patches)["pred_boxes"]
        assert torch.allclose(a, b) is same, shuffle


def test_feature_reconstruction_switch():
    imgs, patches = torch.randn(2, 3, 64, 96), torch.randn(2, 4, 3, 32, 32)
    on, crit_on, _ = build_model(tiny_cfg("pretext.feature_recon=true"))
    off, crit_off, _ = build_model(tiny_cfg("pretext.feature_recon=false"))
    assert "pred_feature" in on(imgs, patches) and "pred_feature" not in off(imgs, patches)
    assert any(k.startswith("feature_align.") for k in on.state_dict())
    assert not any(k.startswith("feature_align.") for k in off.state_dict())
    assert "loss_feature" in crit_on.weight_dict and crit_on.weight_dict["loss_feature"] > 0
    assert crit_off.weight_dict.get("loss_feature", 0) == 0


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_backbone_gets_no_gradient(frozen):
    model, _, _ = build_model(tiny_cfg(f"model.freeze_backbone={str(frozen).lower()}"))
    model.train()
    out = model(torch.randn(2, 3, 64, 96), torch.randn(2, 4, 3, 32, 32))
    (out["pred_boxes"].sum() + out["pred_feature"].sum()).backward()
    grads = [p.grad is not None for n, p in model.backbone.named_parameters() if "layer4" in n]
    assert grads and (not any(grads) if frozen else all(grads))
