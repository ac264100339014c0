"""Panoptic evaluation: PQ / SQ / RQ (overall, things, stuff) with torchmetrics' `PanopticQuality`, and mask
AP (AP^seg) with pycocotools `COCOeval(iouType='segm')` — the columns of the paper's Table 4.

PQ: each evaluated image's predicted segment map and its ground truth (read from the panoptic PNG at the
original size) go to `torchmetrics.detection.PanopticQuality(return_per_class=True, return_sq_and_rq=True)`;
PQ^th / PQ^st are the means over the thing / stuff classes that occur (TP + FP + FN > 0), as panopticapi
averages. Void and crowd ground-truth pixels get no category, so torchmetrics ignores them (a predicted
segment mostly on them is no false positive). Unclaimed predicted pixels form an extra "unassigned" class
(in no average), so every unmatched ground-truth segment is a false negative, as in panopticapi. AP^seg: every query's mask (DETR's PostProcessSegm) against
the thing segments of the evaluated images' ground truth (RLE), categories = the thing classes.

Distributed: an `updetr.eval.base.Evaluator`: `state()` / `merge(parts)` / `summarize()` (the per-class sums
add up).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from updetr.data.coco import coco_from_dict
from updetr.eval.base import EvalError, Evaluator, distinct_ids, write_json_atomic

# reported names, in Table 4's column order
PANOPTIC_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "segm_AP")
SEGM_METRICS = {"segm_AP": 0, "segm_AP50": 1, "segm_AP75": 2}


def panoptic_quality_metric(things: Iterable[int], stuffs: Iterable[int]):
    """The torchmetrics metric this evaluator uses (per-class PQ, SQ, RQ as `[C, 3]`)."""
    from torchmetrics.detection import PanopticQuality

    # sync_on_compute off: ranks are gathered by `PanopticEvaluator.merge` (rank 0 alone computes; torchmetrics'
    # own all-gather there would wait forever for the other ranks, and would count their parts twice)
    return PanopticQuality(things=set(things), stuffs=set(stuffs), return_sq_and_rq=True, return_per_class=True,
                           sync_on_compute=False)


def pq_summary(metric, things: Iterable[int], stuffs: Iterable[int]) -> dict[str, float]:
    """PQ/SQ/RQ overall, things (`_th`) and stuff (`_st`) from a `PanopticQuality` metric's per-class
    result: means over the classes of the group that occur (TP + FP + FN > 0), as panopticapi's
    `pq_average`; a group without any occurring class gives NaN. Classes of the metric outside `things`
    and `stuffs` (the evaluator's "unassigned" class) are in no group."""
    with warnings.catch_warnings():  # merged states (merge) were set without `update`: torchmetrics warns
        warnings.filterwarnings("ignore", message=".*compute.*called before the ``update``")
        per_class = metric.compute()  # [C, 3] (pq, sq, rq); classes ordered by metric.cat_id_to_continuous_id
    occurs = (metric.true_positives + metric.false_positives + metric.false_negatives) > 0
    order = metric.cat_id_to_continuous_id
    things, stuffs = set(things), set(stuffs)
    groups = {"": things | stuffs, "_th": things, "_st": stuffs}
    out = {}
    for suffix, cats in groups.items():
        idx = torch.tensor([order[c] for c in sorted(cats) if c in order and occurs[order[c]]], dtype=torch.long)
        for j, name in enumerate(("PQ", "SQ", "RQ")):
            out[name + suffix] = float(per_class[idx, j].mean()) if len(idx) else float("nan")
    return out


def _plain(rle: dict) -> dict:
    """pycocotools RLE -> JSON-ready: counts as str, size as Python ints."""
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


class PanopticEvaluator(Evaluator):
    """Accumulate panoptic + mask predictions of images of a `PanopticIndex`, then score them."""

    metric_names = PANOPTIC_METRICS

    def __init__(self, pan) -> None:
        """`pan`: `updetr.data.panoptic.PanopticIndex` of the evaluation split."""
        self.pan = pan
        # Pixels no kept query claims (and predicted ids the dataset does not list) get this extra stuff class
        # rather than torchmetrics' void: torchmetrics does not count a ground-truth segment that is mostly
        # void in the prediction as a false negative, panopticapi does (an empty prediction must score 0).
        self.unassigned = max(pan.categories) + 1
        self.metric = panoptic_quality_metric(pan.things, pan.stuffs + [self.unassigned])
        self.img_ids: list[int] = []
        self.results: list[dict] = []      # COCO segm results (RLE), AP^seg
        self.gt_anns: list[dict] = []      # thing segments of the evaluated images (RLE)

    # -- accumulate
    def add_batch(self, outputs: dict, targets: list[dict], postprocessors: dict) -> None:
        """Post-process one batch of model outputs (`pred_logits`, `pred_boxes`, `pred_masks`) and add it."""
        processed = torch.stack([t["size"] for t in targets]).to(outputs["pred_logits"].device)
        orig = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_logits"].device)
        panoptic = postprocessors["panoptic"](outputs, processed, orig)
        boxes = postprocessors["bbox"](outputs, orig)
        masks = postprocessors["segm"](outputs, processed, orig)
        for t, p, b, m in zip(targets, panoptic, boxes, masks):
            self.update_image(int(t["image_id"]), p, {k: v.cpu() for k, v in b.items()}, m)

    def update_image(self, image_id: int, panoptic: dict, detections: dict, masks: torch.Tensor) -> None:
        """One image: `panoptic` {segments [H, W] int64 (-1 void), segments_info}; `detections` {scores [N],
        labels [N]}; `masks` uint8 `[N, H, W]` (per query, original size)."""
        if image_id not in self.pan.images:
            raise EvalError(f"predictions for image id {image_id}, which is not in the ground truth")
        gt, ids_map, segs = self.pan.ground_truth(image_id)
        seg = panoptic["segments"].cpu().numpy()
        if seg.shape != gt.shape[:2]:
            raise EvalError(f"image {image_id}: predicted map {seg.shape} vs ground truth {gt.shape[:2]}")
        pred = np.full(gt.shape, -1, dtype=np.int64)
        pred[..., 1] = 0
        known = set(self.pan.categories)
        cats = np.array([s["category_id"] if s["category_id"] in known else self.unassigned
                         for s in panoptic["segments_info"]] + [self.unassigned], dtype=np.int64)
        pred[..., 0] = cats[seg]  # seg == -1 picks the trailing entry: unassigned
        pred[..., 1] = np.where(seg >= 0, seg + 1, 0)
        self.metric.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
        self.img_ids.append(image_id)
        for s in segs:
            if not self.pan.is_thing.get(int(s["category_id"]), False):
                continue
            rle = _plain(mask_utils.encode(np.asfortranarray((ids_map == int(s["id"])).astype(np.uint8))))
            self.gt_anns.append({"image_id": image_id, "category_id": int(s["category_id"]), "segmentation": rle,
                                 "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in
                                                                              mask_utils.toBbox(rle)],
                                 "iscrowd": int(s.get("iscrowd", 0))})
        m = masks.numpy()
        if m.shape[0]:
            rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
            for rle, score, label in zip(rles, detections["scores"].tolist(), detections["labels"].tolist()):
                rle = _plain(rle)
                self.results.append({"image_id": image_id, "category_id": int(label), "segmentation": rle,
                                     "score": float(score)})

    # -- distributed
    def state(self) -> tuple[list[int], dict]:
        """What one rank contributes (plain Python / CPU tensors, for `all_gather_object`): (image ids, the
        rest); image ids first (the engine counts them)."""
        m = self.metric
        return list(self.img_ids), {
            "results": list(self.results), "gt_anns": list(self.gt_anns),
            "sums": [t.clone().cpu() for t in (m.iou_sum, m.true_positives, m.false_positives, m.false_negatives)]}

    def merge(self, parts: Iterable[tuple[list[int], dict]]) -> None:
        """Replace the accumulated state by the union of `parts` (every rank's `state()`, this one included)."""
        parts = list(parts)
        m = self.metric
        m.reset()
        self.img_ids, self.results, self.gt_anns = [], [], []
        for ids, p in parts:
            self.img_ids.extend(ids)
            self.results.extend(p["results"])
            self.gt_anns.extend(p["gt_anns"])
            m.iou_sum += p["sums"][0].to(m.iou_sum)
            m.true_positives += p["sums"][1].to(m.true_positives)
            m.false_positives += p["sums"][2].to(m.false_positives)
            m.false_negatives += p["sums"][3].to(m.false_negatives)

    # -- score
    def segm_ap(self) -> dict[str, float]:
        """COCOeval 'segm' of the accumulated masks over the thing classes (-1 when there is no thing)."""
        img_ids = sorted(set(self.img_ids))
        things = self.pan.things
        gt = {"images": [self.pan.images[i] for i in img_ids],
              "annotations": [{**a, "id": k + 1} for k, a in enumerate(self.gt_anns)],
              "categories": [{"id": c, "name": str(self.pan.categories[c].get("name", c))} for c in things]}
        coco_gt = coco_from_dict(gt)
        # copies: loadRes adds numpy `area` / `bbox` fields to the dicts it gets (write_results needs plain ones)
        results = [dict(r) for r in self.results if r["category_id"] in set(things)]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(results) if results else COCO()
            ev = COCOeval(coco_gt, coco_dt, iouType="segm")
            ev.params.imgIds = img_ids
            ev.params.catIds = list(things)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {name: float(ev.stats[i]) for name, i in SEGM_METRICS.items()}

    def summarize(self) -> dict[str, float]:
        distinct_ids(self.img_ids, "the evaluation split is empty: no image was evaluated (check data.val_path / "
                                   "the panoptic JSON)")
        out = pq_summary(self.metric, self.pan.things, self.pan.stuffs)
        out.update(self.segm_ap() if self.pan.things else {k: -1.0 for k in SEGM_METRICS})
        return out

    def write_results(self, path: str | os.PathLike) -> Path:
        """The accumulated per-query masks as a COCO segm results JSON (atomic)."""
        return write_json_atomic(path, self.results)
