"""One-shot detection batches: target images with DETR's augmentation, one query patch each.

Item of episode e (`updetr.data.oneshot_pairs.Episode`): the target image (float `[3, H, W]` normalised,
DETR's train augmentation or eval resize, seeded per (seed, epoch, image, class)), the target = every
non-difficult instance of the episode's class, label 1 ("matches the query"), boxes cxcywh normalised, and
`image_id` = the episode's number (the evaluator maps it back to (image, class)); the query patch = the
query instance's box cut from its own image at file resolution and resized to `pretext.patch_size`
squared (the official visualisation notebook's `Resize((128, 128))`), float `[3, P, P]` normalised.
Batch dict: CONTRACTS.md's detection batch plus `patches [B, 1, 3, P, P]`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from updetr.data import skips
from updetr.data.coco import coco_target
from updetr.data.collate import collate_detection
from updetr.data.detection_transforms import make_detection_transforms, normalize
from updetr.data.image_io import BadImage, read_rgb
from updetr.data.local_loader import iter_loader, rank_batches
from updetr.data.oneshot_pairs import Episode
from updetr.data.pretext import resize_u8
from updetr.data.seeding import numpy_rng
from updetr.data.skips import SkipCounter
from updetr.data.tensors import normalize_patches

_AUG_TAG = 0x0E5B
_FLIP_TAG = 0x0E5D


def query_patch(img, box: Sequence[float], patch_size: int) -> torch.Tensor:
    """The box `(x0, y0, x1, y1)` (file pixels, fractional allowed) of a PIL RGB image, widened to whole
    pixels and resized to `[3, P, P]` (normalised)."""
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x1, y1 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    if x1 <= x0 or y1 <= y0:
        raise BadImage(skips.BOX_DEGENERATE, f"query box {tuple(box)} outside the {w}x{h} image")
    return normalize_patches(resize_u8(arr[y0:y1, x0:x1], patch_size, patch_size)[None])[0]


class OneShotDataset:
    """Pixels of episodes over one split: images listed in `coco`, files under `img_root`."""

    def __init__(self, img_root: str | os.PathLike, coco: COCO, train: bool, seed: int, patch_size: int,
                 params=None, query_flip: float = 0.0) -> None:
        """`query_flip`: probability of a horizontal flip of a training query patch (CoAE: 0.5)."""
        self.img_root, self.coco, self.train, self.seed = Path(img_root), coco, train, seed
        self.query_flip = query_flip
        self.patch_size = patch_size
        self.transforms = make_detection_transforms(train, True, params)

    def _read(self, image_id: int, counter: SkipCounter):
        path = self.img_root / self.coco.imgs[image_id]["file_name"]
        return read_rgb(path, counter)

    def load(self, number: int, ep: Episode, epoch: int = 0) -> dict:
        """dict(image, target, patch, events); image/target/patch None for a bad item (events say why)."""
        counter = SkipCounter()
        try:
            img = self._read(ep.target_image, counter)
            support = img if ep.query.image_id == ep.target_image else self._read(ep.query.image_id, counter)
            patch = query_patch(support, ep.query.box, self.patch_size)
            if self.train and self.query_flip > 0 and \
                    numpy_rng((self.seed, epoch, _FLIP_TAG, ep.target_image, ep.category_id)).random() < self.query_flip:
                patch = patch.flip(-1)  # [3, P, P]: mirror the width
        except BadImage as e:
            counter.add(e.reason)
            return {"image": None, "target": None, "patch": None, "events": counter.total}
        w, h = img.size
        anns = [a for a in self.coco.imgToAnns.get(ep.target_image, []) if int(a["category_id"]) == ep.category_id]
        target = coco_target(anns, number, w, h, counter)
        target["labels"] = torch.ones_like(target["labels"])  # 1 = an instance of the query's class
        rng = numpy_rng((self.seed, epoch if self.train else 0, _AUG_TAG, ep.target_image, ep.category_id))
        img, target = self.transforms(img, target, rng)
        image, target = normalize(img, target)
        return {"image": image, "target": target, "patch": patch, "events": counter.total}


def collate_oneshot(items: Sequence[dict]) -> dict:
    """Loaded items -> detection batch dict + `patches [B, 1, 3, P, P]` (bad items dropped and counted)."""
    counter = SkipCounter()
    good = []
    for it in items:
        counter.update(it["events"])
        if it["image"] is not None:
            good.append(it)
    batch = collate_detection([(it["image"], it["target"]) for it in good], counter.take())
    batch["patches"] = (torch.stack([it["patch"] for it in good])[:, None] if good
                        else torch.zeros(0, 1, 3, 0, 0))
    return batch


class _Batches(Dataset):
    def __init__(self, ds: OneShotDataset, episode: Callable[[int], Episode], batches, epoch: int) -> None:
        self.ds, self.episode, self.batches, self.epoch = ds, episode, list(batches), epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict:
        return collate_oneshot([self.ds.load(int(i), self.episode(int(i)), self.epoch) for i in self.batches[j]])


def oneshot_batches(cfg, ds: OneShotDataset, n: int, episode: Callable[[int], Episode], epoch: int,
                    skip: int = 0, rank: int = 0, world_size: int = 1,
                    batch_size: Optional[int] = None) -> Iterator[dict]:
    """Batch dicts of one epoch for one rank over episodes 0..n-1 (`episode(i)` gives episode i).

    Training: seeded shuffle, the n % world_size remainder dropped (ranks stay in step), data.drop_last and
    schedule.steps_per_epoch as detection. Evaluation: every episode in order, rank r takes every
    world_size-th, `batch_size` (1: no padding, so scores cannot depend on batch neighbours)."""
    bs = batch_size or cfg.data.batch_size
    if ds.train:
        batches = rank_batches(n, bs, cfg.seed, epoch, cfg.data.shuffle, rank, world_size,
                               drop_last=cfg.data.drop_last)
        if cfg.schedule.steps_per_epoch is not None:
            batches = batches[: cfg.schedule.steps_per_epoch]
    else:
        mine = np.arange(n)[rank::world_size]
        batches = [mine[i: i + bs] for i in range(0, len(mine), bs)]
    batches = batches[max(0, int(skip)):]
    if not batches:
        return
    yield from iter_loader(_Batches(ds, episode, batches, epoch), cfg, epoch, rank)
