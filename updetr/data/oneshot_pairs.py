"""One-shot detection episodes on VOC: (target image, class, query instance from ANOTHER image), seeded.

An episode asks the model for every instance of one class in the target image, given one query patch: an
instance of that class cropped from a different image (the support pool). Everything here is index work
(pycocotools `COCO` of `updetr.data.voc.voc_to_coco`, no pixels), so each rank builds the same lists.

Rules (paper §4.3 / CoAE):
  * a class is *present* in an image when it has a non-difficult instance there (difficult ones are ignore
    regions, as everywhere in updetr's VOC scoring);
  * query instances are non-difficult, both sides >= `min_px` (smaller ones are left out of the pool and
    counted `query_too_small`), and never from the target image;
  * training: one episode per usable image per epoch over the SEEN classes only; images that show an unseen
    object are dropped (unless allowed), from the targets and the support pool alike;
  * evaluation: one episode per (test image, present class), seen and unseen; a class with no instance in
    another image gives no episode (counted `no_support`).
Draws: the training class per (seed, epoch, image), the query per (seed, epoch, image, class); evaluation
queries per (seed, image, class) only, so the same checkpoint always meets the same episodes.
"""
from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO

from updetr.data.seeding import numpy_rng
from updetr.data.voc import VOC_CLASSES

QUERY_TOO_SMALL = "query_too_small"  # instance below the minimum patch side: not used as a query patch
NO_SUPPORT = "no_support"            # (image, class) with no query instance in any other image: no episode
UNSEEN_IMAGE = "unseen_image"        # training image showing an unseen class: dropped (default)

_CLASS_TAG, _QUERY_TAG = 0x0E5C, 0x0E5A


class NoSupportError(ValueError):
    """A class without any instance in the support pool outside the target image."""


def voc_class_ids(names: Iterable[str]) -> list[int]:
    """VOC class names -> category ids (1..20, `VOC_CLASSES` order), in the order given."""
    out = []
    for n in names:
        if n not in VOC_CLASSES:
            raise ValueError(f"'{n}' is not a VOC class ({', '.join(VOC_CLASSES)})")
        out.append(VOC_CLASSES.index(n) + 1)
    return out


def split_classes(unseen: Sequence[str]) -> tuple[list[int], list[int]]:
    """(seen ids, unseen ids): unseen = the given VOC names, seen = every other VOC class."""
    u = set(voc_class_ids(unseen))
    return [i for i in range(1, len(VOC_CLASSES) + 1) if i not in u], sorted(u)


@dataclass(frozen=True)
class Instance:
    """One annotated object usable as a query: its image, class and box `(x0, y0, x1, y1)` in file pixels."""

    image_id: int
    category_id: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Episode:
    """Find every `category_id` instance in `target_image` given the `query` instance's patch."""

    target_image: int
    category_id: int
    query: Instance


def present_classes(coco: COCO, image_id: int) -> set[int]:
    """Classes with a non-difficult (non-crowd) instance in the image."""
    return {int(a["category_id"]) for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)}


def all_classes(coco: COCO, image_id: int) -> set[int]:
    """Every class annotated in the image, difficult instances included."""
    return {int(a["category_id"]) for a in coco.imgToAnns.get(image_id, [])}


class SupportPool:
    """Query instances by class, sorted by (image id, annotation id) so every process draws the same ones."""

    def __init__(self, coco: COCO, classes: Iterable[int], min_px: int,
                 image_ids: Optional[Iterable[int]] = None) -> None:
        wanted = set(classes)
        images = sorted(coco.imgs) if image_ids is None else sorted(set(image_ids))
        self.counts: Counter = Counter()
        by_class: dict[int, list[tuple[int, int, Instance]]] = {c: [] for c in sorted(wanted)}
        for image_id in images:
            for a in coco.imgToAnns.get(image_id, []):
                c = int(a["category_id"])
                if c not in wanted or a.get("iscrowd", 0):
                    continue
                x, y, w, h = (float(v) for v in a["bbox"])
                if w < min_px or h < min_px:
                    self.counts[QUERY_TOO_SMALL] += 1
                    continue
                by_class[c].append((image_id, int(a["id"]), Instance(image_id, c, (x, y, x + w, y + h))))
        self.by_class = {c: [t[2] for t in sorted(v, key=lambda t: t[:2])] for c, v in by_class.items()}
        self._images = {c: [i.image_id for i in v] for c, v in self.by_class.items()}

    def _excluded(self, category_id: int, image_id: int) -> tuple[int, int]:
        ids = self._images.get(category_id, [])
        return bisect.bisect_left(ids, image_id), bisect.bisect_right(ids, image_id)

    def available(self, category_id: int, exclude_image: int) -> int:
        """Instances of the class outside `exclude_image`."""
        lo, hi = self._excluded(category_id, exclude_image)
        return len(self._images.get(category_id, [])) - (hi - lo)

    def draw(self, category_id: int, exclude_image: int, rng: np.random.Generator) -> Instance:
        """A uniformly drawn instance of the class from any image but `exclude_image`."""
        pool = self.by_class.get(category_id, [])
        lo, hi = self._excluded(category_id, exclude_image)
        n = len(pool) - (hi - lo)
        if n <= 0:
            name = VOC_CLASSES[category_id - 1] if 1 <= category_id <= len(VOC_CLASSES) else category_id
            raise NoSupportError(f"class '{name}': no instance in the support pool outside image {exclude_image} "
                                 f"({len(pool)} in all; instances need both sides >= the minimum patch size)")
        k = int(rng.integers(n))
        return pool[k + (hi - lo) if k >= lo else k]


def training_images(coco: COCO, seen: Sequence[int], unseen: Sequence[int], allow_unseen: bool,
                    counts: Optional[Counter] = None) -> list[int]:
    """Images training may use: those showing a seen class, minus (by default) those showing an unseen one."""
    u = set(unseen)
    out = []
    for image_id in sorted(coco.imgs):
        if not allow_unseen and all_classes(coco, image_id) & u:
            if counts is not None:
                counts[UNSEEN_IMAGE] += 1
            continue
        if present_classes(coco, image_id) & set(seen):
            out.append(image_id)
    return out


class TrainEpisodes:
    """Training episodes of any epoch: one per usable image (a seen class with support elsewhere)."""

    def __init__(self, coco: COCO, seen: Sequence[int], unseen: Sequence[int], min_px: int, seed: int,
                 allow_unseen: bool = True, class_sampling: str = "inverse_frequency") -> None:
        """`allow_unseen`: keep images that also show an unseen class (CoAE). `class_sampling`: the episode's
        class among the image's seen classes, `inverse_frequency` (weight 1 / number of training images whose
        episodes may ask for the class, CoAE) or `uniform`."""
        if class_sampling not in ("inverse_frequency", "uniform"):
            raise ValueError(f"class_sampling '{class_sampling}' is not inverse_frequency | uniform")
        self.seed, self.class_sampling = seed, class_sampling
        self.counts: Counter = Counter()
        images = training_images(coco, seen, unseen, allow_unseen, self.counts)
        self.pool = SupportPool(coco, seen, min_px, images)
        self.counts.update(self.pool.counts)
        self.choices: list[tuple[int, list[int]]] = []  # (image, classes it can be asked for)
        for image_id in images:
            classes = sorted(c for c in present_classes(coco, image_id) & set(seen)
                             if self.pool.available(c, image_id) > 0)
            if classes:
                self.choices.append((image_id, classes))
            else:
                self.counts[NO_SUPPORT] += 1
        self.frequency: Counter = Counter(c for _, classes in self.choices for c in classes)

    def __len__(self) -> int:
        return len(self.choices)

    def episode(self, i: int, epoch: int) -> Episode:
        image_id, classes = self.choices[i]
        rng = numpy_rng((self.seed, epoch, _CLASS_TAG, image_id))
        if self.class_sampling == "uniform" or len(classes) == 1:
            c = classes[int(rng.integers(len(classes)))]
        else:  # rare classes are asked for more often, so every class gets about as many episodes
            w = np.array([1.0 / self.frequency[k] for k in classes])
            c = classes[int(rng.choice(len(classes), p=w / w.sum()))]
        q = self.pool.draw(c, image_id, numpy_rng((self.seed, epoch, _QUERY_TAG, image_id, c)))
        return Episode(image_id, c, q)


def eval_episodes(coco: COCO, classes: Sequence[int], min_px: int, seed: int) -> tuple[list[Episode], Counter]:
    """Every (image, present class) of the evaluation split, each with its seeded query from another image."""
    pool = SupportPool(coco, classes, min_px)
    counts: Counter = Counter(pool.counts)
    out = []
    for image_id in sorted(coco.imgs):
        for c in sorted(present_classes(coco, image_id) & set(classes)):
            if pool.available(c, image_id) <= 0:
                counts[NO_SUPPORT] += 1
                continue
            out.append(Episode(image_id, c, pool.draw(c, image_id, numpy_rng((seed, _QUERY_TAG, image_id, c)))))
    return out, counts
