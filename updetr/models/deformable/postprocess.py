"""Deformable DETR outputs -> per-image detections: the top-k (query, class) pairs of sigmoid scores."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from updetr.util.box_ops import box_cxcywh_to_xyxy


class DeformablePostProcess(nn.Module):
    """Scores are per (query, class), not per query: one query may give several detections of different
    classes. Keeps the `num_select` best pairs over the flattened `[Q * K]` scores (COCO keeps 100 per image)."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict]:
        """
        Args:
            outputs: `pred_logits [B, Q, K]` sigmoid logits, `pred_boxes [B, Q, 4]` normalised cxcywh.
            target_sizes: `[B, 2]` (h, w) per image (original size for COCO eval).
        Returns:
            B dicts {'scores': [k], 'labels': [k] int64, 'boxes': [k, 4] xyxy in pixels}, best first,
            k = min(num_select, Q * K).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be [B, 2] with B={len(logits)}, got {tuple(target_sizes.shape)}")
        num_classes = logits.shape[2]
        k = min(self.num_select, logits.shape[1] * num_classes)
        scores, flat = torch.topk(logits.sigmoid().flatten(1), k, dim=1)
        query = torch.div(flat, num_classes, rounding_mode="floor")
        labels = flat % num_classes
        picked = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        picked = picked * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, picked)]
