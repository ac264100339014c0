"""HungarianMatcher: optimal vs brute force, batched == per image, empty targets."""
import itertools

import torch

from updetr.models.matcher import HungarianMatcher
from updetr.util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

from .conftest import make_targets


def _outputs(b, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(b, n, k + 1, generator=g),
            "pred_boxes": torch.rand(b, n, 4, generator=g) * 0.4 + 0.1}


def _cost_matrix(logits, boxes, tgt, wc=1.0, wb=5.0, wg=2.0):
    prob = logits.softmax(-1)
    c_class = -prob[:, tgt["labels"]]
    c_bbox = torch.cdist(boxes, tgt["boxes"], p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt["boxes"]))
    return wb * c_bbox + wc * c_class + wg * c_giou


def test_matches_brute_force():
    matcher = HungarianMatcher(1, 5, 2)
    for seed in range(5):
        out = _outputs(1, 5, 3, seed)
        tgt = make_targets(1, 3, seed=seed)[0]
        tgt["labels"] = torch.tensor([0, 2, 1])
        (src, t), = matcher(out, [tgt])
        C = _cost_matrix(out["pred_logits"][0], out["pred_boxes"][0], tgt)
        got = C[src, t].sum()
        best = min(sum(C[q, j] for j, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
        assert torch.isclose(got, best, atol=1e-5), (seed, got, best)
        assert len(src) == 3 and sorted(t.tolist()) == [0, 1, 2]
        assert src.dtype == torch.int64 and t.dtype == torch.int64


def test_batched_equals_per_image_and_counts():
    matcher = HungarianMatcher(1, 5, 2)
    out = _outputs(3, 30, 4)
    targets = make_targets(3, 6, label=2)
    targets[1] = make_targets(1, 2, seed=7)[0]
    batched = matcher(out, targets)
    for b in range(3):
        single = matcher({k: v[b:b + 1] for k, v in out.items()}, [targets[b]])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
        assert len(batched[b][0]) == min(30, len(targets[b]["labels"]))


def test_empty_targets():
    matcher = HungarianMatcher(1, 5, 2)
    out = _outputs(2, 10, 2)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    res = matcher(out, [make_targets(1, 3)[0], empty])
    assert len(res[0][0]) == 3 and len(res[1][0]) == 0 and len(res[1][1]) == 0
    res = matcher(out, [empty, empty])
    assert all(len(s) == 0 and len(t) == 0 for s, t in res)


def test_more_targets_than_queries():
    matcher = HungarianMatcher(1, 5, 2)
    (src, tgt), = matcher(_outputs(1, 3, 2), make_targets(1, 5))
    assert len(src) == len(tgt) == 3


def test_all_layers_in_one_call_equal_one_call_per_layer():
    """The criterion matches every decoder layer with one cost computation and one copy to the host; the
    assignments must be those of matching each layer alone, for DETR's and Deformable DETR's costs, with
    images of different target counts (one without any)."""
    from updetr.models.deformable.matcher import FocalHungarianMatcher

    targets = make_targets(3, 4, seed=7)
    targets[1] = {"labels": targets[1]["labels"][:2], "boxes": targets[1]["boxes"][:2]}
    targets[2] = {"labels": targets[2]["labels"][:0], "boxes": targets[2]["boxes"][:0]}
    for matcher, k in ((HungarianMatcher(1, 5, 2), 3), (FocalHungarianMatcher(2, 5, 2), 4)):
        layers = [_outputs(3, 12, k, seed) for seed in range(4)]
        together = matcher.match_layers(layers, targets)
        assert len(together) == 4
        for layer, got in zip(layers, together):
            alone = matcher(layer, targets)
            assert [len(i) for i, _ in got] == [4, 2, 0]
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, alone))
