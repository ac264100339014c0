"""Deformable DETR's Hungarian matcher: DETR's box costs with a focal-loss class cost on sigmoid scores."""
from __future__ import annotations

import torch
from torch import Tensor

from updetr.models.matcher import HungarianMatcher

# The official matcher hard-codes these, independently of the criterion's focal_alpha.
MATCH_ALPHA = 0.25
MATCH_GAMMA = 2.0


class FocalHungarianMatcher(HungarianMatcher):
    """`C = w_bbox * L1 + w_class * (focal(p, 1) - focal(p, 0)) - w_giou * GIoU` with p = sigmoid(logit) of the
    target class: a query is cheap to match when the positive focal loss it would pay is small compared with
    the negative one it avoids."""

    @staticmethod
    def working(t: Tensor) -> Tensor:
        # float64 stays float64 (parity checks); lower precisions are computed in fp32
        return t if t.dtype == torch.float64 else t.float()

    def class_cost(self, logits: Tensor, tgt_ids: Tensor) -> Tensor:
        """`[B*N, K]` sigmoid logits, `[T]` labels -> `[B*N, T]`."""
        prob = logits.sigmoid()
        neg = (1 - MATCH_ALPHA) * (prob ** MATCH_GAMMA) * (-(1 - prob + 1e-8).log())
        pos = MATCH_ALPHA * ((1 - prob) ** MATCH_GAMMA) * (-(prob + 1e-8).log())
        return pos[:, tgt_ids] - neg[:, tgt_ids]
