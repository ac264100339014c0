"""VOC devkit scoring of detections (`eval.metric: voc07 | voc12`): the COCO evaluator's accumulation (same
DDP state and results JSON), scored by `updetr.eval.voc_metric`: `AP50` = mean over the classes with ground
truth, `AP50_<class>` per class (-1: no non-difficult object).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from pycocotools.coco import COCO

from updetr.eval.base import EvalError, Evaluator, distinct_ids, write_json_atomic
from updetr.eval.boxes import box_predictions, to_coco_results
from updetr.eval.voc_metric import VOC_METRICS, mean_ap, per_class_voc_ap


class VocEvaluator(Evaluator):
    """Detections of the images of a VOC split (COCO form), scored by the devkit (`metric` voc07 | voc12)."""

    metric_names = ("AP50",)

    def __init__(self, coco_gt: COCO, metric: str = "voc07") -> None:
        if metric not in VOC_METRICS:
            raise ValueError(f"metric '{metric}' is not one of {VOC_METRICS}")
        self.coco_gt, self.metric = coco_gt, metric
        self.img_ids: list[int] = []
        self.results: list[dict] = []

    def add_batch(self, outputs: dict, targets: list[dict], postprocessors: dict) -> None:
        """One batch of model outputs: boxes scaled to each target's `orig_size` by postprocessors['bbox']."""
        self.update(box_predictions(outputs, targets, postprocessors))

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """`{image_id: {scores [Q], labels [Q], boxes [Q, 4] xyxy pixels}}`."""
        unknown = [i for i in predictions if int(i) not in self.coco_gt.imgs]
        if unknown:
            raise EvalError(f"predictions for image ids not in the ground truth: {sorted(unknown)[:5]}")
        self.img_ids.extend(int(i) for i in predictions)
        self.results.extend(to_coco_results(predictions))

    def state(self) -> tuple[list[int], list[dict]]:
        return list(self.img_ids), list(self.results)

    def merge(self, parts: Iterable[tuple[list[int], list[dict]]]) -> None:
        self.img_ids, self.results = [], []
        for ids, res in parts:
            self.img_ids.extend(ids)
            self.results.extend(res)

    def summarize(self) -> dict[str, float]:
        img_ids = distinct_ids(self.img_ids, "the evaluation split is empty: no image was evaluated (check "
                                             "data.val_path / the annotation file)")
        cats = {int(c["id"]): c["name"] for c in self.coco_gt.dataset["categories"]}
        ap = per_class_voc_ap(self.coco_gt, self.results, img_ids, list(cats), self.metric)
        out = {"AP50": mean_ap(ap)}
        out.update({f"AP50_{cats[c]}": v for c, v in ap.items()})
        return out

    def write_results(self, path: str | os.PathLike) -> Path:
        """The accumulated detections as a COCO results JSON file (atomic)."""
        return write_json_atomic(path, self.results)
