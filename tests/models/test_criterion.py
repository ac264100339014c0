"""SetCriterion: every loss term on hand-computed cases, aux suffixes, weight-0 skipping, num_boxes."""
import math

import pytest
import torch
import torch.nn.functional as F

from updetr.tasks import build_model
from updetr.models import criterion as criterion_mod
from updetr.models.criterion import SetCriterion
from updetr.models.matcher import HungarianMatcher

from .conftest import make_targets, tiny_cfg


class FixedMatcher(torch.nn.Module):
    """Returns preset indices, to test the loss arithmetic without the Hungarian step."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices
        self.calls = 0

    def forward(self, outputs, targets):
        self.calls += 1
        return self.indices


def _idx(src, tgt):
    return (torch.tensor(src, dtype=torch.int64), torch.tensor(tgt, dtype=torch.int64))


def test_loss_ce_weighted_by_eos_coef():
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -1.0, 0.0]]])  # B=1, N=3, K=2
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    crit = SetCriterion(2, FixedMatcher([_idx([2], [0])]), {"loss_ce": 1.0}, 0.1, ["labels"])
    out = crit({"pred_logits": logits, "pred_boxes": torch.rand(1, 3, 4)}, targets)
    # query 2 -> class 1 (weight 1); queries 0, 1 -> no-object class 2 (weight 0.1)
    nll = [-math.log(F.softmax(logits[0, q], -1)[c].item()) for q, c in ((0, 2), (1, 2), (2, 1))]
    expected = (0.1 * nll[0] + 0.1 * nll[1] + 1.0 * nll[2]) / (0.1 + 0.1 + 1.0)
    assert out["loss_ce"].item() == pytest.approx(expected, rel=1e-6)
    # argmax of query 2 is class 0, so the matched prediction is wrong -> 100 % error
    assert out["class_error"].item() == pytest.approx(100.0)
    assert crit.empty_weight.tolist() == pytest.approx([1.0, 1.0, 0.1])


def test_loss_boxes_l1_and_giou():
    pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.4], [0.9, 0.9, 0.1, 0.1]]])
    tgt_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.3, 0.2, 0.4]])
    targets = [{"labels": torch.tensor([1, 1]), "boxes": tgt_boxes}]
    crit = SetCriterion(2, FixedMatcher([_idx([0, 1], [0, 1])]), {}, 0.1, ["boxes"])
    out = crit({"pred_logits": torch.zeros(1, 3, 3), "pred_boxes": pred}, targets)
    # L1: pair 0 identical, pair 1 differs by 0.1 in cx -> 0.1 / 2 boxes
    assert out["loss_bbox"].item() == pytest.approx(0.1 / 2, rel=1e-5)
    # GIoU pair 1: boxes [0.2,0.1,0.4,0.5] and [0.3,0.1,0.5,0.5]: inter 0.1*0.4, union 0.12, hull 0.3*0.4
    giou1 = 0.04 / 0.12 - (0.12 - 0.12) / 0.12
    assert out["loss_giou"].item() == pytest.approx((0 + (1 - giou1)) / 2, rel=1e-5)


def test_loss_feature_is_two_minus_two_cos():
    torch.manual_seed(0)
    b, n, m, c = 2, 6, 3, 8
    pred_feature = torch.randn(b, n, c)
    gt_feature = torch.randn(b * m, c)
    indices = [_idx([4, 0], [2, 0]), _idx([1, 3, 5], [0, 1, 2])]
    targets = [{"labels": torch.ones(2, dtype=torch.int64), "boxes": torch.rand(2, 4)},
               {"labels": torch.ones(3, dtype=torch.int64), "boxes": torch.rand(3, 4)}]
    crit = SetCriterion(2, FixedMatcher(indices), {}, 0.1, ["feature"])
    out = crit({"pred_logits": torch.zeros(b, n, 3), "pred_boxes": torch.rand(b, n, 4),
                "pred_feature": pred_feature, "gt_feature": gt_feature}, targets)
    total_sq, total_cos = 0.0, 0.0
    for bi, (src, tgt) in enumerate(indices):
        for q, t in zip(src.tolist(), tgt.tolist()):
            a, g = pred_feature[bi, q], gt_feature[bi * m + t]  # gt rows are image-major
            total_sq += ((a / a.norm() - g / g.norm()) ** 2).sum().item()
            total_cos += 2 - 2 * F.cosine_similarity(a, g, dim=0).item()
    assert out["loss_feature"].item() == pytest.approx(total_sq / 5, rel=1e-5)
    assert out["loss_feature"].item() == pytest.approx(total_cos / 5, rel=1e-5)


def test_cardinality_error():
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]])  # 2 non-empty predictions
    targets = [{"labels": torch.tensor([1, 1, 1, 1]), "boxes": torch.rand(4, 4)}]
    crit = SetCriterion(2, FixedMatcher([_idx([0, 1, 2], [0, 1, 2])]), {}, 0.1, ["cardinality"])
    out = crit({"pred_logits": logits, "pred_boxes": torch.rand(1, 3, 4)}, targets)
    assert out["cardinality_error"].item() == pytest.approx(2.0)


def test_aux_losses_rematched_with_suffix_and_weights():
    cfg = tiny_cfg("model.dec_layers=3")
    model, crit, _ = build_model(cfg)
    expected_keys = {"loss_ce", "loss_bbox", "loss_giou", "loss_feature"}
    assert set(crit.weight_dict) == expected_keys | {f"{k}_{i}" for k in expected_keys for i in range(2)}
    assert crit.weight_dict["loss_bbox_1"] == 5.0 and crit.weight_dict["loss_giou"] == 2.0
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 4, 3, 32, 32))
    calls = []
    orig = crit.matcher.match_layers
    crit.matcher.match_layers = lambda layers, t: calls.append(len(layers)) or orig(layers, t)
    targets = make_targets(2, 4)
    losses = crit(out, targets)
    assert calls == [3]  # last layer + 2 aux layers, in one matching call
    # ... each re-matched on its own predictions: the aux losses are those of the layer's own assignment
    aux0 = {"pred_logits": out["aux_outputs"][0]["pred_logits"], "pred_boxes": out["aux_outputs"][0]["pred_boxes"]}
    own = crit.loss_boxes(aux0, targets, crit.matcher(aux0, targets), 8.0)  # 2 images x 4 targets
    assert torch.equal(own["loss_bbox"], losses["loss_bbox_0"])
    assert set(losses) == (set(crit.weight_dict) | {"class_error", "cardinality_error", "cardinality_error_0",
                                                    "cardinality_error_1"})
    assert all(torch.isfinite(v) for v in losses.values())


def test_zero_weight_losses_are_not_computed():
    model, crit, _ = build_model(tiny_cfg("loss.feature=0", "loss.giou=0"))
    assert crit.weight_dict["loss_feature"] == 0
    called = []
    orig = criterion_mod.generalized_box_iou
    try:
        criterion_mod.generalized_box_iou = lambda a, b, **kw: called.append(1) or orig(a, b, **kw)
        losses = crit(model(torch.randn(2, 3, 64, 64), torch.randn(2, 4, 3, 32, 32)), make_targets(2, 4))
    finally:
        criterion_mod.generalized_box_iou = orig
    assert not called
    assert not any(k.startswith(("loss_feature", "loss_giou")) for k in losses)
    assert "loss_ce" in losses and "loss_bbox_0" in losses


def test_empty_targets_and_num_boxes_clamp():
    crit = SetCriterion(2, HungarianMatcher(1, 5, 2), {}, 0.1, ["labels", "boxes", "cardinality", "feature"])
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = {"pred_logits": torch.randn(2, 5, 3, requires_grad=True), "pred_boxes": torch.rand(2, 5, 4),
           "pred_feature": torch.randn(2, 5, 8), "gt_feature": torch.randn(0, 8)}
    losses = crit(out, empty)
    assert crit.num_boxes(empty, "cpu") == 1.0
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["loss_feature"].item() == 0
    # every query targets no-object
    expected = F.cross_entropy(out["pred_logits"].transpose(1, 2), torch.full((2, 5), 2), crit.empty_weight)
    assert torch.allclose(losses["loss_ce"], expected)
    losses["loss_ce"].backward()


def test_num_boxes_all_reduced_over_processes(monkeypatch):
    crit = SetCriterion(2, HungarianMatcher(1, 5, 2), {}, 0.1, ["labels"])
    monkeypatch.setattr(criterion_mod, "_dist_ready", lambda: True)
    monkeypatch.setattr(criterion_mod.dist, "all_reduce", lambda t: t.add_(10.0))  # other rank has 10 boxes
    monkeypatch.setattr(criterion_mod.dist, "get_world_size", lambda: 2)
    assert crit.num_boxes(make_targets(2, 3), "cpu") == pytest.approx(8.0)  # (6 + 10) / 2


def test_unknown_loss_rejected():
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(2, HungarianMatcher(), {}, 0.1, ["segments"])
