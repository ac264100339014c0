"""The Pascal VOC devkit's detection AP (VOC2007 11-point or VOC2010+ all-point), pure numpy.

Semantics of the devkit's `VOCevaldet.m` (and of its Python port `voc_eval.py`), per class:
- detections of the class over all images are sorted by descending score (ties keep input order: a stable
  sort, where the devkit's order of ties is unspecified);
- each detection takes the ground-truth box of its image with the highest IoU (difficult ones included);
  IoU >= `iou_threshold` (0.5) with a non-difficult box
  not yet taken is a true positive and takes it, with one already taken a false positive, with a
  *difficult* box neither (ignored); a lower best IoU is a false positive;
- recall = TP / (number of non-difficult ground-truth boxes), precision = TP / (TP + FP);
- AP: VOC2007 = mean over recall thresholds 0, 0.1, ..., 1 of the highest precision at recall >= t;
  VOC2012 = area under the precision envelope at every recall step.

Coordinates: continuous `[x0, y0, x1, y1]` pixels, as `updetr.data.voc` makes them from the XML (x0 = xmin - 1,
x1 = xmax). The devkit adds 1 to widths and heights of its 1-based inclusive pixel boxes; on the converted
boxes the plain continuous IoU is that same number, so no +1 appears here.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

VOC_METRICS = ("voc07", "voc12")


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of `box [4]` with each of `boxes [G, 4]` (xyxy) -> `[G]`."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, np.finfo(np.float64).tiny), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07: bool) -> float:
    """AP from the cumulative `recall [D]` / `precision [D]` of the score-sorted detections."""
    if use_07:
        # 11-point: mean of the highest precision at recall >= t, t = 0, 0.1, ..., 1 (0 when never reached)
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: best precision at any higher recall
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def class_ap(gt: Mapping[int, tuple[np.ndarray, np.ndarray]], image_ids: Sequence[int], scores: Sequence[float],
             boxes: np.ndarray, use_07: bool = True, iou_threshold: float = 0.5) -> float:
    """AP of one class.

    Args:
        gt: `{image_id: (boxes [G, 4] xyxy, difficult [G] bool)}` of this class, for every evaluated image
            (an image without this class may be absent).
        image_ids, scores: `[D]` the image and confidence of each detection of this class.
        boxes: `[D, 4]` xyxy detection boxes.
    Returns -1.0 when the class has no non-difficult ground truth (the devkit divides by zero there).
    """
    npos = int(sum((~np.asarray(d, bool)).sum() for _, d in gt.values()))
    if npos == 0:
        return -1.0
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    taken = {i: np.zeros(len(b), bool) for i, (b, _) in gt.items()}
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, d in enumerate(order):
        img = int(image_ids[d])
        g_boxes, g_difficult = gt.get(img, (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(g_boxes) == 0:
            fp[rank] = 1
            continue
        ious = iou_one_to_many(boxes[d], np.asarray(g_boxes, np.float64))
        j = int(np.argmax(ious))
        if ious[j] < iou_threshold:
            fp[rank] = 1
        elif g_difficult[j]:
            continue  # matched a difficult object: neither a true nor a false positive
        elif taken[img][j]:
            fp[rank] = 1  # duplicate detection of an object already found
        else:
            tp[rank], taken[img][j] = 1, True
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return average_precision(recall, precision, use_07)


def _xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def per_class_voc_ap(coco_gt: Any, results: list[dict], img_ids: Sequence[int], cat_ids: Sequence[int],
                     metric: str = "voc07") -> dict[int, float]:
    """`{category id: AP at IoU 0.5}` by the VOC devkit's rule (`metric` voc07: 11-point, voc12: all-point)
    of COCO-format `results` (xywh boxes) against a pycocotools-style ground truth (`coco_gt.dataset`, as
    `updetr.data.voc.voc_to_coco` builds it: xywh boxes, each annotation's `difficult` flag).

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
