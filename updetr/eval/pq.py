"""Panoptic quality with the semantics of panopticapi's `pq_compute` (COCO panoptic), pure numpy.

Per image, from the ground-truth and predicted segment id maps (0 = VOID) and their segments_info:
- a (ground truth, prediction) pair of the same category, the ground truth not crowd, matches when
  IoU > 0.5, where union = pred area + gt area - intersection - (pixels of the prediction on ground-truth
  VOID): only VOID leaves the union, crowd pixels stay in it;
- an unmatched non-crowd ground-truth segment is a false negative (crowd ones never count);
- an unmatched predicted segment is a false positive unless more than half of its pixels lie on VOID plus
  the crowd region *of its own category* (pq_compute keeps one crowd segment per category: the last listed);
- ground-truth areas are the JSON's `area` (pq_compute reads them there), predicted areas are pixel counts.
Each segment is scored as listed: two predicted segments of one stuff class stay two segments.
`pq_average` is pq_compute's: means over the categories with TP + FP + FN > 0 (NaN where a group has none,
where pq_compute divides by zero).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

VOID = 0
OFFSET = 256 * 256 * 256  # pq_compute's key: gt_id * OFFSET + pred_id (ids are 24-bit RGB)


class PQStat:
    """Per-category sums `iou, tp, fp, fn` over the images scored so far; `+=` adds another PQStat."""

    def __init__(self, categories: Iterable[int]) -> None:
        self.categories = sorted(int(c) for c in categories)
        self.index = {c: i for i, c in enumerate(self.categories)}
        self.iou = np.zeros(len(self.categories), np.float64)
        self.tp, self.fp, self.fn = (np.zeros(len(self.categories), np.int64) for _ in range(3))

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for c in other.categories:
            i, j = self.index[c], other.index[c]
            self.iou[i] += other.iou[j]
            self.tp[i] += other.tp[j]
            self.fp[i] += other.fp[j]
            self.fn[i] += other.fn[j]
        return self

    def state(self) -> dict:
        return {"categories": list(self.categories), "iou": self.iou.tolist(), "tp": self.tp.tolist(),
                "fp": self.fp.tolist(), "fn": self.fn.tolist()}

    @classmethod
    def from_state(cls, s: Mapping) -> "PQStat":
        out = cls(s["categories"])
        out.iou[:] = s["iou"]
        out.tp[:], out.fp[:], out.fn[:] = s["tp"], s["fp"], s["fn"]
        return out


def pq_image(gt_ids: np.ndarray, gt_segments: Sequence[Mapping], pred_ids: np.ndarray,
             pred_segments: Sequence[Mapping], categories: Iterable[int]) -> PQStat:
    """One image's PQStat.

    Args:
        gt_ids, pred_ids: `[H, W]` integer segment ids (0 = VOID), the same shape.
        gt_segments / pred_segments: segments_info (`id`, `category_id`; ground truth also `iscrowd`, `area`).
        categories: every category id of the dataset.
    Raises ValueError (naming the segment) where pq_compute raises KeyError: a predicted id in the map and
    not in segments_info or the reverse, or a predicted category not in `categories`.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"segment maps differ in size: ground truth {gt_ids.shape} vs prediction {pred_ids.shape}")
    stat = PQStat(categories)
    gt = {int(s["id"]): s for s in gt_segments}
    pred = {int(s["id"]): dict(s) for s in pred_segments}
    labels, counts = np.unique(pred_ids, return_counts=True)
    unlisted = set(pred)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred:
            if label == VOID:
                continue
            raise ValueError(f"predicted segment id {label} is in the map and not in segments_info")
        pred[label]["area"] = count
        unlisted.discard(label)
        if int(pred[label]["category_id"]) not in stat.index:
            raise ValueError(f"predicted segment {label}: unknown category id {pred[label]['category_id']}")
    if unlisted:
        raise ValueError(f"predicted segment ids {sorted(unlisted)[:5]} are in segments_info and not in the map")
    gt_area = {k: float(s["area"]) if "area" in s else float((gt_ids == k).sum()) for k, s in gt.items()}
    joint = gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64)
    keys, inter = np.unique(joint, return_counts=True)
    pairs = {(int(k // OFFSET), int(k % OFFSET)): int(n) for k, n in zip(keys.tolist(), inter.tolist())}
    gt_matched, pred_matched = set(), set()
    for (g, p), n in pairs.items():
        if g not in gt or p not in pred or gt[g].get("iscrowd", 0) == 1:
            continue
        if int(gt[g]["category_id"]) != int(pred[p]["category_id"]):
            continue
        union = pred[p]["area"] + gt_area[g] - n - pairs.get((VOID, p), 0)
        iou = n / union
        if iou > 0.5:
            i = stat.index[int(gt[g]["category_id"])]
            stat.tp[i] += 1
            stat.iou[i] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd = {}
    for g, s in gt.items():
        if g in gt_matched:
            continue
        if s.get("iscrowd", 0) == 1:
            crowd[int(s["category_id"])] = g  # one crowd segment per category, the last listed
            continue
        stat.fn[stat.index[int(s["category_id"])]] += 1
    for p, s in pred.items():
        if p in pred_matched:
            continue
        ignored = pairs.get((VOID, p), 0)
        c = int(s["category_id"])
        if c in crowd:
            ignored += pairs.get((crowd[c], p), 0)
        if ignored / s["area"] > 0.5:
            continue
        stat.fp[stat.index[c]] += 1
    return stat


def pq_average(stat: PQStat, categories: Iterable[int]) -> dict[str, float]:
    """PQ / SQ / RQ averaged over `categories` that occur (TP + FP + FN > 0); NaN when none occurs."""
    pq = sq = rq = 0.0
    n = 0
    for c in categories:
        i = stat.index[int(c)]
        tp, fp, fn, iou = stat.tp[i], stat.fp[i], stat.fn[i], stat.iou[i]
        if tp + fp + fn == 0:
            continue
        n += 1
        pq += iou / (tp + 0.5 * fp + 0.5 * fn)
        sq += iou / tp if tp else 0.0
        rq += tp / (tp + 0.5 * fp + 0.5 * fn)
    if n == 0:
        return {"PQ": float("nan"), "SQ": float("nan"), "RQ": float("nan")}
    return {"PQ": float(pq / n), "SQ": float(sq / n), "RQ": float(rq / n)}  # plain floats: metrics are pickled
