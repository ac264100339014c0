"""The VOC devkit's AP on hand-computed cases (difficult objects, duplicates, the 0.5 IoU threshold, 11-point
vs all-point), and `VocEvaluator` on a real VOC folder converted by `updetr.data.voc`."""
import numpy as np
import pytest
import torch

from updetr.data.coco import coco_from_dict
from updetr.data.synthetic import write_voc_dataset
from updetr.data.voc import voc_to_coco
from updetr.eval.voc_eval import VocEvaluator
from updetr.eval.voc_metric import per_class_voc_ap
from updetr.eval.voc_metric import average_precision, class_ap


def _gt(*boxes_difficult):
    boxes = np.array([b for b, _ in boxes_difficult], float).reshape(-1, 4)
    return boxes, np.array([d for _, d in boxes_difficult], bool)


def _ap(gt, dets, use_07):
    """dets: (image, score, box) triples."""
    return class_ap(gt, [d[0] for d in dets], [d[1] for d in dets], np.array([d[2] for d in dets], float), use_07)


def test_a_detection_of_a_difficult_object_is_neither_true_nor_false_positive():
    gt = {1: _gt(([0, 0, 10, 10], False), ([20, 0, 30, 10], True))}
    dets = [(1, 0.9, [20, 0, 30, 10]), (1, 0.8, [0, 0, 10, 10]), (1, 0.7, [40, 0, 50, 10])]
    # ranks: ignored, TP, FP -> recall [0, 1, 1], precision [0, 1, 0.5]: AP 1 either way
    assert _ap(gt, dets, True) == pytest.approx(1.0)
    assert _ap(gt, dets, False) == pytest.approx(1.0)
    # as a false positive (what a non-ignoring rule gives) the first rank would cost: precision 1/2 at recall 1
    gt_plain = {1: _gt(([0, 0, 10, 10], False))}
    assert _ap(gt_plain, dets, False) == pytest.approx(0.5)


def test_eleven_point_and_all_point_ap_by_hand():
    gt = {1: _gt(([0, 0, 10, 10], False), ([20, 0, 30, 10], False), ([40, 0, 50, 10], False))}
    dets = [(1, 0.9, [0, 0, 10, 10]), (1, 0.8, [60, 0, 70, 10]), (1, 0.7, [20, 0, 30, 10]),
            (1, 0.6, [80, 0, 90, 10])]
    # TP FP TP FP: recall 1/3 1/3 2/3 2/3, precision 1 1/2 2/3 1/2
    assert _ap(gt, dets, False) == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3)      # 5/9
    assert _ap(gt, dets, True) == pytest.approx((4 * 1 + 3 * 2 / 3) / 11)        # 6/11
    # score order, not input order, decides
    assert _ap(gt, dets[::-1], True) == pytest.approx(6 / 11)


def test_each_object_is_matched_once_and_the_best_overlap_decides():
    # GT2 overlaps GT1 at IoU 2/3; the second detection's best match is GT1, already taken: a false positive
    gt = {1: _gt(([0, 0, 10, 10], False), ([2, 0, 12, 10], False))}
    dets = [(1, 0.9, [0, 0, 10, 10]), (1, 0.8, [0, 0, 10, 10])]
    assert _ap(gt, dets, False) == pytest.approx(0.5)
    assert _ap(gt, dets, True) == pytest.approx(6 / 11)


def test_iou_threshold_is_inclusive_at_one_half():
    gt = {1: _gt(([0, 0, 10, 10], False))}
    assert _ap(gt, [(1, 0.9, [0, 0, 10, 5])], True) == pytest.approx(1.0)    # IoU exactly 0.5: TP
    assert _ap(gt, [(1, 0.9, [0, 0, 10, 4.9])], True) == pytest.approx(0.0)  # IoU 0.49: FP


def test_no_ground_truth_and_detections_in_other_images():
    assert _ap({1: _gt(([0, 0, 10, 10], True))}, [(1, 0.9, [0, 0, 10, 10])], True) == -1.0
    gt = {1: _gt(([0, 0, 10, 10], False))}
    # a higher-scored detection in an image without the class is a false positive
    assert _ap(gt, [(2, 0.9, [0, 0, 10, 10]), (1, 0.5, [0, 0, 10, 10])], False) == pytest.approx(0.5)
    assert average_precision(np.array([]), np.array([]), True) == 0.0


def test_voc_evaluator_on_a_converted_voc_folder(tmp_path):
    write_voc_dataset(tmp_path / "voc", "2007", n_trainval=1, n_test=12, difficult_prob=0.4)
    coco = voc_to_coco(tmp_path / "voc", [("2007", "test")])
    assert any(a["difficult"] for a in coco["annotations"]) and not all(a["difficult"] for a in coco["annotations"])
    gt = coco_from_dict(coco)
    ev = VocEvaluator(gt, "voc07")
    for img in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns]).reshape(-1, 4)
        # every object found (difficult ones too: they must not count as false positives), plus a stray
        # low-scored box that every class's curve ends with
        ev.update({img["id"]: {"scores": torch.cat([torch.ones(len(anns)), torch.tensor([0.01])]),
                               "labels": torch.tensor([a["category_id"] for a in anns] + [anns[0]["category_id"]
                                                                                          if anns else 1]),
                               "boxes": torch.cat([boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]])])}})
    m = ev.summarize()
    present = {a["category_id"] for a in coco["annotations"] if not a["difficult"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert m["AP50"] == pytest.approx(1.0)
    assert all(m[f"AP50_{names[c]}"] == pytest.approx(1.0) for c in present)
    assert all(m[f"AP50_{n}"] == -1.0 for c, n in names.items() if c not in present)
    # one non-difficult object of a class missed: all-point AP = the recall reached at precision 1
    first = sorted(present)[0]
    found = [r for r in ev.results if r["category_id"] == first and r["score"] == 1.0]
    missed = next(r for r in found if any(a["image_id"] == r["image_id"] and a["category_id"] == first and
                                          not a["difficult"] and np.allclose(a["bbox"], r["bbox"])
                                          for a in coco["annotations"]))
    res = [r for r in ev.results if r is not missed]
    n_pos = sum(1 for a in coco["annotations"] if a["category_id"] == first and not a["difficult"])
    ap = per_class_voc_ap(gt, res, [i["id"] for i in coco["images"]], [first], "voc12")[first]
    assert ap == pytest.approx((n_pos - 1) / n_pos)


def test_eval_metric_defaults_and_refusal():
    from updetr.config import ConfigError, load_config

    base = ["tracking.enabled=false"]
    assert load_config(None, base + ["task=oneshot", "data.source=synthetic_voc"]).eval.metric == "voc07"
    assert load_config(None, base + ["task=detect", "data.source=synthetic_coco"]).eval.metric == "coco"
    cfg = load_config(None, base + ["task=detect", "data.source=voc", "data.path=/x", "eval.metric=voc12"])
    assert cfg.eval.metric == "voc12"
    with pytest.raises(ConfigError, match="eval.metric 'voc07'.*VOC data only"):
        load_config(None, base + ["task=detect", "data.source=synthetic_coco", "eval.metric=voc07"])


def test_detect_task_scores_voc_with_the_devkit_when_asked(tmp_path):
    from updetr.config import load_config
    from updetr.eval import CocoEvaluator
    from updetr.tasks import get_task

    write_voc_dataset(tmp_path / "voc", "2007", n_trainval=2, n_test=2)
    base = ["tracking.enabled=false", "task=detect", "data.source=voc", f"data.path={tmp_path / 'voc'}"]
    ev = get_task(load_config(None, base + ["eval.metric=voc07"])).evaluator()
    assert isinstance(ev, VocEvaluator) and ev.metric == "voc07"
    ev = get_task(load_config(None, base)).evaluator()
    assert type(ev) is CocoEvaluator
