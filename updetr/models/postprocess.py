"""Model outputs -> per-image detections in absolute xyxy pixel coordinates (COCO-eval format)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.util.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Softmax scores and labels (no-object excluded) and boxes scaled to `target_sizes`."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict]:
        """
        Args:
            outputs: `pred_logits [B, N, K+1]`, `pred_boxes [B, N, 4]` normalised cxcywh.
            target_sizes: `[B, 2]` (h, w) per image (original size for COCO eval).
        Returns:
            B dicts {'scores': [N], 'labels': [N] int64, 'boxes': [N, 4] xyxy in pixels}.
        """
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if len(out_logits) != len(target_sizes) or target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be [B, 2] with B={len(out_logits)}, got {tuple(target_sizes.shape)}")

        prob = F.softmax(out_logits, -1)
        scores, labels = prob[..., :-1].max(-1)

        boxes = box_cxcywh_to_xyxy(out_bbox)
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale_fct[:, None, :]

        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
