"""PQ with panopticapi `pq_compute`'s semantics, on hand-computed 4x10 cases: crowd of the same class and of
another class, VOID, the 0.5 IoU threshold, a stuff class predicted as two segments; then the evaluator on
files (crowd included) and its COCO panoptic output read back."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from updetr.data.panoptic import PanopticIndex, id2rgb, load_panoptic_json, rgb2id
from updetr.eval.panoptic_eval import PanopticEvaluator
from updetr.eval.pq import PQStat, pq_average, pq_image

PERSON, CAR, SKY = 1, 2, 3
CATS = [PERSON, CAR, SKY]


def cols(a: int, b: int, value: int, base: np.ndarray | None = None) -> np.ndarray:
    """A 4x10 map with columns a..b-1 set to `value` (over `base`, or zeros = VOID)."""
    out = np.zeros((4, 10), np.int64) if base is None else base.copy()
    out[:, a:b] = value
    return out


def seg(i, cat, crowd=0, area=None, m=None):
    s = {"id": i, "category_id": cat, "iscrowd": crowd}
    if m is not None:
        s["area"] = int((m == i).sum())
    return s


def pq(gt, gt_segs, pred, pred_segs, cats=None) -> dict:
    stat = pq_image(gt, gt_segs, pred, pred_segs, CATS)
    return {**pq_average(stat, cats or CATS), "stat": stat}


def test_crowd_of_the_same_class_forgives_a_false_positive_and_another_class_does_not():
    gt = cols(4, 8, 2, cols(0, 4, 1))                     # person 1: cols 0-3, crowd 2: cols 4-7, VOID 8-9
    pred = cols(4, 8, 11, cols(0, 4, 10))                 # exact person + a person segment on the crowd
    same = pq(gt, [seg(1, PERSON, m=gt), seg(2, PERSON, 1, m=gt)], pred, [seg(10, PERSON), seg(11, PERSON)])
    assert same["PQ"] == pytest.approx(1.0)
    other = pq(gt, [seg(1, PERSON, m=gt), seg(2, CAR, 1, m=gt)], pred, [seg(10, PERSON), seg(11, PERSON)])
    s = other["stat"]
    assert (s.tp[0], s.fp[0], s.fn[0]) == (1, 1, 0) and s.tp[1] + s.fp[1] + s.fn[1] == 0
    assert other["PQ"] == pytest.approx(1 / 1.5)          # only person occurs: PQ = 1 / (1 + 0.5)


def test_crowd_pixels_stay_in_the_union_void_pixels_leave_it():
    gt_crowd = cols(4, 8, 2, cols(0, 4, 1))               # person cols 0-3 (16 px), crowd person cols 4-7
    pred = cols(0, 6, 10)                                 # person over cols 0-5: 24 px, 8 on the crowd
    r = pq(gt_crowd, [seg(1, PERSON, m=gt_crowd), seg(2, PERSON, 1, m=gt_crowd)], pred, [seg(10, PERSON)])
    assert r["SQ"] == pytest.approx(16 / 24) and r["RQ"] == pytest.approx(1.0)
    gt_void = cols(0, 4, 1)                               # the same pixels VOID: union 24 + 16 - 16 - 8
    r = pq(gt_void, [seg(1, PERSON, m=gt_void)], pred, [seg(10, PERSON)])
    assert r["SQ"] == pytest.approx(1.0)


def test_iou_must_exceed_one_half():
    gt = cols(0, 4, 1)
    at_half = pq(gt, [seg(1, PERSON, m=gt)], cols(0, 2, 10, cols(2, 4, 0)), [seg(10, PERSON)])  # 8/16
    s = at_half["stat"]
    assert (s.tp[0], s.fp[0], s.fn[0]) == (0, 1, 1) and at_half["PQ"] == 0.0
    above = pq(gt, [seg(1, PERSON, m=gt)], cols(0, 3, 10), [seg(10, PERSON)])                # 12/16
    assert above["PQ"] == pytest.approx(0.75)


def test_a_false_positive_mostly_on_void_is_forgiven_half_is_not():
    gt = cols(0, 4, 1)                                    # cols 4-9 VOID
    base = [seg(1, PERSON, m=gt)]
    mostly = cols(0, 4, 10, cols(4, 7, 11, cols(0, 10, 0)))
    mostly[:, 0:4] = 10
    mostly[0, 3] = 11                                     # segment 11: 12 px on VOID + 1 on the person
    r = pq(gt, base, mostly, [seg(10, PERSON), seg(11, CAR)])
    assert r["stat"].fp.sum() == 0
    half = cols(0, 4, 10)
    half[:2, 4:6] = 11                                    # segment 11: 4 px on VOID ...
    half[:2, 2:4] = 11                                    # ... and 4 on the person: 4/8 is not > 1/2
    r = pq(gt, base, half, [seg(10, PERSON), seg(11, CAR)])
    assert r["stat"].fp[1] == 1


def test_a_stuff_class_predicted_as_two_segments_scores_two_segments():
    gt = np.zeros((4, 10), np.int64)
    gt[:2] = 5                                            # sky: rows 0-1 (20 px)
    pred = np.zeros((4, 10), np.int64)
    pred[0], pred[1] = 20, 21                             # two sky segments of 10 px: IoU 1/2 each
    r = pq(gt, [seg(5, SKY, m=gt)], pred, [seg(20, SKY), seg(21, SKY)], [SKY])
    s = r["stat"]
    assert (s.tp[2], s.fp[2], s.fn[2]) == (0, 2, 1) and r["PQ"] == 0.0


def test_ground_truth_area_is_read_from_the_json_and_bad_predictions_are_refused():
    gt = cols(0, 4, 1)
    r = pq(gt, [{"id": 1, "category_id": PERSON, "iscrowd": 0, "area": 24}], cols(0, 4, 10), [seg(10, PERSON)])
    assert r["SQ"] == pytest.approx(16 / 24)              # pq_compute's union uses the JSON's area
    with pytest.raises(ValueError, match="id 10 is in the map and not in segments_info"):
        pq_image(gt, [seg(1, PERSON)], cols(0, 4, 10), [], CATS)
    with pytest.raises(ValueError, match=r"\[11\] are in segments_info and not in the map"):
        pq_image(gt, [seg(1, PERSON)], cols(0, 4, 10), [seg(10, PERSON), seg(11, PERSON)], CATS)
    with pytest.raises(ValueError, match="unknown category id 7"):
        pq_image(gt, [seg(1, PERSON)], cols(0, 4, 10), [seg(10, 7)], CATS)
    assert np.isnan(pq_average(PQStat(CATS), CATS)["PQ"])


def _panoptic_files(tmp_path, gt: np.ndarray, segs: list[dict]) -> PanopticIndex:
    png_dir = tmp_path / "png"
    png_dir.mkdir()
    Image.fromarray(id2rgb(gt), "RGB").save(png_dir / "1.png")
    data = {"images": [{"id": 1, "file_name": "1.jpg", "width": 10, "height": 4}],
            "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": segs}],
            "categories": [{"id": PERSON, "name": "person", "isthing": 1}, {"id": CAR, "name": "car", "isthing": 1},
                           {"id": SKY, "name": "sky", "isthing": 0}]}
    (tmp_path / "pan.json").write_text(json.dumps(data))
    return PanopticIndex(load_panoptic_json(tmp_path / "pan.json"), png_dir)


def test_evaluator_scores_crowd_as_pq_compute_and_writes_coco_panoptic(tmp_path):
    gt = cols(4, 8, 2, cols(0, 4, 1))
    gt[:, 8:] = 3                                         # car cols 8-9
    pan = _panoptic_files(tmp_path, gt, [seg(1, PERSON, m=gt), seg(2, CAR, 1, m=gt), seg(3, CAR, m=gt)])
    ev = PanopticEvaluator(pan)
    index = cols(4, 8, 1, cols(0, 4, 0))                  # person exact (0) + a person on the car crowd (1)
    index[:, 8:] = 2                                      # car exact (2)
    info = [{"id": k, "category_id": c, "isthing": True, "area": int((index == k).sum()), "score": 0.9}
            for k, c in enumerate([PERSON, PERSON, CAR])]
    dets = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    ev.update_image(1, {"segments": torch.from_numpy(index), "segments_info": info}, dets,
                    torch.zeros(0, 4, 10, dtype=torch.uint8))
    m = ev.summarize()
    # person: TP + FP (the crowd is a car's) -> 1/1.5; car: TP -> 1; PQ = mean
    assert m["PQ_th"] == pytest.approx((1 / 1.5 + 1) / 2) and np.isnan(m["PQ_st"])
    ev.write_results(tmp_path / "out" / "segm.json")
    pred_json = json.loads((tmp_path / "out" / "segm_panoptic.json").read_text())
    ann = pred_json["annotations"][0]
    ids = rgb2id(np.asarray(Image.open(tmp_path / "out" / "segm_panoptic" / ann["file_name"]).convert("RGB")))
    assert 0 not in {s["id"] for s in ann["segments_info"]} and ids.min() >= 1
    again = pq_image(gt, pan.anns[1]["segments_info"], ids, ann["segments_info"], [PERSON, CAR, SKY])
    assert pq_average(again, [PERSON, CAR])["PQ"] == pytest.approx(m["PQ_th"])
