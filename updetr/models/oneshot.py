"""One-shot detection model: UP-DETR with one query patch (M = 1) added to all N object queries, and its
postprocessing (score = probability of "matches the query's class")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.config import ExperimentConfig
from updetr.models.postprocess import PostProcess

MATCH = 1  # label of "an instance of the query's class" (pre-training's label 1 = patch); index 2 = no-object


class MatchPostProcess(PostProcess):
    """PostProcess whose score is P(match) = softmax(logits)[..., 1] and whose label is always 1 (the
    evaluator relabels it with the episode's class). Index 0 is never a target, as in pre-training."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict]:
        """`pred_logits [B, N, 3]`, `pred_boxes [B, N, 4]` -> B dicts {scores [N], labels [N], boxes [N, 4] xyxy px}."""
        results = super().forward(outputs, target_sizes)
        match = F.softmax(outputs["pred_logits"], -1)[..., MATCH]
        for r, s in zip(results, match):
            r["scores"] = s
            r["labels"] = torch.full_like(r["labels"], MATCH)
        return results


def build_oneshot(cfg: ExperimentConfig) -> tuple[nn.Module, nn.Module, dict]:
    """UP-DETR (num_patches 1, num_classes 2) with the pre-training heads' shapes, so a pre-trained checkpoint
    loads every key (patch2query, feature_align and class_embed included); the criterion is DETR's
    (labels, boxes, cardinality; no feature loss: feature_align is kept but not trained)."""
    from updetr.models import UPDETR, _backbone_and_transformer, apply_runtime_paths, build_criterion

    m, p = cfg.model, cfg.pretext
    backbone, transformer, freeze = _backbone_and_transformer(cfg)
    model = UPDETR(backbone, transformer, num_classes=2, num_queries=m.num_queries, aux_loss=m.aux_loss,
                   num_patches=1, feature_recon=p.feature_recon, query_shuffle=False, attention_mask=True,
                   patch_dropout=cfg.oneshot.patch_dropout, patch_dropout_mode="slot", freeze_backbone=freeze)
    apply_runtime_paths(model, cfg)
    return model, build_criterion(cfg, 2, feature=False), {"bbox": MatchPostProcess()}
