"""Deformable DETR (Zhu et al., 2021) as updetr's second detector: multi-scale deformable attention in plain
PyTorch, the multi-scale input levels, the deformable encoder / decoder and the model with its three variants
(plain, iterative box refinement, two-stage), its focal criterion, matcher and post-processing, and UP-DETR's
query-patch pre-training on it (`DeformableUPDETR`).

Parameter names and shapes are the official ones (fundamentalvision/Deformable-DETR), so official state dicts
load strictly; `updetr.models.build_deformable_detr(cfg, num_classes)` builds the (model, criterion,
postprocessors) triple.
"""
from __future__ import annotations

from updetr.models.deformable.attention import MSDeformAttn
from updetr.models.deformable.core import ms_deform_attn_core
from updetr.models.deformable.criterion import DeformableCriterion
from updetr.models.deformable.matcher import FocalHungarianMatcher
from updetr.models.deformable.model import DeformableDETR
from updetr.models.deformable.postprocess import DeformablePostProcess
from updetr.models.deformable.pretext import DeformableUPDETR
from updetr.models.deformable.transformer import DeformableTransformer

__all__ = ["MSDeformAttn", "ms_deform_attn_core", "DeformableCriterion", "FocalHungarianMatcher", "DeformableDETR",
           "DeformablePostProcess", "DeformableTransformer", "DeformableUPDETR"]
