"""COCO panoptic data: PNG segment maps (RGB id encoding) + panoptic JSON -> training targets with masks,
the detection index of its segments (things + stuff boxes, the box stage of DETR's panoptic recipe) and the
ground truth the panoptic evaluator scores against.

Layout under a root (DETR's first, then the plain one `synthetic_panoptic.write_panoptic_dataset` writes):
`{split}2017/*.jpg`, `annotations/panoptic_{split}2017.json`, `annotations/panoptic_{split}2017/*.png`, or
the same without `2017`. A segment id in the PNG is `R + 256 G + 256^2 B`; 0 is void.

Item targets (panoptic task): labels int64 `[K]` (category ids), boxes, masks bool `[K, H, W]`, area,
iscrowd, image_id, orig_size, size; crowd segments are left out of training targets (as the detect task
drops crowd boxes) and are void in the evaluation ground truth.
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from updetr.data import skips
from updetr.data.coco import coco_from_dict
from updetr.data.detection_transforms import make_detection_transforms, normalize
from updetr.data.image_io import BadImage, read_rgb
from updetr.data.seeding import numpy_rng
from updetr.data.skips import SkipCounter

log = logging.getLogger("updetr.data")

PANOPTIC_MISMATCH = "panoptic_mismatch"  # segment ids of the PNG differ from its JSON segments_info: dropped


class BadPanoptic(ValueError):
    """A panoptic annotation that cannot be used; `reason` is a skip reason, the message names the file."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """uint8 `[H, W, 3]` -> int64 `[H, W]` segment ids (COCO panoptic encoding R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """int `[H, W]` segment ids -> uint8 `[H, W, 3]`."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def panoptic_split_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path, Path]:
    """(image dir, panoptic json, PNG dir) of split 'train' | 'val' under a COCO panoptic root."""
    root = Path(root)
    for suffix in ("2017", ""):
        ann = root / "annotations" / f"panoptic_{split}{suffix}.json"
        if ann.is_file():
            return root / f"{split}{suffix}", ann, root / "annotations" / f"panoptic_{split}{suffix}"
    raise FileNotFoundError(f"{root}: no annotations/panoptic_{split}2017.json or panoptic_{split}.json")


def load_panoptic_json(path: str | os.PathLike) -> dict:
    """Read and check a COCO panoptic JSON (images, annotations with file_name + segments_info, categories
    with isthing). ValueError names the file and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read panoptic JSON: {e}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: field '{key}' missing or not a list")
    for c in data["categories"]:
        if "id" not in c or "isthing" not in c:
            raise ValueError(f"{path}: categories: entry {c} lacks 'id' or 'isthing'")
    for a in data["annotations"]:
        if "image_id" not in a or "file_name" not in a or not isinstance(a.get("segments_info"), list):
            raise ValueError(f"{path}: annotations: entry for image {a.get('image_id')} lacks image_id, "
                             "file_name or segments_info")
    return data


class PanopticIndex:
    """A panoptic JSON indexed by image id: images, annotations, categories, things / stuff ids."""

    def __init__(self, data: dict, png_dir: str | os.PathLike) -> None:
        self.data = data
        self.png_dir = Path(png_dir)
        self.images = {int(i["id"]): i for i in data["images"]}
        self.anns = {int(a["image_id"]): a for a in data["annotations"]}
        self.categories = {int(c["id"]): c for c in data["categories"]}
        self.is_thing = {cid: bool(c["isthing"]) for cid, c in self.categories.items()}
        self.things = sorted(c for c, t in self.is_thing.items() if t)
        self.stuffs = sorted(c for c, t in self.is_thing.items() if not t)

    def read_segments(self, image_id: int) -> tuple[np.ndarray, list[dict]]:
        """(segment id map int64 `[H, W]`, segments_info) of an image; BadPanoptic (skip reason + the file)
        when the PNG is missing / unreadable or its ids do not match the JSON's segments."""
        ann = self.anns.get(image_id)
        if ann is None:
            raise BadPanoptic(PANOPTIC_MISMATCH, f"image {image_id}: no panoptic annotation in the JSON")
        png = self.png_dir / ann["file_name"]
        try:
            with Image.open(io.BytesIO(png.read_bytes())) as im:
                ids = rgb2id(np.asarray(im.convert("RGB")))
        except FileNotFoundError:
            raise BadPanoptic(skips.MISSING_FILE, f"{png}: segment PNG not found") from None
        except OSError as e:
            raise BadPanoptic(skips.UNREADABLE, f"{png}: cannot read the segment PNG: {e}") from None
        segs = ann["segments_info"]
        in_json = {int(s["id"]) for s in segs}
        in_png = set(np.unique(ids).tolist()) - {0}
        if in_png != in_json:
            extra, missing = sorted(in_png - in_json), sorted(in_json - in_png)
            what = []
            if extra:
                what.append(f"ids {extra[:5]} in the PNG are not in segments_info")
            if missing:
                what.append(f"segments_info ids {missing[:5]} are absent from the PNG")
            raise BadPanoptic(PANOPTIC_MISMATCH, f"{png}: segment ids do not match the JSON: {'; '.join(what)}")
        return ids, segs

    def ground_truth(self, image_id: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """(`[H, W, 2]` int64 (category id, instance id) for PQ, the segment id map, segments_info); void and
        crowd pixels get category -1 (not a category, so PQ ignores them)."""
        ids, segs = self.read_segments(image_id)
        out = np.full(ids.shape + (2,), -1, dtype=np.int64)
        out[..., 1] = 0
        for k, s in enumerate(segs):
            m = ids == int(s["id"])
            if s.get("iscrowd", 0):
                continue
            out[m, 0] = int(s["category_id"])
            out[m, 1] = k + 1
        return out, ids, segs


def detection_index(pan: PanopticIndex) -> COCO:
    """The pycocotools detection index of a panoptic JSON: one box per segment (things and stuff), the
    training set of DETR's box stage for panoptic segmentation (`--dataset_file coco_panoptic`)."""
    anns = []
    for a in pan.data["annotations"]:
        for s in a["segments_info"]:
            if "bbox" not in s:
                continue
            anns.append({"id": len(anns) + 1, "image_id": int(a["image_id"]), "category_id": int(s["category_id"]),
                         "bbox": [float(v) for v in s["bbox"]], "area": float(s.get("area", 0.0)),
                         "iscrowd": int(s.get("iscrowd", 0))})
    cats = [{"id": c["id"], "name": c.get("name", str(c["id"])), "supercategory": c.get("supercategory", "")}
            for c in pan.data["categories"]]
    return coco_from_dict({"images": pan.data["images"], "annotations": anns, "categories": cats})


def open_panoptic(root: str | os.PathLike, split: str) -> tuple[Path, PanopticIndex]:
    """(image dir, PanopticIndex) of a split under a COCO panoptic root."""
    img_dir, ann, png_dir = panoptic_split_paths(root, split)
    return img_dir, PanopticIndex(load_panoptic_json(ann), png_dir)


class PanopticDataset(Dataset):
    """Images of a panoptic split (sorted by id) with mask targets; the interface of `DetectionDataset`
    (`ids`, `train`, `load(i, epoch)`), so `detection_batches` batches it. Eval items carry no masks (the
    evaluator reads the ground truth at the original size)."""

    def __init__(self, img_root: str | os.PathLike, pan: PanopticIndex, train: bool, seed: int = 0,
                 params=None) -> None:
        self.img_root, self.pan, self.train, self.seed = Path(img_root), pan, train, seed
        self.ids = sorted(pan.images.keys())
        self.transforms = make_detection_transforms(train, True, params)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return max(self.pan.categories) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int, epoch: Optional[int] = None) -> dict:
        image_id = self.ids[i]
        counter = SkipCounter()
        info = self.pan.images[image_id]
        path = self.img_root / info["file_name"]
        try:
            img = read_rgb(path, counter)
            target = self._target(image_id, img.size, with_masks=self.train)
        except (BadImage, BadPanoptic) as e:
            if isinstance(e, BadPanoptic):
                log.warning("data: skipped: %s", e)
            counter.add(e.reason)
            return {"image": None, "target": None, "events": counter.total}
        rng = numpy_rng((self.seed, self.epoch if epoch is None else epoch, image_id))
        img, target = self.transforms(img, target, rng)
        image, target = normalize(img, target)
        return {"image": image, "target": target, "events": counter.total}

    def _target(self, image_id: int, size: tuple[int, int], with_masks: bool) -> dict:
        w, h = size
        ids, segs = self.pan.read_segments(image_id)
        if ids.shape != (h, w):
            raise BadPanoptic(PANOPTIC_MISMATCH, f"{self.pan.png_dir / self.pan.anns[image_id]['file_name']}: "
                                                 f"PNG is {ids.shape[1]}x{ids.shape[0]}, the image {w}x{h}")
        segs = [s for s in segs if not s.get("iscrowd", 0)]
        masks = torch.from_numpy(np.stack([ids == int(s["id"]) for s in segs])) if segs else \
            torch.zeros(0, h, w, dtype=torch.bool)
        boxes = torch.zeros(len(segs), 4)
        for k, m in enumerate(masks):  # pixel extent: x1 / y1 exclusive, as coco_target's xywh -> xyxy
            ys, xs = torch.nonzero(m, as_tuple=True)
            boxes[k] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        target = {"boxes": boxes, "labels": torch.tensor([int(s["category_id"]) for s in segs], dtype=torch.int64),
                  "area": masks.flatten(1).sum(1).float(), "iscrowd": torch.zeros(len(segs), dtype=torch.int64),
                  "image_id": torch.tensor(int(image_id), dtype=torch.int64),
                  "orig_size": torch.tensor([h, w], dtype=torch.int64), "size": torch.tensor([h, w], dtype=torch.int64)}
        if with_masks:
            target["masks"] = masks
        return target

    def __getitem__(self, i: int) -> dict:
        return self.load(i)


def build_panoptic_dataset(cfg, split: str) -> PanopticDataset:
    """'train' (augmented, with masks) or 'val' (resized to detection.eval_size) panoptic dataset."""
    root = cfg.data.path if split == "train" or not cfg.data.val_path else cfg.data.val_path
    img_dir, pan = open_panoptic(root, split)
    return PanopticDataset(img_dir, pan, split == "train", cfg.seed, params=cfg.detection)


__all__ = ["BadPanoptic", "PANOPTIC_MISMATCH", "PanopticDataset", "PanopticIndex", "build_panoptic_dataset",
           "detection_index", "id2rgb", "load_panoptic_json", "open_panoptic", "panoptic_split_paths", "rgb2id"]
