"""COCO evaluation against pycocotools itself: perfect detections, shifted boxes, results JSON, bad input."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from pycocotools.cocoeval import COCOeval

from updetr.data.coco import coco_from_dict
from updetr.eval import CocoEvaluator, EvalError


def gt_dataset() -> dict:
    """3 images, 7 boxes of 2 categories (ids 1 and 3), sizes spanning small / medium / large."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (1, 2, 5)]
    boxes = [(1, 1, [10, 10, 20, 20]), (1, 3, [100, 50, 80, 60]), (2, 1, [200, 200, 250, 200]),
             (2, 3, [5, 300, 40, 30]), (2, 1, [400, 20, 100, 150]), (5, 3, [300, 300, 30, 28]),
             (5, 1, [50, 60, 300, 200])]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(boxes)]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}


def predictions_from(anns, shift: float = 0.0, score_of=lambda k: 0.9) -> dict:
    """Detections in the PostProcess format (xyxy pixels) from COCO annotations, x shifted by `shift`."""
    out: dict[int, dict] = {}
    for k, a in enumerate(anns):
        x, y, w, h = a["bbox"]
        p = out.setdefault(a["image_id"], {"scores": [], "labels": [], "boxes": []})
        p["scores"].append(score_of(k))
        p["labels"].append(a["category_id"])
        p["boxes"].append([x + shift, y, x + shift + w, y + h])
    return {i: {"scores": torch.tensor(p["scores"]), "labels": torch.tensor(p["labels"]),
                "boxes": torch.tensor(p["boxes"], dtype=torch.float32)} for i, p in out.items()}


def test_ground_truth_fed_back_scores_ap_1():
    data = gt_dataset()
    ev = CocoEvaluator(coco_from_dict(data))
    ev.update(predictions_from(data["annotations"]))
    m = ev.summarize()
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100"):
        assert m[k] == pytest.approx(1.0), (k, m)
    # AR1 allows one detection per image and category: image 2 holds two boxes of category 1 (1 of 2 found)
    assert m["AR1"] == pytest.approx(0.875)  # category 1: 3 of 4 found, category 3: 3 of 3


def test_shifted_boxes_score_what_pycocotools_gives_directly(tmp_path):
    data = gt_dataset()
    coco = coco_from_dict(data)
    ev = CocoEvaluator(coco)
    preds = predictions_from(data["annotations"], shift=6.0, score_of=lambda k: 0.3 + 0.1 * k)
    ev.update(preds)
    ours = ev.summarize()
    # the reference: results written by hand in the COCO results format, scored by pycocotools directly
    ref_results = [{"image_id": a["image_id"], "category_id": a["category_id"],
                    "bbox": [a["bbox"][0] + 6.0, a["bbox"][1], a["bbox"][2], a["bbox"][3]], "score": 0.3 + 0.1 * k}
                   for k, a in enumerate(data["annotations"])]
    with contextlib.redirect_stdout(io.StringIO()):
        ref = COCOeval(coco, coco.loadRes(ref_results), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    assert 0.05 < ours["AP"] < 0.95  # the shift costs AP at strict IoUs but not all of it
    for i, k in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")):
        assert ours[k] == pytest.approx(float(ref.stats[i]), abs=1e-6), k
    # the detections file is the COCO results format pycocotools reads back
    path = ev.write_results(tmp_path / "det.json")
    written = json.loads(path.read_text())
    assert len(written) == 7
    assert {"image_id", "category_id", "bbox", "score"} <= set(written[0])
    coco.loadRes(str(path))
    assert "AP" in CocoEvaluator.format_table(ours)


def test_merged_rank_parts_equal_one_process():
    data = gt_dataset()
    preds = predictions_from(data["annotations"], shift=3.0, score_of=lambda k: 1.0 - 0.1 * k)
    one = CocoEvaluator(coco_from_dict(data))
    one.update(preds)
    parts = []
    for ids in ([1, 5], [2]):
        ev = CocoEvaluator(coco_from_dict(data))
        ev.update({i: preds[i] for i in ids})
        parts.append(ev.state())
    merged = CocoEvaluator(coco_from_dict(data))
    merged.merge(parts)
    assert merged.summarize() == one.summarize()


def test_empty_split_and_unknown_images_are_errors_not_ap_0():
    data = gt_dataset()
    ev = CocoEvaluator(coco_from_dict(data))
    with pytest.raises(EvalError, match="evaluation split is empty"):
        ev.summarize()
    with pytest.raises(EvalError, match="not in the ground truth"):
        ev.update({99: {"scores": torch.zeros(1), "labels": torch.zeros(1, dtype=torch.long),
                        "boxes": torch.zeros(1, 4)}})


def test_accumulated_ids_must_be_distinct_and_not_empty():
    """The check every evaluator's summarize runs over all ranks' parts: none evaluated, or some twice
    (overlapping rank parts), is an error that says which."""
    from updetr.eval.base import distinct_ids

    assert distinct_ids([3, 1, 2], "empty") == [1, 2, 3]
    with pytest.raises(EvalError, match="^nothing here$"):
        distinct_ids([], "nothing here")
    with pytest.raises(EvalError, match=r"^2 episode\(s\) were evaluated twice \(overlapping rank parts\)$"):
        distinct_ids([1, 2, 2, 5, 5], "empty", unit="episode")
