"""Panoptic evaluation: PQ / SQ / RQ (overall, things, stuff) with panopticapi's `pq_compute` semantics
(`updetr.eval.pq`), and mask AP (AP^seg) with pycocotools `COCOeval(iouType='segm')` — the columns of the
paper's Table 4.

PQ: each evaluated image's predicted segment map against its ground-truth PNG and segments_info at the original
size, crowd segments included as pq_compute treats them (out of matching, kept in the union; a false positive is
forgiven only on VOID plus the crowd region of its own category). Predicted pixels of a category the dataset
does not list are VOID (pq_compute would refuse the file). PQ^th / PQ^st are the means over the thing / stuff
classes that occur (TP + FP + FN > 0), as pq_compute averages. AP^seg: every query's mask (DETR's
PostProcessSegm) against the thing segments of the evaluated images' ground truth (RLE), categories = the
thing classes.

`write_results(path)` writes the per-query masks (COCO segm JSON) and the predictions in COCO panoptic format
(`<stem>_panoptic.json` + `<stem>_panoptic/<image id>.png`), which panopticapi's `pq_compute` scores as is.

Distributed: an `updetr.eval.base.Evaluator`: `state()` / `merge(parts)` / `summarize()` (the per-class sums
add up).
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from updetr.data.coco import coco_from_dict
from updetr.data.panoptic import id2rgb
from updetr.eval.base import EvalError, Evaluator, distinct_ids, write_json_atomic
from updetr.eval.pq import PQStat, pq_average, pq_image

# reported names, in Table 4's column order
PANOPTIC_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "segm_AP")
SEGM_METRICS = {"segm_AP": 0, "segm_AP50": 1, "segm_AP75": 2}


def pq_summary(stat: PQStat, things: Iterable[int], stuffs: Iterable[int]) -> dict[str, float]:
    """PQ/SQ/RQ overall, things (`_th`) and stuff (`_st`), as pq_compute's `pq_average` per group."""
    things, stuffs = sorted(things), sorted(stuffs)
    out = {}
    for suffix, cats in (("", things + stuffs), ("_th", things), ("_st", stuffs)):
        out.update({k + suffix: v for k, v in pq_average(stat, cats).items()})
    return out


def predicted_segments(panoptic: dict, known: set[int]) -> tuple[np.ndarray, list[dict]]:
    """A post-processed map (`segments [H, W]` index into segments_info, -1 void) -> (COCO panoptic id map
    `[H, W]` int64 with id = index + 1 and 0 = VOID, segments_info of the segments present). Segments of a
    category outside `known` become VOID; segments without pixels are left out (pq_compute refuses a listed id
    absent from the PNG)."""
    seg = panoptic["segments"].cpu().numpy().astype(np.int64)
    info = panoptic["segments_info"]
    keep = np.array([int(s["category_id"]) in known for s in info] + [False], dtype=bool)
    ids = np.where(keep[seg], seg + 1, 0)  # seg == -1 picks the trailing False: VOID
    present = set(np.unique(ids).tolist()) - {0}
    out = [{"id": k + 1, "category_id": int(s["category_id"]), "isthing": bool(s.get("isthing", True)),
            "area": int((ids == k + 1).sum()), **({"score": float(s["score"])} if "score" in s else {})}
           for k, s in enumerate(info) if k + 1 in present]
    return ids, out


def _plain(rle: dict) -> dict:
    """pycocotools RLE -> JSON-ready: counts as str, size as Python ints."""
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


class PanopticEvaluator(Evaluator):
    """Accumulate panoptic + mask predictions of images of a `PanopticIndex`, then score them."""

    metric_names = PANOPTIC_METRICS

    def __init__(self, pan) -> None:
        """`pan`: `updetr.data.panoptic.PanopticIndex` of the evaluation split."""
        self.pan = pan
        self.stat = PQStat(pan.categories)
        self.img_ids: list[int] = []
        self.panoptic: list[dict] = []     # COCO panoptic predictions: {image_id, file_name, segments_info, png}
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
        ids_map, segs = self.pan.read_segments(image_id)
        pred_ids, pred_info = predicted_segments(panoptic, set(self.pan.categories))
        if pred_ids.shape != ids_map.shape:
            raise EvalError(f"image {image_id}: predicted map {pred_ids.shape} vs ground truth {ids_map.shape}")
        self.stat += pq_image(ids_map, segs, pred_ids, pred_info, self.pan.categories)
        self.img_ids.append(image_id)
        png = io.BytesIO()
        Image.fromarray(id2rgb(pred_ids)).save(png, format="PNG")
        self.panoptic.append({"image_id": image_id, "file_name": f"{image_id:012d}.png",
                              "segments_info": pred_info, "png": png.getvalue()})
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
        return list(self.img_ids), {"results": list(self.results), "gt_anns": list(self.gt_anns),
                                    "pq": self.stat.state(), "panoptic": list(self.panoptic)}

    def merge(self, parts: Iterable[tuple[list[int], dict]]) -> None:
        """Replace the accumulated state by the union of `parts` (every rank's `state()`, this one included)."""
        self.stat = PQStat(self.pan.categories)
        self.img_ids, self.results, self.gt_anns, self.panoptic = [], [], [], []
        for ids, p in list(parts):
            self.img_ids.extend(ids)
            self.results.extend(p["results"])
            self.gt_anns.extend(p["gt_anns"])
            self.panoptic.extend(p["panoptic"])
            self.stat += PQStat.from_state(p["pq"])

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
        out = pq_summary(self.stat, self.pan.things, self.pan.stuffs)
        out.update(self.segm_ap() if self.pan.things else {k: -1.0 for k in SEGM_METRICS})
        return out

    def write_results(self, path: str | os.PathLike) -> Path:
        """The per-query masks as a COCO segm results JSON at `path` (atomic), and the segment maps in COCO
        panoptic format beside it: `<stem>_panoptic/` (one PNG per image) and `<stem>_panoptic.json`."""
        path = Path(path)
        folder = path.with_name(f"{path.stem}_panoptic")
        folder.mkdir(parents=True, exist_ok=True)
        for p in self.panoptic:
            (folder / p["file_name"]).write_bytes(p["png"])
        write_json_atomic(path.with_name(f"{path.stem}_panoptic.json"), {
            "images": [self.pan.images[i] for i in sorted(set(self.img_ids))],
            "annotations": [{k: v for k, v in p.items() if k != "png"} for p in self.panoptic],
            "categories": [dict(c) for _, c in sorted(self.pan.categories.items())]})
        return write_json_atomic(path, self.results)
