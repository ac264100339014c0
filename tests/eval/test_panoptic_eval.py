"""Panoptic evaluation (torchmetrics PQ + pycocotools segm AP) on a hand-made 10x10 image: the ground truth
against itself scores 1.0; known perturbations score the values computed by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from updetr.data.panoptic import PanopticIndex, id2rgb, load_panoptic_json
from updetr.eval.panoptic_eval import PanopticEvaluator

# 10x10: sky (cat 8, stuff) rows 0-4 = 50 px; ground (cat 9, stuff) rows 5-9 cols 4-9 = 30 px;
# one square (cat 1, thing) rows 5-9 cols 0-3 = 20 px. Segment ids are arbitrary RGB-encoded numbers.
SKY, GROUND, SQUARE = 70000, 513, 9
CATS = [{"id": 1, "name": "square", "isthing": 1}, {"id": 2, "name": "circle", "isthing": 1},
        {"id": 8, "name": "sky", "isthing": 0}, {"id": 9, "name": "ground", "isthing": 0}]


def gt_ids() -> np.ndarray:
    ids = np.full((10, 10), GROUND, dtype=np.int64)
    ids[:5] = SKY
    ids[5:, :4] = SQUARE
    return ids


@pytest.fixture()
def pan(tmp_path):
    png_dir = tmp_path / "png"
    png_dir.mkdir()
    Image.fromarray(id2rgb(gt_ids()), "RGB").save(png_dir / "1.png")
    segs = [{"id": SKY, "category_id": 8, "iscrowd": 0}, {"id": GROUND, "category_id": 9, "iscrowd": 0},
            {"id": SQUARE, "category_id": 1, "iscrowd": 0}]
    data = {"images": [{"id": 1, "file_name": "1.jpg", "width": 10, "height": 10}],
            "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": segs}], "categories": CATS}
    (tmp_path / "pan.json").write_text(json.dumps(data))
    return PanopticIndex(load_panoptic_json(tmp_path / "pan.json"), png_dir)


def score(pan, seg: np.ndarray, cats: list[int], thing_masks: list[np.ndarray]) -> dict:
    """Evaluate one prediction: `seg` [10, 10] segment index per pixel, `cats` category per segment, and
    per-query masks (category 1, score 1) for AP^seg."""
    ev = PanopticEvaluator(pan)
    info = [{"id": k, "category_id": c, "isthing": c in (1, 2), "area": int((seg == k).sum())}
            for k, c in enumerate(cats)]
    masks = torch.from_numpy(np.stack(thing_masks).astype(np.uint8)) if thing_masks else \
        torch.zeros(0, 10, 10, dtype=torch.uint8)
    dets = {"scores": torch.ones(len(thing_masks)), "labels": torch.ones(len(thing_masks), dtype=torch.int64)}
    ev.update_image(1, {"segments": torch.from_numpy(seg), "segments_info": info}, dets, masks)
    # through the distributed path too: one rank's state merged is the same evaluator
    ev.merge([ev.state()])
    metrics = ev.summarize()
    # the masks as a COCO segm results file, still plain JSON after COCOeval has read them
    written = json.loads(ev.write_results(pan.png_dir / "segm.json").read_text())
    assert len(written) == len(thing_masks) and all(r["category_id"] == 1 for r in written)
    return metrics


def as_index(ids: np.ndarray, order: list[int]) -> np.ndarray:
    out = np.full(ids.shape, -1, dtype=np.int64)
    for k, sid in enumerate(order):
        out[ids == sid] = k
    return out


def test_ground_truth_against_itself_is_perfect(pan):
    ids = gt_ids()
    m = score(pan, as_index(ids, [SKY, GROUND, SQUARE]), [8, 9, 1], [ids == SQUARE])
    for k in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "segm_AP", "segm_AP50"):
        assert m[k] == pytest.approx(1.0), k
    assert "PQ_th" in PanopticEvaluator.format_table(m) and "100.00" in PanopticEvaluator.format_table(m)


def test_a_shrunk_thing_gives_the_hand_computed_iou(pan):
    # the square predicted over cols 0-2 only (15 px: IoU 15/20 = 0.75); col 3 goes to the ground
    # (35 px predicted vs 30 px true, all inside: IoU 30/35 = 6/7); sky exact (IoU 1)
    ids = gt_ids()
    pred = ids.copy()
    pred[5:, 3] = GROUND
    m = score(pan, as_index(pred, [SKY, GROUND, SQUARE]), [8, 9, 1], [pred == SQUARE])
    assert m["PQ_th"] == pytest.approx(0.75) and m["SQ_th"] == pytest.approx(0.75) and m["RQ_th"] == 1.0
    assert m["PQ_st"] == pytest.approx((1 + 6 / 7) / 2) and m["RQ_st"] == 1.0
    assert m["PQ"] == pytest.approx((0.75 + 1 + 6 / 7) / 3) and m["SQ"] == pytest.approx(m["PQ"])
    assert m["RQ"] == pytest.approx(1.0)
    # AP^seg: the one mask has IoU 0.75: a hit at IoU 0.50-0.75 (6 of the 10 thresholds), a miss above
    assert m["segm_AP50"] == pytest.approx(1.0) and m["segm_AP"] == pytest.approx(0.6)


def test_a_missing_thing_is_a_false_negative(pan):
    # the square is not predicted; its pixels are ground: ground IoU 30/50 = 0.6 (a match), square FN
    ids = gt_ids()
    pred = ids.copy()
    pred[pred == SQUARE] = GROUND
    m = score(pan, as_index(pred, [SKY, GROUND]), [8, 9], [])
    assert m["PQ_th"] == 0.0 and m["RQ_th"] == 0.0
    assert m["PQ_st"] == pytest.approx(0.8) and m["SQ_st"] == pytest.approx(0.8) and m["RQ_st"] == 1.0
    assert m["PQ"] == pytest.approx((0 + 1 + 0.6) / 3) and m["RQ"] == pytest.approx(2 / 3)
    assert m["segm_AP"] == pytest.approx(0.0)


def test_a_wrong_class_is_a_false_positive_and_a_false_negative(pan):
    # the square predicted as a circle (cat 2): square FN (RQ 0), circle FP (RQ 0): both things score 0
    ids = gt_ids()
    m = score(pan, as_index(ids, [SKY, GROUND, SQUARE]), [8, 9, 2], [])
    assert m["PQ_th"] == 0.0 and m["PQ_st"] == pytest.approx(1.0)
    assert m["PQ"] == pytest.approx(2 / 4)  # 4 classes occur: square 0, circle 0, sky 1, ground 1


def test_an_empty_prediction_scores_zero_not_nan(pan):
    # no kept query: every pixel unassigned; each ground-truth segment is a false negative (panopticapi)
    m = score(pan, np.full((10, 10), -1, dtype=np.int64), [], [])
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert m[k] == 0.0, k
