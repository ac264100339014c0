"""One-shot detection scores: AP50 per VOC class, the seen / unseen means, Table 3's layout.

Metric (`metric`): voc07 (default, CoAE's and Table 3's) = the VOC2007 devkit, 11-point AP, detections of
difficult objects ignored (`updetr.eval.voc_eval`); voc12 = the same with all-point AP; coco = pycocotools
`COCOeval` (iouType 'bbox') at the single IoU threshold 0.5, per category, area 'all', 100 detections per
(image, class): the precision curve of category k, `eval['precision'][0, :, k, 0, -1]`, averaged over its 101
recall points (difficult objects are crowd regions). Each episode's detections are scored as detections of its class in its target image; the ground
truth is that class's instances in that image (difficult ones are ignore regions, as for VOC detection), for
exactly the (image, class) pairs that were evaluated. `seen_AP50` / `unseen_AP50` = the mean over that
group's classes that had episodes (Table 3's AP50 columns).

An `updetr.eval.base.Evaluator` (`add_batch`, `state`, `merge`, `summarize`, `write_results`), so the
engine's DDP gather works unchanged; `update` is keyed by episode number instead of image id.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from updetr.eval.base import EvalError, Evaluator, distinct_ids, write_json_atomic
from updetr.eval.boxes import box_predictions, to_coco_results
from updetr.eval.voc_metric import per_class_voc_ap

# Table 3's columns, left to right (VOC names; the paper's short labels below).
PAPER_SEEN_ORDER = ("pottedplant", "sofa", "tvmonitor", "car", "bottle", "boat", "chair", "person", "bus", "train",
                    "horse", "bicycle", "dog", "bird", "motorbike", "diningtable")
PAPER_UNSEEN_ORDER = ("cow", "sheep", "cat", "aeroplane")
SHORT_NAMES = {"pottedplant": "plant", "tvmonitor": "tv", "bicycle": "bike", "motorbike": "mbike",
               "diningtable": "table", "aeroplane": "aero"}


def per_class_ap50(coco_gt: COCO, results: list[dict], img_ids: Sequence[int],
                   cat_ids: Sequence[int]) -> dict[int, float]:
    """`{category id: AP50}` of COCO-format `results` against `coco_gt` (-1 where a class has no ground truth)."""
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        # loadRes adds id / area / segmentation to the dicts it gets: hand it copies (results stay as written)
        coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else COCO()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(set(int(i) for i in img_ids))
        ev.params.catIds = sorted(set(int(c) for c in cat_ids))
        ev.params.iouThrs = np.array([0.5])
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [T=1, R=101, K, A, M]
    out = {}
    for k, c in enumerate(ev.params.catIds):
        p = precision[0, :, k, 0, -1]
        out[int(c)] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return out


def group_mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v >= 0]
    return float(np.mean(vals)) if vals else -1.0


class OneShotEvaluator(Evaluator):
    """Accumulate one-shot detections per episode, then score AP50 per class and the seen / unseen means.

    Args:
        coco_gt: the evaluation split's annotations (VOC category ids 1..20).
        episodes: the split's episodes (`target_image`, `category_id`), numbered as the batches' image_id.
        class_names: `{category id: VOC name}`; seen / unseen: category ids of each group.
        skipped: split-level counts (queries too small, (image, class) pairs without support) for the report.
        metric: voc07 | voc12 | coco (module docstring).
    """

    metric_names = ("seen_AP50", "unseen_AP50")

    def __init__(self, coco_gt: COCO, episodes: Sequence, class_names: Mapping[int, str], seen: Sequence[int],
                 unseen: Sequence[int], skipped: Mapping[str, int] | None = None, metric: str = "voc07") -> None:
        if metric not in ("voc07", "voc12", "coco"):
            raise ValueError(f"metric '{metric}' is not voc07 | voc12 | coco")
        self.metric = metric
        self.coco_gt, self.episodes = coco_gt, list(episodes)
        self.class_names, self.seen, self.unseen = dict(class_names), list(seen), list(unseen)
        self.skipped = dict(skipped or {})
        self.episode_ids: list[int] = []
        self.results: list[dict] = []

    def add_batch(self, outputs: dict, targets: list[dict], postprocessors: dict) -> None:
        """One batch of episodes (each target's `image_id` is its episode number): boxes to `orig_size`."""
        self.update(box_predictions(outputs, targets, postprocessors))

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """`{episode number: {scores [N], labels [N], boxes [N, 4] xyxy pixels of the target image}}`."""
        unknown = [i for i in predictions if not 0 <= int(i) < len(self.episodes)]
        if unknown:
            raise EvalError(f"predictions for episode numbers not in the evaluation split: {sorted(unknown)[:5]}")
        for i, p in predictions.items():
            ep = self.episodes[int(i)]
            labelled = {**p, "labels": torch.full_like(p["labels"], int(ep.category_id))}
            self.results.extend(to_coco_results({int(ep.target_image): labelled}))
            self.episode_ids.append(int(i))

    def state(self) -> tuple[list[int], list[dict]]:
        return list(self.episode_ids), list(self.results)

    def merge(self, parts: Iterable[tuple[list[int], list[dict]]]) -> None:
        self.episode_ids, self.results = [], []
        for ids, res in parts:
            self.episode_ids.extend(ids)
            self.results.extend(res)

    def _scored_gt(self, pairs: set[tuple[int, int]]) -> COCO:
        """Ground truth restricted to the evaluated (image, class) pairs."""
        from updetr.data.coco import coco_from_dict

        ds = self.coco_gt.dataset
        images = {i for i, _ in pairs}
        return coco_from_dict({"images": [im for im in ds["images"] if im["id"] in images],
                               "annotations": [a for a in ds["annotations"]
                                               if (a["image_id"], a["category_id"]) in pairs],
                               "categories": ds["categories"]})

    def summarize(self) -> dict[str, float]:
        """`seen_AP50_<class>` / `unseen_AP50_<class>` per class (-1: no episode), `seen_AP50`, `unseen_AP50`,
        episode counts, and the split's skip counts (`skipped_<reason>`)."""
        ids = distinct_ids(self.episode_ids, "the one-shot evaluation split is empty: no episode was evaluated "
                           "(check data.val_path, and that the test images hold instances with a query in another "
                           "image)", unit="episode")
        pairs = {(self.episodes[i].target_image, self.episodes[i].category_id) for i in ids}
        images, classes = [p[0] for p in pairs], [p[1] for p in pairs]
        if self.metric == "coco":
            ap = per_class_ap50(self._scored_gt(pairs), self.results, images, classes)
        else:
            ap = per_class_voc_ap(self._scored_gt(pairs), self.results, images, classes, self.metric)
        per_ep = {c: 0 for c in self.seen + self.unseen}
        for i in ids:
            per_ep[self.episodes[i].category_id] = per_ep.get(self.episodes[i].category_id, 0) + 1
        out = {f"seen_AP50_{self.class_names[c]}": ap.get(c, -1.0) for c in self.seen}
        out.update({f"unseen_AP50_{self.class_names[c]}": ap.get(c, -1.0) for c in self.unseen})
        out["seen_AP50"] = group_mean(ap.get(c, -1.0) for c in self.seen)
        out["unseen_AP50"] = group_mean(ap.get(c, -1.0) for c in self.unseen)
        out["seen_episodes"] = float(sum(per_ep[c] for c in self.seen))
        out["unseen_episodes"] = float(sum(per_ep[c] for c in self.unseen))
        out.update({f"skipped_{k}": float(v) for k, v in sorted(self.skipped.items())})
        return out

    def write_results(self, path: str | os.PathLike) -> Path:
        """The detections as a COCO results JSON (image id, class = the episode's, box, match score); atomic."""
        return write_json_atomic(path, self.results)

    @classmethod
    def format_table(cls, metrics: Mapping[str, float], title: str = "") -> str:
        """Table 3's row: see `format_oneshot_table`."""
        return format_oneshot_table(metrics, title)


def format_oneshot_table(metrics: Mapping[str, float], title: str = "") -> str:
    """Table 3's row: AP50 (%) per seen class, their mean | per unseen class, their mean, in the paper's
    column order (a custom split keeps that order within each group; n/a = no episode of that class)."""
    def cell(v: float) -> str:
        return f"{'n/a':>6}" if v < 0 else f"{100 * v:6.1f}"

    order = PAPER_SEEN_ORDER + PAPER_UNSEEN_ORDER
    groups = {g: [n for n in order if f"{g}_AP50_{n}" in metrics] for g in ("seen", "unseen")}
    head = " |".join(" ".join(f"{SHORT_NAMES.get(n, n)[:6]:>6}" for n in groups[g]) + f" {'AP50':>6}"
                     for g in ("seen", "unseen"))
    vals = " |".join(" ".join(cell(metrics[f"{g}_AP50_{n}"]) for n in groups[g]) + f" {cell(metrics[g + '_AP50'])}"
                     for g in ("seen", "unseen"))
    width = 7 * (len(groups["seen"]) + 1)
    label = f"  {'seen classes (AP50 %)':<{width}}| unseen classes"
    counts = (f"  episodes: {int(metrics.get('seen_episodes', 0))} seen, "
              f"{int(metrics.get('unseen_episodes', 0))} unseen")
    skipped = {k.removeprefix("skipped_"): int(v) for k, v in metrics.items() if k.startswith("skipped_") and v}
    if skipped:
        counts += "; skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
    return (f"{title}\n" if title else "") + f"{label}\n  {head}\n  {vals}\n{counts}"
