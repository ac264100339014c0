"""Box predictions in COCO's results format, shared by the box evaluators (COCO AP, VOC devkit AP and one-shot AP50), and the
accumulation of the COCO and VOC evaluators."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from pycocotools.coco import COCO

from updetr.eval.base import EvalError, Evaluator, distinct_ids, write_json_atomic


def to_coco_results(predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> list[dict]:
    """`{image_id: {scores [N], labels [N], boxes [N, 4] xyxy pixels}}` -> COCO results (xywh, one dict
    per detection: image_id, category_id, bbox, score), the format `COCO.loadRes` and the server read."""
    out = []
    for image_id, p in predictions.items():
        boxes = p["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for score, label, box in zip(p["scores"].tolist(), p["labels"].tolist(), xywh):
            out.append({"image_id": int(image_id), "category_id": int(label), "bbox": [float(v) for v in box],
                        "score": float(score)})
    return out


def box_predictions(outputs: dict, targets: list[dict], postprocessors: dict) -> dict[int, dict[str, torch.Tensor]]:
    """`{image_id: {scores [Q], labels [Q], boxes [Q, 4] xyxy pixels}}` of one batch: postprocessors['bbox']
    scales `pred_boxes` [B, Q, 4] to each target's `orig_size` (what box evaluators accumulate)."""
    sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
    results = postprocessors["bbox"](outputs, sizes)
    return {int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)}


class BoxDetections(Evaluator):
    """Detections of the images of `coco_gt` in COCO results form, accumulated per rank and merged under DDP;
    subclasses score them (`summarize`). Shared by the COCO and VOC-devkit evaluators."""

    def __init__(self, coco_gt: COCO) -> None:
        self.coco_gt = coco_gt
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
        """What one rank contributes (plain Python, for `all_gather_object`)."""
        return list(self.img_ids), list(self.results)

    def merge(self, parts: Iterable[tuple[list[int], list[dict]]]) -> None:
        """Replace the accumulated state by the union of `parts` (every rank's `state()`, this one included)."""
        self.img_ids, self.results = [], []
        for ids, res in parts:
            self.img_ids.extend(ids)
            self.results.extend(res)

    def evaluated_ids(self) -> list[int]:
        """The distinct image ids seen; EvalError when none was evaluated or one twice."""
        return distinct_ids(self.img_ids, "the evaluation split is empty: no image was evaluated (check "
                                          "data.val_path / the annotation file)")

    def write_results(self, path: str | os.PathLike) -> Path:
        """The accumulated detections as a COCO results JSON file (atomic)."""
        return write_json_atomic(path, self.results)
