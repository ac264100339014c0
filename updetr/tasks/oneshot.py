"""`oneshot`: one-shot detection on VOC (paper §4.3, Table 3), seen classes trained, seen + unseen scored.

Training: VOC trainval (07+12, those present) episodes over the seen classes (`updetr.data.oneshot_pairs`);
evaluation: VOC2007 test episodes of every class, AP50 per class (`updetr.eval.oneshot_eval`), batch 1 per
episode so no image is padded. Weights: a pre-training checkpoint loads whole (patch2query, feature_align and
the match head kept, unlike `detect`); no init.checkpoint = the DETR-from-scratch baseline of Table 3.
"""
from __future__ import annotations

import logging
from functools import partial
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from updetr.eval.oneshot_eval import OneShotEvaluator
from updetr.tasks.base import Task
from updetr.tasks.detect import DatasetError

log = logging.getLogger("updetr.tasks")


def synthetic_voc_root(cfg) -> Path:
    d = cfg.data
    if d.path:
        return Path(d.path).expanduser().resolve()
    return (Path(cfg.runtime.output_dir) / "data"
            / (f"synthetic_voc-{cfg.seed}-{d.synthetic_images}-{d.synthetic_val_images}"
               f"-{d.synthetic_size[0]}x{d.synthetic_size[1]}")).resolve()


def ensure_synthetic_voc(cfg) -> Path:
    """Write the seeded shapes dataset in a VOC2007 layout (trainval + test) once; atomic."""
    from updetr.data.synthetic import write_voc_dataset

    root = synthetic_voc_root(cfg)
    if (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    lo, hi = cfg.data.synthetic_size
    write_voc_dataset(tmp, "2007", n_trainval=cfg.data.synthetic_images, n_test=cfg.data.synthetic_val_images,
                      seed=cfg.seed, size_range=(lo, hi))
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root


class OneShotTask(Task):
    name = "oneshot"
    sources = ("voc", "synthetic_voc")
    default_num_classes = 2   # label 1 = instance of the query's class
    has_eval = True
    eval_metrics = ("coco", "voc07", "voc12")
    evaluator_class = OneShotEvaluator

    @classmethod
    def config_defaults(cls, tree: dict) -> dict:
        # One-shot keeps feature_align's weights but has no feature loss: its weight defaults to 0 here.
        loss = tree.get("loss") if isinstance(tree.get("loss"), dict) else {}
        if "feature" not in loss and not isinstance(tree.get("loss"), (str, int, float, list)):
            tree = {**tree, "loss": {**loss, "feature": 0.0}}
        return tree

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.source not in cls.sources:
            raise ValueError(f"data.source '{cfg.data.source}': one-shot detection reads voc | synthetic_voc")
        if cfg.model.num_classes not in (None, 2):
            raise ValueError(f"model.num_classes ({cfg.model.num_classes}) must be 2 (or unset) for oneshot: "
                             "label 1 = instance of the query's class, as pre-training's label 1 = patch")
        if cfg.loss.feature != 0:
            raise ValueError(f"loss.feature ({cfg.loss.feature}) must be 0 for oneshot: feature reconstruction "
                             "is a pre-training loss (feature_align is kept in the model, not trained)")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._cache: dict = {}

    # -- data
    def prepare(self):
        cfg = super().prepare()
        if cfg.data.source == "synthetic_voc":
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(ensure_synthetic_voc(cfg))})})
        elif cfg.data.path and "://" not in cfg.data.path:
            # Ray Train workers chdir into Ray's session folder: hand them absolute paths.
            upd = {"path": str(Path(cfg.data.path).expanduser().resolve())}
            if cfg.data.val_path:
                upd["val_path"] = str(Path(cfg.data.val_path).expanduser().resolve())
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=upd)})
        self.cfg = cfg
        self._cache = {}
        self.train_episodes()  # fail here, in one line, before any worker starts
        if self.subset is not None:      # on the driver only: a Ray worker's working dir is elsewhere
            from updetr.data.subset import write_subset

            write_subset(cfg, *self.subset)
        return cfg

    subset = None                        # (kept ids, images in the whole split) when the split is cut

    def _root(self, split: str) -> str:
        d = self.cfg.data
        if d.source == "synthetic_voc" and not d.path:
            return str(ensure_synthetic_voc(self.cfg))
        return str(d.path if split == "train" or not d.val_path else d.val_path)

    def coco(self, split: str):
        """(VOCdevkit root, pycocotools COCO) of 'train' (trainval 07+12) or 'val' (test 2007)."""
        key = ("coco", split)
        if key not in self._cache:
            from updetr.data.coco import coco_from_dict
            from updetr.data.skips import SkipCounter
            from updetr.data.voc import TEST_SETS, TRAIN_SETS, available_sets, voc_to_coco

            root = self._root(split)
            sets = available_sets(root, TRAIN_SETS if split == "train" else TEST_SETS)
            if not sets:
                raise DatasetError(f"data ({split} split): {root}: no VOC{'2007/2012 trainval' if split == 'train' else '2007 test'} "
                                   "ImageSets/Main lists found")
            counter = SkipCounter()
            try:
                coco = coco_from_dict(voc_to_coco(root, sets, counter))
            except (OSError, ValueError, AttributeError) as e:  # unreadable list / XML
                raise DatasetError(f"data ({split} split) under {root}: bad VOC annotation: {type(e).__name__}: {e}") from None
            if counter:
                counter.log_summary(f"VOC {split} annotations")
            if not coco.imgs:
                raise DatasetError(f"data ({split} split) under {root}: no images listed")
            if split == "train":
                coco = self._subset(coco)
            self._cache[key] = (root, coco)
        return self._cache[key]

    def _subset(self, coco):
        """The TRAIN split's index cut to data.fraction / data.subset_size (seeded; ids written to the run
        folder by prepare()); episodes are then drawn from the kept images only (queries included)."""
        from updetr.data.coco import coco_from_dict
        from updetr.data.subset import choose_subset, subset_active, subset_seed

        if not subset_active(self.cfg):
            return coco
        keep = set(choose_subset(coco.imgs, self.cfg.data.fraction, self.cfg.data.subset_size,
                                 subset_seed(self.cfg)))
        self.subset = (sorted(keep), len(coco.imgs))
        return coco_from_dict({**coco.dataset, "images": [i for i in coco.dataset["images"] if i["id"] in keep],
                               "annotations": [a for a in coco.dataset["annotations"] if a["image_id"] in keep]})

    def classes(self):
        from updetr.data.oneshot_pairs import split_classes

        return split_classes(self.cfg.oneshot.unseen_classes)

    def train_episodes(self):
        if "train_episodes" not in self._cache:
            from updetr.data.oneshot_pairs import TrainEpisodes
            from updetr.data.voc import VOC_CLASSES

            seen, unseen = self.classes()
            _, coco = self.coco("train")
            eps = TrainEpisodes(coco, seen, unseen, self.cfg.pretext.min_patch_px, self.cfg.seed,
                                self.cfg.oneshot.train_images_with_unseen, self.cfg.oneshot.class_sampling)
            if len(eps) == 0:
                have = sorted({VOC_CLASSES[c - 1] for c in seen if eps.pool.by_class.get(c)})
                raise DatasetError(f"data (train split) under {self._root('train')}: no one-shot training episode: "
                                   f"no image shows a seen class with a query instance in another image (seen "
                                   f"classes with query instances: {have or 'none'}; {dict(eps.counts)})")
            missing = [VOC_CLASSES[c - 1] for c in seen if not eps.pool.by_class.get(c)]
            log.info("oneshot: %d training episodes per epoch; %s", len(eps), dict(eps.counts) or "nothing skipped")
            if missing:
                log.warning("oneshot: seen class(es) with no instance in the training support pool, never trained: %s",
                            ", ".join(missing))
            self._cache["train_episodes"] = eps
        return self._cache["train_episodes"]

    def eval_episodes(self):
        if "eval_episodes" not in self._cache:
            from updetr.data.oneshot_pairs import eval_episodes

            seen, unseen = self.classes()
            _, coco = self.coco("val")
            self._cache["eval_episodes"] = eval_episodes(coco, seen + unseen, self.cfg.pretext.min_patch_px,
                                                         self.cfg.seed)
        return self._cache["eval_episodes"]

    def _dataset(self, split: str):
        from updetr.data.oneshot import OneShotDataset

        root, coco = self.coco(split)
        return OneShotDataset(root, coco, split == "train", self.cfg.seed, self.cfg.pretext.patch_size,
                              params=self.cfg.detection, query_flip=self.cfg.oneshot.query_flip)

    def train_batches(self, epoch: int, skip: int = 0, rank: int = 0, world_size: int = 1,
                      shard: Any = None) -> Iterator[dict]:
        from updetr.data.oneshot import oneshot_batches

        eps = self.train_episodes()
        return oneshot_batches(self.cfg, self._dataset("train"), len(eps), partial(eps.episode, epoch=epoch),
                               epoch, skip, rank, world_size)

    def batches_per_epoch(self, world_size: int = 1, ray: bool = False) -> Optional[int]:
        n = len(self.train_episodes()) // world_size
        b = self.cfg.data.batch_size
        per = n // b if self.cfg.data.drop_last else -(-n // b)
        s = self.cfg.schedule.steps_per_epoch
        return min(per, s) if s else per

    def eval_batches(self, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        from updetr.data.oneshot import oneshot_batches

        episodes, _ = self.eval_episodes()
        return oneshot_batches(self.cfg, self._dataset("val"), len(episodes), episodes.__getitem__, 0, 0, rank,
                               world_size, batch_size=1)

    def evaluator(self):
        from updetr.data.voc import VOC_CLASSES

        seen, unseen = self.classes()
        episodes, counts = self.eval_episodes()
        _, coco = self.coco("val")
        return OneShotEvaluator(coco, episodes, {i + 1: n for i, n in enumerate(VOC_CLASSES)}, seen, unseen, counts,
                                metric=self.cfg.eval.metric)

    # -- model
    def build(self):
        from updetr.models.oneshot import build_oneshot

        return build_oneshot(self.cfg)
