"""`panoptic`: DETR's panoptic recipe, second stage — a mask head trained on a frozen, trained box detector.

Stage 1 is the `detect` task on the same panoptic data (data.source coco_panoptic | synthetic_panoptic: one
box per segment, things and stuff). This stage loads that detector under `detr.*`, freezes it (only
`bbox_attention` and `mask_head` train: DETR's --masks --frozen_weights) and scores PQ / SQ / RQ (overall,
things, stuff) and AP^seg on the evaluation split (`updetr.eval.panoptic_eval`). Batching and evaluation
order are the detect task's (one image per evaluation batch, never padded).
"""
from __future__ import annotations

from updetr.checkpoint import strip_prefixes
from updetr.tasks.base import InitError, InitReport, load_weights
from updetr.tasks.detect import DatasetError, DetectTask, ensure_synthetic_coco

MASK_HEAD = ("bbox_attention.", "mask_head.")


class PanopticTask(DetectTask):
    name = "panoptic"
    has_eval = True

    def dataset(self, split: str):
        """The train / val `PanopticDataset` (JSON index only; images and PNGs are read per batch)."""
        if split not in self._datasets:
            from updetr.data.panoptic import build_panoptic_dataset

            cfg = self.cfg
            if cfg.data.source == "synthetic_panoptic":
                cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
                    update={"path": str(ensure_synthetic_coco(cfg))})})
            try:
                ds = build_panoptic_dataset(cfg, split)
            except FileNotFoundError as e:
                raise DatasetError(f"data ({split} split): {e.args[0] if e.args else e}") from None
            except (ValueError, KeyError, TypeError) as e:
                raise DatasetError(f"data ({split} split): bad panoptic annotation: {type(e).__name__}: {e}") from None
            if len(ds) == 0:
                raise DatasetError(f"data ({split} split) under {cfg.data.val_path or cfg.data.path}: "
                                   "no images listed")
            n = self.num_classes(ds)
            bad = sorted(c for c in ds.pan.categories if c >= n or c < 0)
            if bad:
                raise DatasetError(f"data ({split} split): category id(s) {bad[:5]} outside model.num_classes "
                                   f"= {n} (ids must be < num_classes; DETR's rule is max id + 1)")
            self._datasets[split] = ds
        return self._datasets[split]

    def evaluator(self):
        from updetr.eval.panoptic_eval import PanopticEvaluator

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
