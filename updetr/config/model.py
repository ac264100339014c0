"""`model:` the DETR / UP-DETR network's architecture."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from updetr.config.base import _Strict


# Fields that only Deformable DETR reads, with their defaults (a DETR config must leave them there).
DEFORMABLE_ONLY = {"num_feature_levels": 4, "enc_n_points": 4, "dec_n_points": 4, "with_box_refine": False,
                   "two_stage": False}


class ModelConfig(_Strict):
    """Architecture of the DETR / UP-DETR network (owner: `updetr.models.build_model`)."""

    detector: Literal["detr", "deformable_detr"] = Field(
        "detr", description="Detector: detr (DETR / UP-DETR) or deformable_detr (Deformable DETR, detect task "
                            "only; unset fields take its official defaults, updetr.config.detector_defaults).")
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = Field(
        "resnet50", description="torchvision ResNet used as the CNN backbone.")
    backbone_weights: Optional[str] = Field(
        None, description="Local weight file for the backbone (torchvision or SwAV state_dict; `module.` "
                          "prefixes stripped). None keeps random init: nothing is ever downloaded.")
    freeze_backbone: Optional[bool] = Field(
        None, description="Freeze the whole CNN. When False, layers 2-4 train at optim.lr_backbone and the "
                          "stem + layer1 stay frozen, as in DETR. None (unset): per task as the official code "
                          "(updetr.config.task_defaults): True for pretrain (--fre_cnn), False otherwise.")
    dilation: bool = Field(False, description="Replace stride with dilation in the last ResNet stage (DC5).")
    position_embedding: Literal["sine", "learned"] = Field("sine", description="Positional encoding type.")
    hidden_dim: int = Field(256, gt=0, description="Transformer width d_model.")
    nheads: int = Field(8, gt=0, description="Attention heads.")
    enc_layers: int = Field(6, ge=0, description="Transformer encoder layers.")
    dec_layers: int = Field(6, gt=0, description="Transformer decoder layers.")
    dim_feedforward: int = Field(2048, gt=0, description="FFN hidden size in each transformer layer "
                                                         "(deformable_detr: 1024 unless set).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout inside the transformer.")
    pre_norm: Optional[bool] = Field(
        None, description="Pre-norm transformer (UP-DETR) instead of post-norm (DETR). None (unset): per task "
                          "(updetr.config.task_defaults): True for pretrain and for detect / oneshot starting from "
                          "init.checkpoint, False otherwise; a chained stage takes the previous stage's.")
    num_queries: int = Field(100, gt=0, description="Number of object queries N (deformable_detr: 300 unless set).")
    aux_loss: bool = Field(True, description="Auxiliary decoding losses on every decoder layer.")
    num_classes: Optional[int] = Field(
        None, gt=0, description="Detection classes (max category id + 1). None: 2 for pre-training "
                                "(index 1 = patch; pre-training needs >= 2), taken from the dataset "
                                "for fine-tuning.")

    num_feature_levels: int = Field(
        4, ge=1, description="deformable_detr: feature levels L: 1 (C5 alone) or C3-C5 plus L-3 extra stride-2 "
                             "levels (4: strides 8-64).")
    enc_n_points: int = Field(4, gt=0, description="deformable_detr: sampling points per head and level in "
                                                   "the encoder.")
    dec_n_points: int = Field(4, gt=0, description="deformable_detr: sampling points per head and level in "
                                                   "the decoder's cross-attention.")
    with_box_refine: bool = Field(False, description="deformable_detr: iterative bounding box refinement (each "
                                                     "decoder layer refines the previous layer's boxes).")
    two_stage: bool = Field(False, description="deformable_detr: two-stage (queries from the encoder's top "
                                               "num_queries proposals).")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        return self

    @model_validator(mode="after")
    def _detector_fields(self) -> "ModelConfig":
        if self.detector == "detr":
            set_here = [k for k, v in DEFORMABLE_ONLY.items() if getattr(self, k) != v]
            if set_here:
                raise ValueError(f"model.{set_here[0]} applies to model.detector deformable_detr only")
            return self
        if self.pre_norm:
            raise ValueError("model.pre_norm: Deformable DETR's transformer is post-norm only (pre_norm false)")
        if self.num_feature_levels == 2:
            raise ValueError("model.num_feature_levels must be 1 (C5) or >= 3 (C3-C5 + extra levels), not 2")
        if self.hidden_dim % 32:
            raise ValueError(f"model.hidden_dim ({self.hidden_dim}) must be divisible by 32 for deformable_detr "
                             "(GroupNorm(32) after each input projection)")
        return self
