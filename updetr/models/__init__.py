"""Model builders: `build_updetr(cfg)`, `build_detr(cfg, num_classes)`, `build_deformable_detr(cfg, num_classes)`,
`build_detector(cfg, num_classes)` (the one `model.detector` names), `build_detr_segm(...)` -> (model, criterion,
postprocessors) and state-dict helpers; `updetr.tasks.build_model(cfg)` picks the task's."""
from __future__ import annotations

from torch import nn

from updetr.config import ExperimentConfig
from updetr.models.backbone import Backbone, FrozenBatchNorm2d, Joiner, build_backbone
from updetr.models.criterion import SetCriterion
from updetr.models.detr import DETR
from updetr.models.matcher import HungarianMatcher
from updetr.models.mlp import MLP
from updetr.models.postprocess import PostProcess
from updetr.models.transformer import Transformer, build_transformer
from updetr.models.updetr import UPDETR, build_group_attention_mask, patch_keep_mask

__all__ = [
    "build_weight_dict", "build_criterion", "build_updetr", "build_detr", "build_detr_segm",
    "Backbone", "FrozenBatchNorm2d", "Joiner", "SetCriterion", "DETR", "UPDETR", "HungarianMatcher", "MLP",
    "PostProcess", "Transformer", "build_group_attention_mask", "patch_keep_mask", "set_switches",
    "apply_runtime_paths", "build_deformable_detr", "build_deformable_updetr", "build_detector", "build_pretrainer",
    "DETECTORS", "PRETRAINERS",
]


def build_weight_dict(cfg: ExperimentConfig, feature: bool = False) -> dict[str, float]:
    """`loss_ce/bbox/giou` (+ `loss_feature` when `feature`) and `_{i}` aux copies."""
    weight_dict = {"loss_ce": cfg.loss.ce, "loss_bbox": cfg.loss.bbox, "loss_giou": cfg.loss.giou}
    if feature:
        weight_dict["loss_feature"] = cfg.loss.feature
    if cfg.model.aux_loss:
        aux = {}
        for i in range(cfg.model.dec_layers - 1):
            aux.update({f"{k}_{i}": v for k, v in weight_dict.items()})
        weight_dict.update(aux)
    return weight_dict


def set_switches(model: nn.Module, **switches: bool) -> nn.Module:
    """Set run-time switches declared on module classes: `onednn` (`Linear`, `MultiheadAttention`),
    `bool_mask` (`Dropout`, `MultiheadAttention`), `prefetch_masks` (`UPDETR`). Every module of `model` whose
    class declares a switch gets its value (returns model)."""
    for m in model.modules():
        for name, on in switches.items():
            if hasattr(type(m), name):
                setattr(m, name, bool(on))
    return model


def apply_runtime_paths(model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    """Switch the model's run-time speed-ups that live in its modules (`runtime.onednn_linear`,
    `runtime.bool_dropout_masks`, `runtime.prefetch_dropout_masks`); the CNN's (fold, channels-last) are given
    to the backbone when it is built."""
    r = cfg.runtime
    return set_switches(model, onednn=r.onednn_linear, bool_mask=r.bool_dropout_masks,
                        prefetch_masks=r.prefetch_dropout_masks)


def _backbone_and_transformer(cfg: ExperimentConfig, return_interm_layers: bool = False):
    """The CNN is fully frozen when `model.freeze_backbone` or `optim.lr_backbone == 0` (DETR trains the
    backbone only when lr_backbone > 0); otherwise layers 2-4 train. Nothing is downloaded."""
    m = cfg.model
    freeze = m.freeze_backbone or cfg.optim.lr_backbone == 0
    backbone = build_backbone(m.backbone, m.hidden_dim, m.position_embedding, train_backbone=not freeze,
                              dilation=m.dilation, weights=m.backbone_weights,
                              fold_bn=cfg.runtime.fold_frozen_bn, channels_last=cfg.runtime.channels_last,
                              return_interm_layers=return_interm_layers)
    transformer = build_transformer(m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward,
                                    m.dropout, m.pre_norm)
    return backbone, transformer, freeze


def build_criterion(cfg: ExperimentConfig, num_classes: int, feature: bool = False,
                    masks: bool = False) -> SetCriterion:
    """Hungarian matcher + SetCriterion (labels, boxes, cardinality; + feature reconstruction; + masks with
    weights panoptic.mask_loss / panoptic.dice_loss, last decoder layer only, as DETR)."""
    matcher = HungarianMatcher(cost_class=cfg.loss.set_cost_class, cost_bbox=cfg.loss.set_cost_bbox,
                               cost_giou=cfg.loss.set_cost_giou)
    losses = ["labels", "boxes", "cardinality"] + (["feature"] if feature else []) + (["masks"] if masks else [])
    weight_dict = build_weight_dict(cfg, feature)
    if masks:
        weight_dict.update({"loss_mask": cfg.panoptic.mask_loss, "loss_dice": cfg.panoptic.dice_loss})
    return SetCriterion(num_classes, matcher, weight_dict, cfg.loss.eos_coef, losses)


def build_updetr(cfg: ExperimentConfig, num_classes: int = 2) -> tuple[nn.Module, SetCriterion, dict]:
    """UP-DETR for random query patch detection (num_classes 2: index 1 = patch)."""
    m, p = cfg.model, cfg.pretext
    backbone, transformer, freeze = _backbone_and_transformer(cfg)
    model = UPDETR(backbone, transformer, num_classes=num_classes, num_queries=m.num_queries, aux_loss=m.aux_loss,
                   num_patches=p.num_patches, feature_recon=p.feature_recon, query_shuffle=p.query_shuffle,
                   attention_mask=p.attention_mask, patch_dropout=p.patch_dropout,
                   patch_dropout_mode=p.patch_dropout_mode, freeze_backbone=freeze)
    apply_runtime_paths(model, cfg)
    return model, build_criterion(cfg, num_classes, p.feature_recon), {"bbox": PostProcess()}


def build_detr(cfg: ExperimentConfig, num_classes: int) -> tuple[nn.Module, SetCriterion, dict]:
    """DETR for detection with `num_classes` (max category id + 1)."""
    m = cfg.model
    backbone, transformer, _ = _backbone_and_transformer(cfg)
    model = DETR(backbone, transformer, num_classes=num_classes, num_queries=m.num_queries, aux_loss=m.aux_loss)
    apply_runtime_paths(model, cfg)
    return model, build_criterion(cfg, num_classes), {"bbox": PostProcess()}


def build_detr_segm(cfg: ExperimentConfig, num_classes: int, is_thing: dict[int, bool]):
    """DETR + mask head (panoptic): the detector frozen unless panoptic.freeze_detector is false.
    Postprocessors: 'bbox' (boxes), 'segm' (per-query masks, AP^seg), 'panoptic' (one segment map)."""
    from updetr.models.panoptic_postprocess import PostProcessPanoptic, PostProcessSegm
    from updetr.models.segmentation import DETRsegm

    m, p = cfg.model, cfg.panoptic
    backbone, transformer, _ = _backbone_and_transformer(cfg, return_interm_layers=True)
    detr = DETR(backbone, transformer, num_classes=num_classes, num_queries=m.num_queries, aux_loss=m.aux_loss)
    model = apply_runtime_paths(DETRsegm(detr, freeze_detr=p.freeze_detector,
                                                 attention_norm=p.mask_attention_norm), cfg)
    post = {"bbox": PostProcess(), "segm": PostProcessSegm(p.mask_threshold),
            "panoptic": PostProcessPanoptic(is_thing, p.threshold, p.min_area)}
    return model, build_criterion(cfg, num_classes, masks=True), post


def _deformable_backbone_and_transformer(cfg: ExperimentConfig):
    """The multi-scale CNN (frozen as `_backbone_and_transformer` decides) and the deformable transformer."""
    from updetr.models.deformable import DeformableTransformer
    from updetr.models.deformable.levels import build_multiscale_backbone

    m = cfg.model
    freeze = m.freeze_backbone or cfg.optim.lr_backbone == 0
    backbone = build_multiscale_backbone(m.backbone, m.hidden_dim, m.num_feature_levels, m.position_embedding,
                                         train_backbone=not freeze, dilation=m.dilation, weights=m.backbone_weights,
                                         fold_bn=cfg.runtime.fold_frozen_bn, channels_last=cfg.runtime.channels_last)
    transformer = DeformableTransformer(m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward,
                                        m.dropout, m.num_feature_levels, m.enc_n_points, m.dec_n_points,
                                        two_stage=m.two_stage, two_stage_num_proposals=m.num_queries)
    return backbone, transformer, freeze


def build_deformable_detr(cfg: ExperimentConfig, num_classes: int) -> tuple[nn.Module, SetCriterion, dict]:
    """Deformable DETR (plain, `model.with_box_refine`, `model.two_stage`) for detection with `num_classes`
    sigmoid classes (max category id + 1): focal criterion and matcher, top-100 post-processing."""
    from updetr.models.deformable import (DeformableCriterion, DeformableDETR, DeformablePostProcess,
                                          FocalHungarianMatcher)

    m = cfg.model
    backbone, transformer, _ = _deformable_backbone_and_transformer(cfg)
    model = DeformableDETR(backbone, transformer, num_classes=num_classes, num_queries=m.num_queries,
                           num_feature_levels=m.num_feature_levels, aux_loss=m.aux_loss,
                           with_box_refine=m.with_box_refine, two_stage=m.two_stage)
    apply_runtime_paths(model, cfg)
    matcher = FocalHungarianMatcher(cost_class=cfg.loss.set_cost_class, cost_bbox=cfg.loss.set_cost_bbox,
                                    cost_giou=cfg.loss.set_cost_giou)
    weight_dict = build_weight_dict(cfg)
    if m.two_stage:  # the encoder's proposals are trained with the same weights
        last = {"loss_ce": cfg.loss.ce, "loss_bbox": cfg.loss.bbox, "loss_giou": cfg.loss.giou}
        weight_dict.update({f"{k}_enc": v for k, v in last.items()})
    criterion = DeformableCriterion(num_classes, matcher, weight_dict, ["labels", "boxes", "cardinality"],
                                    focal_alpha=cfg.loss.focal_alpha)
    return model, criterion, {"bbox": DeformablePostProcess()}


def build_deformable_updetr(cfg: ExperimentConfig, num_classes: int = 2) -> tuple[nn.Module, SetCriterion, dict]:
    """UP-DETR's random query patch detection on Deformable DETR (plain or `model.with_box_refine`; label 1 =
    patch): `models/deformable/pretext.py`. Sigmoid focal classification, or with `pretext.classification:
    softmax` UP-DETR's (K+1)-way softmax (one more class logit, for no-object) and DETR's criterion."""
    from updetr.models.deformable import DeformableCriterion, DeformablePostProcess, FocalHungarianMatcher
    from updetr.models.deformable.pretext import DeformableUPDETR

    m, p = cfg.model, cfg.pretext
    softmax = p.classification == "softmax"
    backbone, transformer, freeze = _deformable_backbone_and_transformer(cfg)
    # The class head keeps Deformable DETR's initialisation: its bias is one constant, which a softmax ignores.
    model = DeformableUPDETR(backbone, transformer, num_classes=num_classes + softmax, num_queries=m.num_queries,
                             num_feature_levels=m.num_feature_levels, aux_loss=m.aux_loss,
                             with_box_refine=m.with_box_refine, num_patches=p.num_patches,
                             feature_recon=p.feature_recon, query_shuffle=p.query_shuffle,
                             attention_mask=p.attention_mask, patch_dropout=p.patch_dropout,
                             patch_dropout_mode=p.patch_dropout_mode, freeze_backbone=freeze)
    apply_runtime_paths(model, cfg)
    if softmax:
        return model, build_criterion(cfg, num_classes, feature=p.feature_recon), {"bbox": PostProcess()}
    matcher = FocalHungarianMatcher(cost_class=cfg.loss.set_cost_class, cost_bbox=cfg.loss.set_cost_bbox,
                                    cost_giou=cfg.loss.set_cost_giou)
    losses = ["labels", "boxes", "cardinality"] + (["feature"] if p.feature_recon else [])
    criterion = DeformableCriterion(num_classes, matcher, build_weight_dict(cfg, p.feature_recon), losses,
                                    focal_alpha=cfg.loss.focal_alpha)
    return model, criterion, {"bbox": DeformablePostProcess()}


# model.detector -> builder of the (model, criterion, postprocessors) of a detection run / of pre-training.
DETECTORS = {"detr": build_detr, "deformable_detr": build_deformable_detr}
PRETRAINERS = {"detr": build_updetr, "deformable_detr": build_deformable_updetr}


def _builder(table: dict, cfg: ExperimentConfig):
    try:
        return table[cfg.model.detector]
    except KeyError:
        raise ValueError(f"unknown model.detector '{cfg.model.detector}' (expected one of {sorted(table)})") \
            from None


def build_detector(cfg: ExperimentConfig, num_classes: int) -> tuple[nn.Module, nn.Module, dict]:
    """The detector `cfg.model.detector` names, for detection with `num_classes`."""
    return _builder(DETECTORS, cfg)(cfg, num_classes)


def build_pretrainer(cfg: ExperimentConfig, num_classes: int = 2) -> tuple[nn.Module, nn.Module, dict]:
    """Random query patch detection on the detector `cfg.model.detector` names."""
    return _builder(PRETRAINERS, cfg)(cfg, num_classes)
