"""`detect`: DETR object detection on COCO / VOC (or the built-in synthetic shapes set), scored COCO-style.

Training batches use DETR's augmentation; each rank reads only its own slice of the image list (the
annotation index is small; images are read lazily, never gathered in one process). Evaluation uses DETR's
evaluation resize and ONE image per batch, so no image is ever padded: a checkpoint's AP cannot depend on
the batch size or on how many workers share the split (DETR's AP moves with the padding of larger batches).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from updetr.checkpoint import PRETRAIN_ONLY_PREFIXES
from updetr.eval.coco_eval import CocoEvaluator
from updetr.tasks.base import InitReport, Task, load_weights

CLASS_HEAD = ("class_embed.",)


class DatasetError(ValueError):
    """A detection dataset that cannot be used; the message names the file and the reason."""


SYNTHETIC_SOURCES = ("synthetic_coco", "synthetic_panoptic")


def synthetic_coco_root(cfg) -> Path:
    """Where data.source synthetic_coco / synthetic_panoptic is written: data.path, or a folder under
    <runtime.output_dir>/data named by the source, seed, image counts and sizes."""
    d = cfg.data
    if d.path:
        return Path(d.path).expanduser().resolve()
    return (Path(cfg.runtime.output_dir) / "data"
            / (f"{d.source}-{cfg.seed}-{d.synthetic_images}-{d.synthetic_val_images}"
               f"-{d.synthetic_size[0]}x{d.synthetic_size[1]}")).resolve()


def ensure_synthetic_coco(cfg) -> Path:
    """Write the seeded synthetic dataset of data.source (train + val splits: real JPEGs + COCO detection
    json, or + panoptic PNGs and json) once; atomic (written aside, then renamed into place)."""
    from updetr.data.synthetic import write_coco_dataset
    from updetr.data.synthetic_panoptic import write_panoptic_dataset

    root = synthetic_coco_root(cfg)
    panoptic = cfg.data.source == "synthetic_panoptic"
    marker = root / "annotations" / ("panoptic_val.json" if panoptic else "instances_val.json")
    if marker.is_file():
        return root
    write = write_panoptic_dataset if panoptic else write_coco_dataset
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    lo, hi = cfg.data.synthetic_size
    write(tmp, cfg.data.synthetic_images, seed=cfg.seed, size_range=(lo, hi), split="train")
    write(tmp, cfg.data.synthetic_val_images, seed=cfg.seed + 1, size_range=(lo, hi), split="val")
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_data_paths(cfg):
    """The config with absolute data paths (Ray Train workers chdir into Ray's session folder), a synthetic
    source written first."""
    if cfg.data.source in SYNTHETIC_SOURCES:
        root = ensure_synthetic_coco(cfg)
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(root)})})
    if cfg.data.path and "://" not in cfg.data.path:
        upd = {"path": str(Path(cfg.data.path).expanduser().resolve())}
        if cfg.data.val_path:
            upd["val_path"] = str(Path(cfg.data.val_path).expanduser().resolve())
        return cfg.model_copy(update={"data": cfg.data.model_copy(update=upd)})
    return cfg


class DetectTask(Task):
    name = "detect"
    sources = ("coco", "voc", "synthetic_coco", "coco_panoptic", "synthetic_panoptic")
    detectors = ("detr", "deformable_detr")
    has_eval = True
    eval_metrics = ("coco", "voc07", "voc12")
    evaluator_class = CocoEvaluator
    curve = ("eval", "fine-tuning epoch", "eval_ap_vs_epoch.png")

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.source == "synthetic_voc":
            raise ValueError("data.source 'synthetic_voc' is read by task oneshot; detect reads coco | voc | "
                             "synthetic_coco")
        if cfg.data.source in ("synthetic", "folder", "shards"):
            raise ValueError(f"data.source '{cfg.data.source}' has no labels; detection reads coco | voc | "
                             "synthetic_coco")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._datasets: dict = {}

    # -- data
    def prepare(self):
        cfg = resolve_data_paths(super().prepare())
        self.cfg = cfg
        self._datasets = {}
        self.dataset("train")  # fail here, in one line, before any worker starts
        if self.subset is not None:      # on the driver only: a Ray worker's working dir is elsewhere
            from updetr.data.subset import write_subset

            write_subset(cfg, *self.subset)
        return cfg

    def dataset(self, split: str):
        """The train / val `DetectionDataset` (annotation index only; images are read per batch)."""
        if split not in self._datasets:
            cfg = self.cfg
            if cfg.data.source in SYNTHETIC_SOURCES:  # written on first use (atomic), under data.path if set
                cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
                    update={"path": str(ensure_synthetic_coco(cfg))})})
            try:
                ds = self._build_dataset(cfg, split)
            except FileNotFoundError as e:
                raise DatasetError(f"data ({split} split): {e.args[0] if e.args else e}") from None
            except (ValueError, KeyError, TypeError) as e:
                raise DatasetError(f"data ({split} split): bad {self._annotation_kind}: {type(e).__name__}: "
                                   f"{e}") from None
            if len(ds) == 0:
                raise DatasetError(f"data ({split} split) under {cfg.data.val_path or cfg.data.path}: "
                                   "no images listed")
            if split == "train":
                ds = self._subset(ds)
            n = self.num_classes(ds)
            bad = sorted(c for c in self._category_ids(ds) if c >= n or c < 0)
            if bad:
                raise DatasetError(f"data ({split} split): category id(s) {bad[:5]} outside model.num_classes "
                                   f"= {n} (ids must be < num_classes; DETR's rule is max id + 1)")
            self._datasets[split] = ds
        return self._datasets[split]

    def _subset(self, ds):
        """The TRAIN split cut to data.fraction / data.subset_size (seeded: every process draws the same ids;
        prepare() writes them down); the class count still comes from the whole split."""
        from updetr.data.subset import choose_subset, subset_active, subset_seed

        if not subset_active(self.cfg):
            return ds
        total = len(ds.ids)
        ds.ids = choose_subset(ds.ids, self.cfg.data.fraction, self.cfg.data.subset_size, subset_seed(self.cfg))
        self.subset = (list(ds.ids), total)
        return ds

    subset = None                        # (kept ids, images in the whole split) when the split is cut

    _annotation_kind = "annotation file"     # named in the error for an annotation file that cannot be parsed

    def _build_dataset(self, cfg, split: str):
        from updetr.data.detection import build_detection_dataset

        return build_detection_dataset(cfg, split)

    def _category_ids(self, ds) -> list[int]:
        return ds.coco.getCatIds()

    def num_classes(self, ds=None) -> int:
        if self.cfg.model.num_classes is not None:
            return self.cfg.model.num_classes
        return (ds if ds is not None else self.dataset("train")).num_classes

    def train_batches(self, epoch: int, skip: int = 0, rank: int = 0, world_size: int = 1,
                      shard: Any = None) -> Iterator[dict]:
        from updetr.data.detection import detection_batches

        return detection_batches(self.cfg, self.dataset("train"), epoch, skip, rank, world_size)

    def batches_per_epoch(self, world_size: int = 1, ray: bool = False) -> Optional[int]:
        n = len(self.dataset("train")) // world_size
        per = -(-n // self.cfg.data.batch_size)
        s = self.cfg.schedule.steps_per_epoch
        return min(per, s) if s else per

    def eval_batches(self, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        from updetr.data.detection import detection_batches

        # batch 1 per image: no padding, so predictions do not depend on which images share a batch
        cfg = self.cfg.model_copy(update={"data": self.cfg.data.model_copy(update={"batch_size": 1})})
        return detection_batches(cfg, self.dataset("val"), 0, 0, rank, world_size)

    def evaluator(self):
        if self.cfg.eval.metric in ("voc07", "voc12"):
            from updetr.eval.voc_eval import VocEvaluator

            return VocEvaluator(self.dataset("val").coco, self.cfg.eval.metric)
        return CocoEvaluator(self.dataset("val").coco)

    # -- model
    def build(self):
        from updetr.models import build_detector

        return build_detector(self.cfg, self.num_classes())

    def init_weights(self, model, ckpt: dict, source: str) -> InitReport:
        """From pre-training weights: drop class_embed / patch2query / feature_align and keep everything else
        (the official detr_main.py --pretrain); the class head starts fresh. From detection weights (ours or
        a converted official DETR / UP-DETR fine-tuned file): every key, strictly."""
        sd = ckpt["model"]
        from_pretrain = any(k.startswith(("patch2query.", "module.patch2query.")) for k in sd) or \
            (ckpt.get("config") or {}).get("task", (ckpt.get("config") or {}).get("stage")) == "pretrain"
        if from_pretrain:
            return load_weights(model, sd, source=source, drop_prefixes=PRETRAIN_ONLY_PREFIXES,
                                reinit_prefixes=CLASS_HEAD, strict=self.cfg.init.strict)
        return load_weights(model, sd, source=source, strict=self.cfg.init.strict)
