"""DETR's set-prediction loss plus UP-DETR's feature reconstruction term, on every decoder layer."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]

# Which weighted loss keys each loss name produces (a loss whose keys all weigh 0 is skipped).
LOSS_KEYS = {"labels": ("loss_ce",), "boxes": ("loss_bbox", "loss_giou"), "cardinality": (),
             "feature": ("loss_feature",), "masks": ("loss_mask", "loss_dice")}


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class SetCriterion(nn.Module):
    """Hungarian-matched losses. `weight_dict` is applied by the caller (total = sum loss * weight).

    Loss names: 'labels' (loss_ce, class_error), 'boxes' (loss_bbox, loss_giou), 'cardinality'
    (cardinality_error, logging only), 'feature' (loss_feature), 'masks' (loss_mask, loss_dice; last layer only). Aux layers are re-matched and get `_{i}`.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict[str, float], eos_coef: float,
                 losses: list[str]):
        """
        Args:
            num_classes: object classes K; index K is no-object.
            matcher: module `(outputs, targets) -> list of (pred_idx, tgt_idx)`.
            weight_dict: loss key -> weight; keys with weight 0 are not computed.
            eos_coef: class weight of no-object in loss_ce.
            losses: subset of LOSS_KEYS' names.
        """
        super().__init__()
        unknown = [name for name in losses if name not in LOSS_KEYS]
        if unknown:
            raise ValueError(f"unknown losses {unknown} (expected a subset of {sorted(LOSS_KEYS)})")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # -- helpers -------------------------------------------------------------------------------------------
    def _on(self, key: str, suffix: str) -> bool:
        """False only when the key's weight is explicitly 0."""
        return self.weight_dict.get(key + suffix, self.weight_dict.get(key, 1)) != 0

    @staticmethod
    def _get_src_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    # -- losses (each returns a dict of scalar tensors) -----------------------------------------------------
    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                    suffix: str = "", log: bool = True) -> dict[str, Tensor]:
        """Weighted cross-entropy over `[B, N, K+1]`; unmatched queries target no-object (index K)."""
        src_logits = outputs["pred_logits"].float()
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)]).to(src_logits.device)
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o
        losses = {}
        if self._on("loss_ce", suffix):
            losses["loss_ce"] = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        if log:
            losses["class_error"] = 100 - _top1_accuracy(src_logits[idx], target_classes_o)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                         suffix: str = "") -> dict[str, Tensor]:
        """|#predictions not argmax-no-object - #targets|, averaged over images (logging only)."""
        pred_logits = outputs["pred_logits"]
        device = pred_logits.device
        tgt_lengths = torch.as_tensor([len(v["labels"]) for v in targets], device=device)
        card_pred = (pred_logits.argmax(-1) != pred_logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                   suffix: str = "") -> dict[str, Tensor]:
        """L1 (sum / num_boxes) and 1 - GIoU (sum / num_boxes) of matched cxcywh boxes."""
        idx = self._get_src_permutation_idx(indices)
        src_boxes = _working(outputs["pred_boxes"][idx])
        target_boxes = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)], dim=0).to(src_boxes)
        losses = {}
        if self._on("loss_bbox", suffix):
            loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
            losses["loss_bbox"] = loss_bbox.sum() / num_boxes
        if self._on("loss_giou", suffix):
            # the matcher checked every layer's boxes and the targets already (each check is a host read)
            loss_giou = 1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes),
                                                           box_cxcywh_to_xyxy(target_boxes), check=False))
            losses["loss_giou"] = loss_giou.sum() / num_boxes
        return losses

    def loss_feature(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                     suffix: str = "") -> dict[str, Tensor]:
        """Σ ||normalize(pred_feature) - normalize(gt_feature)||² over matched pairs / num_boxes (= Σ(2-2cos)/n).

        `gt_feature [B*M, Cb]` is viewed `[B, M, Cb]` and indexed by the matched target indices (target j of
        image b is patch j of image b); `pred_feature [B, N, Cb]` by the matched queries.
        """
        if not self._on("loss_feature", suffix):
            return {}
        batch_size = len(indices)
        target_feature = outputs["gt_feature"].float()
        n_feat = target_feature.shape[-1]
        target_feature = target_feature.view(batch_size, target_feature.shape[0] // batch_size, n_feat)
        idx = self._get_src_permutation_idx(indices)
        src_feature = outputs["pred_feature"][idx].float()
        target_feature = torch.cat([t[i.to(t.device)] for t, (_, i) in zip(target_feature, indices)], dim=0)

        src_feature = F.normalize(src_feature, dim=1)
        target_feature = F.normalize(target_feature, dim=1)
        loss_feature = F.mse_loss(src_feature, target_feature, reduction="none")
        return {"loss_feature": loss_feature.sum() / num_boxes}

    def loss_masks(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                   suffix: str = "") -> dict[str, Tensor]:
        """Focal (loss_mask) and dice (loss_dice) losses of matched masks (DETR's segmentation recipe).

        `pred_masks [B, N, h, w]` (stride 4 of the padded batch) is upsampled bilinearly to the padded batch
        size of the targets' `masks [T_b, H_b, W_b]` (bool, zero-padded bottom/right like the images).
        """
        src_idx = self._get_src_permutation_idx(indices)
        src_masks = outputs["pred_masks"][src_idx].float()  # [T, h, w]
        hm = max(int(t["masks"].shape[-2]) for t in targets)
        wm = max(int(t["masks"].shape[-1]) for t in targets)
        parts = []
        for t, (_, j) in zip(targets, indices):
            m = t["masks"][j.to(t["masks"].device)]
            parts.append(F.pad(m.float(), (0, wm - m.shape[-1], 0, hm - m.shape[-2])))
        target_masks = torch.cat(parts).to(src_masks.device) if parts else src_masks.new_zeros(0, hm, wm)
        if src_masks.shape[0] == 0:  # nothing matched: zero losses that keep the graph
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        src = F.interpolate(src_masks[:, None], size=(hm, wm), mode="bilinear", align_corners=False)[:, 0]
        src, tgt = src.flatten(1), target_masks.flatten(1)
        from updetr.models.segmentation import dice_loss, sigmoid_focal_loss

        return {"loss_mask": sigmoid_focal_loss(src, tgt, num_boxes), "loss_dice": dice_loss(src, tgt, num_boxes)}

    def _loss_fn(self, name: str) -> Callable[..., dict[str, Tensor]]:
        return {"labels": self.loss_labels, "cardinality": self.loss_cardinality, "boxes": self.loss_boxes,
                "feature": self.loss_feature, "masks": self.loss_masks}[name]

    # -- forward ---------------------------------------------------------------------------------------------
    def num_boxes(self, targets: list[dict], device) -> float:
        """Total targets in the batch, averaged over processes when torch.distributed is initialised, >= 1."""
        total = float(sum(len(t["labels"]) for t in targets))
        if not _dist_ready():
            return max(total, 1.0)  # counted on the host: no device round trip
        n = torch.as_tensor([total], dtype=torch.float, device=device)
        dist.all_reduce(n)
        return torch.clamp(n / dist.get_world_size(), min=1).item()

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """
        Args:
            outputs: model outputs (`pred_logits`, `pred_boxes`, optional `pred_feature`/`gt_feature`,
                `aux_outputs`).
            targets: B dicts with `labels [T_b]`, `boxes [T_b, 4]` cxcywh normalised.
        Returns:
            unweighted scalar losses: `loss_ce`, `loss_bbox`, `loss_giou`, `loss_feature` (when requested and
            weighted non-zero), `class_error`, `cardinality_error`, and `<key>_{i}` for aux layer i.
        """
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        aux = outputs.get("aux_outputs", [])
        layers = [outputs_without_aux] + list(aux)
        # HungarianMatcher matches every decoder layer in one go (one copy of the costs to the host); any other
        # `(outputs, targets) -> indices` module is called per layer
        match_layers = getattr(self.matcher, "match_layers", None)
        all_indices = match_layers(layers, targets) if match_layers else [self.matcher(o, targets) for o in layers]
        indices, *aux_indices_all = all_indices
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)

        losses: dict[str, Tensor] = {}
        for name in self.losses:
            losses.update(self._loss_fn(name)(outputs, targets, indices, num_boxes))

        for i, (aux_outputs, aux_indices) in enumerate(zip(aux, aux_indices_all)):
            suffix = f"_{i}"
            for name in self.losses:
                if name == "masks":  # DETR: intermediate layers have no masks (too costly)
                    continue
                kwargs = {"log": False} if name == "labels" else {}  # class_error only for the last layer
                l_dict = self._loss_fn(name)(aux_outputs, targets, aux_indices, num_boxes, suffix=suffix, **kwargs)
                losses.update({k + suffix: v for k, v in l_dict.items()})
        return losses


def _working(t: Tensor) -> Tensor:
    """fp32 for the box losses (exact under bf16 autocast); float64 kept as is (parity checks)."""
    return t if t.dtype == torch.float64 else t.float()


@torch.no_grad()
def _top1_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Top-1 accuracy in percent of `[T, K+1]` logits vs `[T]` labels; 0 when there are no targets."""
    if target.numel() == 0:
        return torch.zeros([], device=logits.device)
    correct = logits.argmax(-1).eq(target).float().sum(0)
    return correct.mul_(100.0 / target.size(0))
