"""Hungarian matching between predictions and targets (DETR's cost: class prob, L1 box, GIoU)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from updetr.util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment per image minimising `C = w_bbox*L1 + w_class*(-prob) + w_giou*(-GIoU)`.

    Matching is global over all N queries (UP-DETR does not restrict a patch to its query group).
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @staticmethod
    def working(t: Tensor) -> Tensor:
        """The dtype costs are computed in. float(): a no-op in fp32, keeps the costs exact under bf16 autocast."""
        return t.float()

    def class_cost(self, logits: Tensor, tgt_ids: Tensor) -> Tensor:
        """`[B*N, K+1]` logits, `[T]` target labels -> `[B*N, T]`: 1 - prob(target class), the constant dropped."""
        return -logits.softmax(-1)[:, tgt_ids]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: `pred_logits [B, N, K+1]`, `pred_boxes [B, N, 4]` (cxcywh).
            targets: B dicts with `labels [T_b]` int64 and `boxes [T_b, 4]` cxcywh.
        Returns:
            B tuples (pred_idx, tgt_idx) of int64 CPU tensors of length min(N, T_b); pred_idx is sorted.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: list[dict], targets: list[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """`forward` of every decoder layer at once: one cost computation for the L layers' `[L*B*N, T]`
        predictions and one copy of the costs to the host, instead of one of each per layer (on a GPU each
        copy waits for the device). Each cost is computed row by row as for one layer alone, so the costs
        and the assignments are bit for bit those of L separate calls.

        Args:
            layers: L output dicts of the same B and N (the last layer and the aux layers).
            targets: as `forward`.
        Returns:
            L lists, each as `forward` returns for that layer.
        """
        bs, num_queries = layers[0]["pred_logits"].shape[:2]
        out_logits = self.working(torch.cat([o["pred_logits"].flatten(0, 1) for o in layers]))  # [L*B*N, K+1]
        out_bbox = self.working(torch.cat([o["pred_boxes"].flatten(0, 1) for o in layers]))  # [L*B*N, 4]

        tgt_ids = torch.cat([v["labels"] for v in targets])
        tgt_bbox = torch.cat([v["boxes"] for v in targets]).to(out_bbox)

        cost_class = self.class_cost(out_logits, tgt_ids)
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        C = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        C = C.view(len(layers), bs, num_queries, -1).cpu()

        sizes = [len(v["boxes"]) for v in targets]
        out = []
        for c_layer in C:
            indices = [linear_sum_assignment(c[i]) for i, c in enumerate(c_layer.split(sizes, -1))]
            out.append([(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
                        for i, j in indices])
        return out
