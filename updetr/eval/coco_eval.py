"""COCO box evaluation: detections -> COCO results JSON -> pycocotools `COCOeval` -> the 12-number summary.

An `updetr.eval.base.Evaluator` (one process or DDP alike). Scores come from `COCOeval.stats`:
AP = stats[0] (IoU .50:.95, area all, 100 dets), AP50, AP75, APs, APm, APl, AR1, AR10, AR100.
"""
from __future__ import annotations

import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from updetr.eval.boxes import BoxDetections

# name -> index into COCOeval.stats (bbox): AR small/medium/large (9..11) are left out, as in DETR's logs.
COCO_METRICS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR1": 6, "AR10": 7, "AR100": 8}


class CocoEvaluator(BoxDetections):
    """Accumulate detections of images of `coco_gt`, then score them with COCOeval (iouType 'bbox')."""

    metric_names = tuple(COCO_METRICS)

    def summarize(self) -> dict[str, float]:
        """The COCO metrics of everything accumulated. Raises EvalError when no image was evaluated."""
        img_ids = self.evaluated_ids()
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
