"""COCO box evaluation: detections -> COCO results JSON -> pycocotools `COCOeval` -> the 12-number summary.

An `updetr.eval.base.Evaluator` (one process or DDP alike). Scores come from `COCOeval.stats`:
AP = stats[0] (IoU .50:.95, area all, 100 dets), AP50, AP75, APs, APm, APl, AR1, AR10, AR100.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from updetr.eval.base import EvalError, Evaluator, distinct_ids, write_json_atomic
from updetr.eval.boxes import box_predictions, to_coco_results

# name -> index into COCOeval.stats (bbox): AR small/medium/large (9..11) are left out, as in DETR's logs.
COCO_METRICS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR1": 6, "AR10": 7, "AR100": 8}


class CocoEvaluator(Evaluator):
    """Accumulate detections of images of `coco_gt`, then score them with COCOeval (iouType 'bbox')."""

    metric_names = tuple(COCO_METRICS)

    def __init__(self, coco_gt: COCO) -> None:
        self.coco_gt = coco_gt
        self.img_ids: list[int] = []
        self.results: list[dict] = []

    def add_batch(self, outputs: dict, targets: list[dict], postprocessors: dict) -> None:
        """One batch of model outputs: boxes scaled to each target's `orig_size` by postprocessors['bbox']."""
        self.update(box_predictions(outputs, targets, postprocessors))

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        unknown = [i for i in predictions if int(i) not in self.coco_gt.imgs]
        if unknown:
            raise EvalError(f"predictions for image ids not in the ground truth: {sorted(unknown)[:5]}")
        self.img_ids.extend(int(i) for i in predictions)
        self.results.extend(to_coco_results(predictions))

    def state(self) -> tuple[list[int], list[dict]]:
        """What one rank contributes (plain Python, for `all_gather_object`)."""
        return list(self.img_ids), list(self.results)

    def merge(self, parts: Iterable[tuple[list[int], list[dict]]]) -> None:
        """Replace the accumulated state by the union of `parts` (every rank's `state()`, this one included)."""
        self.img_ids, self.results = [], []
        for ids, res in parts:
            self.img_ids.extend(ids)
            self.results.extend(res)

    def summarize(self) -> dict[str, float]:
        """The COCO metrics of everything accumulated. Raises EvalError when no image was evaluated."""
        img_ids = distinct_ids(self.img_ids, "the evaluation split is empty: no image was evaluated (check "
                                             "data.val_path / the annotation file)")
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):
            coco_dt = self.coco_gt.loadRes(self.results) if self.results else COCO()
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = img_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # COCOeval writes -1 where a metric has no ground truth (e.g. no small objects): keep it visible.
        return {name: float(ev.stats[i]) for name, i in COCO_METRICS.items()}

    def write_results(self, path: str | os.PathLike) -> Path:
        """The accumulated detections as a COCO results JSON file (atomic)."""
        return write_json_atomic(path, self.results)
