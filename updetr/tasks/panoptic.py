"""`panoptic`: DETR's panoptic recipe, second stage — a mask head trained on a frozen, trained box detector.

Stage 1 is the `detect` task on the same panoptic data (data.source coco_panoptic | synthetic_panoptic: one
box per segment, things and stuff). This stage loads that detector under `detr.*`, freezes it (only
`bbox_attention` and `mask_head` train: DETR's --masks --frozen_weights) and scores PQ / SQ / RQ (overall,
things, stuff) and AP^seg on the evaluation split (`updetr.eval.panoptic_eval`). Batching and evaluation
order are the detect task's (one image per evaluation batch, never padded).
"""
from __future__ import annotations

from updetr.checkpoint import strip_prefixes
from updetr.eval.panoptic_eval import PanopticEvaluator
from updetr.tasks.base import InitError, InitReport, load_weights
from updetr.tasks.detect import DetectTask

MASK_HEAD = ("bbox_attention.", "mask_head.")


class PanopticTask(DetectTask):
    name = "panoptic"
    sources = ("coco_panoptic", "synthetic_panoptic")
    detectors = ("detr",)  # the mask head sits on DETR's single-scale attention maps
    has_eval = True
    evaluator_class = PanopticEvaluator
    curve = None

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.data.source not in cls.sources:
            raise ValueError(f"data.source '{cfg.data.source}' has no segment maps; the panoptic task reads "
                             "coco_panoptic | synthetic_panoptic")

    _annotation_kind = "panoptic annotation"

    def _build_dataset(self, cfg, split: str):
        """The train / val `PanopticDataset` (JSON index only; images and PNGs are read per batch)."""
        from updetr.data.panoptic import build_panoptic_dataset

        return build_panoptic_dataset(cfg, split)

    def _category_ids(self, ds) -> list[int]:
        return list(ds.pan.categories)

    def evaluator(self):
        return PanopticEvaluator(self.dataset("val").pan)

    def build(self):
        from updetr.models import build_detr_segm

        return build_detr_segm(self.cfg, self.num_classes(), self.dataset("train").pan.is_thing)

    def init_weights(self, model, ckpt: dict, source: str) -> InitReport:
        """From a detect checkpoint (the box stage): its weights go under `detr.` strictly, the mask head starts
        fresh. From a panoptic checkpoint (ours or a converted official DETR-panoptic file): every key."""
        sd = strip_prefixes(ckpt["model"])
        if any(k.startswith("patch2query.") for k in sd):
            raise InitError(f"{source}: pre-training weights; the panoptic stage freezes a trained detector, so "
                            "init.checkpoint must be a detect checkpoint (train the box stage first)")
        if not any(k.startswith("detr.") for k in sd):
            return load_weights(model, {f"detr.{k}": v for k, v in sd.items()}, source=source,
                                reinit_prefixes=MASK_HEAD, strict=self.cfg.init.strict)
        return load_weights(model, sd, source=source, strict=self.cfg.init.strict)
