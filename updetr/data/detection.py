"""Fine-tuning data: a COCO / VOC torch Dataset with DETR augmentation, and batch dicts for the engine.

Item: (image float `[3, H, W]` normalised, target) with target = labels int64 `[K]`, boxes float `[K, 4]`
cxcywh normalised by the augmented (W, H), image_id, orig_size (h, w) of the file (what PostProcess scales
predictions to for COCOeval), size (h, w) after augmentation, area, iscrowd. Augmentation randomness is
seeded per (cfg.seed, epoch, image id). Bad files / boxes are counted by reason and never fatal.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from updetr.data.coco import coco_from_dict, coco_split_paths, coco_target, load_coco, num_classes_of
from updetr.data.collate import collate_detection
from updetr.data.detection_transforms import make_detection_transforms, normalize
from updetr.data.image_io import BadImage, read_rgb
from updetr.data.local_loader import iter_loader, rank_batches
from updetr.data.seeding import numpy_rng
from updetr.data.skips import SkipCounter
from updetr.data.voc import TEST_SETS, TRAIN_SETS, available_sets, voc_to_coco

log = logging.getLogger("updetr.data")


class DetectionDataset(Dataset):
    """Images listed in a pycocotools `COCO` index (all of them, sorted by id), files under `img_root`.

    `__getitem__` returns dict(image, target, events); image/target are None for a bad item (events says why).
    """

    def __init__(self, img_root: str | os.PathLike, coco: COCO, train: bool, seed: int = 0,
                 multi_scale: bool = True, params=None) -> None:
        self.img_root, self.coco, self.train, self.seed = Path(img_root), coco, train, seed
        self.ids = sorted(coco.imgs.keys())
        self.transforms = make_detection_transforms(train, multi_scale, params)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.coco)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int, epoch: Optional[int] = None) -> dict:
        image_id = self.ids[i]
        counter = SkipCounter()
        info = self.coco.imgs[image_id]
        path = self.img_root / info["file_name"]
        try:
            img = read_rgb(path, counter)
        except BadImage as e:
            counter.add(e.reason)
            return {"image": None, "target": None, "events": counter.total}
        w, h = img.size
        if (info.get("width"), info.get("height")) not in ((w, h), (None, None), (0, 0)):
            log.debug("data: %s: annotation size %sx%s differs from the file's %dx%d", path,
                      info.get("width"), info.get("height"), w, h)
        target = coco_target(self.coco.imgToAnns.get(image_id, []), image_id, w, h, counter)
        rng = numpy_rng((self.seed, self.epoch if epoch is None else epoch, image_id))
        img, target = self.transforms(img, target, rng)
        image, target = normalize(img, target)
        return {"image": image, "target": target, "events": counter.total}

    def __getitem__(self, i: int) -> dict:
        return self.load(i)


def collate_detection_items(items) -> dict:
    """Items of `DetectionDataset` -> batch dict (bad items dropped, their reasons in `skipped`)."""
    counter = SkipCounter()
    good = []
    for it in items:
        counter.update(it["events"])
        if it["image"] is not None:
            good.append((it["image"], it["target"]))
    return collate_detection(good, counter.take())


def build_detection_dataset(cfg, split: str) -> DetectionDataset:
    """'train' or 'val' dataset for data.source coco | voc (train split augmented, val resized to 800)."""
    d = cfg.data
    train = split == "train"
    if d.source in ("coco", "synthetic_coco"):
        root = d.path if train or not d.val_path else d.val_path
        img_dir, ann = coco_split_paths(root, split)
        return DetectionDataset(img_dir, load_coco(ann), train, cfg.seed, params=cfg.detection)
    if d.source == "voc":
        root = d.path if train or not d.val_path else d.val_path
        sets = available_sets(root, TRAIN_SETS if train else TEST_SETS)
        if not sets:
            raise FileNotFoundError(f"{root}: no VOC{'2007/2012 trainval' if train else '2007 test'} "
                                    "ImageSets/Main lists found")
        counter = SkipCounter()
        coco = coco_from_dict(voc_to_coco(root, sets, counter))
        if counter:
            counter.log_summary(f"VOC {split} annotations")
        return DetectionDataset(root, coco, train, cfg.seed, params=cfg.detection)
    if d.source in ("coco_panoptic", "synthetic_panoptic"):  # DETR's box stage of the panoptic recipe
        from updetr.data.panoptic import detection_index, open_panoptic

        # One box per (non-crowd) segment, things and stuff.
        root = d.path if train or not d.val_path else d.val_path
        img_dir, pan = open_panoptic(root, split)
        return DetectionDataset(img_dir, detection_index(pan), train, cfg.seed, params=cfg.detection)
    raise ValueError(f"data.source '{d.source}' is not a detection dataset (coco | voc | coco_panoptic)")


class _DetBatches(Dataset):
    def __init__(self, ds: DetectionDataset, batches, epoch: int) -> None:
        self.ds, self.batches, self.epoch = ds, list(batches), epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict:
        return collate_detection_items([self.ds.load(int(i), self.epoch) for i in self.batches[j]])


def detection_batches(cfg, dataset: DetectionDataset, epoch: int, skip: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[dict]:
    """Batch dicts (images, mask, targets, skipped; no patches) of one epoch for one rank.

    Training datasets are shuffled per epoch (data.shuffle) and drop the n % world_size remainder so ranks
    stay in step; evaluation datasets keep every image (in id order) so COCOeval sees all of them.
    """
    n = len(dataset)
    if dataset.train:
        batches = rank_batches(n, cfg.data.batch_size, cfg.seed, epoch, cfg.data.shuffle, rank, world_size,
                               drop_last=cfg.data.drop_last)  # DETR's train BatchSampler drops it too
        if cfg.schedule.steps_per_epoch is not None:
            batches = batches[: cfg.schedule.steps_per_epoch]
    else:
        mine = np.arange(n)[rank::world_size]
        batches = [mine[i: i + cfg.data.batch_size] for i in range(0, len(mine), cfg.data.batch_size)]
    batches = batches[max(0, int(skip)):]
    if not batches:
        return
    yield from iter_loader(_DetBatches(dataset, batches, epoch), cfg, epoch, rank)
