"""Deformable DETR's set criterion: sigmoid focal classification (no no-object class), DETR's L1 and GIoU box
losses, re-matched on every decoder layer and, in two-stage mode, on the encoder's proposals (`_enc`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from updetr.models.criterion import SetCriterion, _top1_accuracy
from updetr.models.segmentation import sigmoid_focal_loss

FOCAL_GAMMA = 2.0  # hard-coded in the official criterion


class DeformableCriterion(SetCriterion):
    """`SetCriterion` with focal `loss_ce` and the encoder's losses.

    Loss names and keys are DETR's ('labels' -> loss_ce + class_error, 'boxes' -> loss_bbox + loss_giou,
    'cardinality' -> cardinality_error), `_{i}` for decoder layer i < D-1 and `_enc` for the two-stage
    proposals, which are matched as class-agnostic (every target relabelled 0).

    Args:
        num_classes: sigmoid logits K. matcher: `FocalHungarianMatcher`. weight_dict: key -> weight.
        losses: subset of 'labels', 'boxes', 'cardinality'. focal_alpha: the positives' weight in loss_ce.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict[str, float], losses: list[str],
                 focal_alpha: float = 0.25):
        # eos_coef is DETR's no-object weight; focal classification has no such class (unused here)
        super().__init__(num_classes, matcher, weight_dict, eos_coef=1.0, losses=losses)
        self.focal_alpha = focal_alpha

    def loss_labels(self, outputs: dict, targets: list[dict], indices, num_boxes: float, suffix: str = "",
                    log: bool = True) -> dict[str, Tensor]:
        """Focal loss of `pred_logits [B, N, K]` against one-hot targets (all zeros for unmatched queries),
        summed over queries and classes / num_boxes (the official mean over queries times N)."""
        src_logits = outputs["pred_logits"]
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)]).to(src_logits.device)
        losses = {}
        if self._on("loss_ce", suffix):
            onehot = torch.zeros_like(src_logits)
            onehot[idx[0], idx[1], target_classes_o] = 1
            losses["loss_ce"] = sigmoid_focal_loss(src_logits, onehot, num_boxes, alpha=self.focal_alpha,
                                                   gamma=FOCAL_GAMMA) * src_logits.shape[1]
        if log:
            losses["class_error"] = 100 - _top1_accuracy(src_logits[idx], target_classes_o)
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """
        Args:
            outputs: the model's dict (`pred_logits`, `pred_boxes`, `aux_outputs`, `enc_outputs`).
            targets: B dicts with `labels [T_b]`, `boxes [T_b, 4]` cxcywh normalised.
        Returns:
            unweighted scalar losses: the decoder's (as SetCriterion) and `<key>_enc` in two-stage mode.
        """
        losses = super().forward({k: v for k, v in outputs.items() if k != "enc_outputs"}, targets)
        enc = outputs.get("enc_outputs")
        if enc is not None:
            # proposals are class-agnostic: every target counts as class 0 (the score top-k ranks by)
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            indices = self.matcher(enc, binary)
            num_boxes = self.num_boxes(targets, enc["pred_logits"].device)
            for name in self.losses:
                kwargs = {"log": False} if name == "labels" else {}
                l_dict = self._loss_fn(name)(enc, binary, indices, num_boxes, suffix="_enc", **kwargs)
                losses.update({k + "_enc": v for k, v in l_dict.items()})
        return losses
