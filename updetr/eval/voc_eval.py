"""VOC devkit scoring (`eval.metric: voc07 | voc12`) of COCO-form ground truth and COCO results.

`per_class_voc_ap` turns a pycocotools ground truth (as `updetr.data.voc.voc_to_coco` builds it: xywh boxes,
each annotation's `difficult` flag) and COCO-format detections into `updetr.eval.voc_metric.class_ap`'s
inputs. `VocEvaluator` is `CocoEvaluator` (same accumulation, DDP state and results JSON) scored by the devkit:
`AP50` = mean over classes with ground truth, `AP50_<class>` per class (-1: no non-difficult object).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO

from updetr.eval.coco_eval import CocoEvaluator, distinct_ids
from updetr.eval.voc_metric import VOC_METRICS, class_ap


def _xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def per_class_voc_ap(coco_gt: COCO, results: list[dict], img_ids: Sequence[int], cat_ids: Sequence[int],
                     metric: str = "voc07") -> dict[int, float]:
    """`{category id: AP at IoU 0.5}` by the VOC devkit's rule (`metric` voc07: 11-point, voc12: all-point).

    Only annotations and detections of `img_ids` count. An annotation is difficult when its `difficult` flag
    is set (VOC XML), or else when it is a COCO crowd region.
    """
    if metric not in VOC_METRICS:
        raise ValueError(f"metric '{metric}' is not one of {VOC_METRICS}")
    images = {int(i) for i in img_ids}
    gt: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for a in coco_gt.dataset.get("annotations", []):
        if int(a["image_id"]) in images:
            boxes, difficult = gt[int(a["category_id"])][int(a["image_id"])]
            boxes.append(_xyxy(a["bbox"]))
            difficult.append(bool(a.get("difficult", a.get("iscrowd", 0))))
    dets: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if int(r["image_id"]) in images:
            dets[int(r["category_id"])].append(r)
    out = {}
    for c in sorted({int(c) for c in cat_ids}):
        g = {i: (np.asarray(b, np.float64).reshape(-1, 4), np.asarray(d, bool)) for i, (b, d) in gt[c].items()}
        d = dets[c]
        out[c] = class_ap(g, [r["image_id"] for r in d], [r["score"] for r in d],
                          np.asarray([_xyxy(r["bbox"]) for r in d], np.float64).reshape(-1, 4),
                          use_07=metric == "voc07")
    return out


def mean_ap(per_class: Mapping[int, float]) -> float:
    """Mean over the classes that have ground truth (AP >= 0); -1 when none has."""
    vals = [v for v in per_class.values() if v >= 0]
    return float(np.mean(vals)) if vals else -1.0


class VocEvaluator(CocoEvaluator):
    """Detections of the images of a VOC split (COCO form), scored by the devkit (`metric` voc07 | voc12)."""

    def __init__(self, coco_gt: COCO, metric: str = "voc07") -> None:
        if metric not in VOC_METRICS:
            raise ValueError(f"metric '{metric}' is not one of {VOC_METRICS}")
        super().__init__(coco_gt)
        self.metric = metric

    def summarize(self) -> dict[str, float]:
        img_ids = distinct_ids(self.img_ids, "the evaluation split is empty: no image was evaluated (check "
                                             "data.val_path / the annotation file)")
        cats = {int(c["id"]): c["name"] for c in self.coco_gt.dataset["categories"]}
        ap = per_class_voc_ap(self.coco_gt, self.results, img_ids, list(cats), self.metric)
        out = {"AP50": mean_ap(ap)}
        out.update({f"AP50_{cats[c]}": v for c, v in ap.items()})
        return out
