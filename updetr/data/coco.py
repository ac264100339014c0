"""COCO detection annotations: DETR's folder layout, pycocotools loading, annotations -> training targets."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from pycocotools.coco import COCO

from updetr.data import skips
from updetr.data.skips import SkipCounter


def coco_split_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image dir, annotation json) of split 'train' | 'val' under a COCO root.

    DETR layout first (`train2017/`, `annotations/instances_train2017.json`), then the plain one written
    by `synthetic.write_coco_dataset` (`train/`, `annotations/instances_train.json`)."""
    root = Path(root)
    for img, ann in ((root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
                     (root / split, root / "annotations" / f"instances_{split}.json")):
        if ann.is_file():
            return img, ann
    raise FileNotFoundError(f"{root}: no annotations/instances_{split}2017.json or instances_{split}.json")


def coco_from_dict(dataset: dict) -> COCO:
    """pycocotools COCO object from an in-memory dict (its index-building chatter silenced)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(ann_file: str | os.PathLike) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def num_classes_of(coco: COCO) -> int:
    """DETR's rule: max category id + 1 (ids need not be contiguous; 91 for COCO, 21 for VOC)."""
    return max(coco.getCatIds()) + 1


def coco_target(anns: Sequence[dict], image_id: int, w: int, h: int,
                counter: Optional[SkipCounter] = None) -> dict:
    """DETR's ConvertCocoPolysToMask for boxes: crowd objects dropped, xywh -> xyxy, boxes clipped to the
    image (counted `box_clipped`), empty ones dropped (counted `box_degenerate`).

    Returns boxes float `[K, 4]` xyxy absolute, labels int64 `[K]`, area float `[K]`, iscrowd int64 `[K]`,
    image_id, orig_size and size int64 `[2]` (h, w).
    """
    boxes, labels, areas = [], [], []
    for a in anns:
        if a.get("iscrowd", 0):
            continue
        bbox = a.get("bbox")
        if bbox is None or len(bbox) != 4:
            if counter is not None:
                counter.add(skips.BOX_DEGENERATE)
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        x0, y0, x1, y1 = x, y, x + bw, y + bh
        c = (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))
        if not (c[2] > c[0] and c[3] > c[1]):
            if counter is not None:
                counter.add(skips.BOX_DEGENERATE)
            continue
        if c != (x0, y0, x1, y1) and counter is not None:
            counter.add(skips.BOX_CLIPPED)
        boxes.append(c)
        labels.append(int(a["category_id"]))
        areas.append(float(a.get("area", (c[2] - c[0]) * (c[3] - c[1]))))
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "area": torch.tensor(areas, dtype=torch.float32),
        "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        "image_id": torch.tensor(int(image_id), dtype=torch.int64),
        "orig_size": torch.tensor([h, w], dtype=torch.int64),
        "size": torch.tensor([h, w], dtype=torch.int64),
    }
