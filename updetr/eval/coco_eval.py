"""COCO box evaluation: detections -> COCO results JSON -> pycocotools `COCOeval` -> the 12-number summary.

The evaluator is a plain accumulator so that it works the same in one process and under DDP: each rank
`update`s with its own images, `state()` is what a rank sends, rank 0 `merge`s the parts and scores once
(DETR's CocoEvaluator gathers the same way). Scores come from `COCOeval.stats`:
AP = stats[0] (IoU .50:.95, area all, 100 dets), AP50, AP75, APs, APm, APl, AR1, AR10, AR100.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# name -> index into COCOeval.stats (bbox): AR small/medium/large (9..11) are left out, as in DETR's logs.
COCO_METRICS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR1": 6, "AR10": 7, "AR100": 8}


class EvalError(ValueError):
    """Evaluation cannot give a meaningful number (empty split, predictions for unknown images)."""


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


def distinct_ids(ids: Sequence[int], empty: str, unit: str = "image") -> list[int]:
    """The sorted distinct ids an evaluator accumulated (over every rank's part). Raises EvalError when there
    are none (`empty` says so and what to check) or when any came twice (overlapping rank parts)."""
    unique = sorted(set(ids))
    if not unique:
        raise EvalError(empty)
    if len(unique) != len(ids):
        raise EvalError(f"{len(ids) - len(unique)} {unit}(s) were evaluated twice (overlapping rank parts)")
    return unique


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON to `path` via a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
    return path


def box_predictions(outputs: dict, targets: list[dict], postprocessors: dict) -> dict[int, dict[str, torch.Tensor]]:
    """`{image_id: {scores [Q], labels [Q], boxes [Q, 4] xyxy pixels}}` of one batch: postprocessors['bbox']
    scales `pred_boxes` to each target's `orig_size` (what box evaluators accumulate)."""
    sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
    results = postprocessors["bbox"](outputs, sizes)
    return {int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)}


class CocoEvaluator:
    """Accumulate detections of images of `coco_gt`, then score them with COCOeval (iouType 'bbox')."""

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


def format_table(metrics: Mapping[str, float], title: str = "") -> str:
    """The COCO (box) or panoptic (PQ ... AP^seg) summary as a small two-line table (values in %, -1 and NaN
    shown as n/a); one-shot metrics (`updetr.eval.oneshot_eval`) as Table 3's per-class row."""
    from updetr.eval.oneshot_eval import format_oneshot_table, is_oneshot_metrics
    from updetr.eval.panoptic_eval import PANOPTIC_METRICS

    if is_oneshot_metrics(metrics):
        return format_oneshot_table(metrics, title)
    names = [n for n in (*COCO_METRICS, *PANOPTIC_METRICS) if n in metrics]
    head = " ".join(f"{n:>6}" for n in names)
    vals = " ".join(f"{'n/a':>6}" if not metrics[n] >= 0 else f"{100 * metrics[n]:6.2f}" for n in names)
    return (f"{title}\n" if title else "") + f"  {head}\n  {vals}"
