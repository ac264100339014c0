"""`model:` the DETR / UP-DETR network's architecture."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from updetr.config.base import _Strict


class ModelConfig(_Strict):
    """Architecture of the DETR / UP-DETR network (owner: `updetr.models.build_model`)."""

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
    dim_feedforward: int = Field(2048, gt=0, description="FFN hidden size in each transformer layer.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout inside the transformer.")
    pre_norm: Optional[bool] = Field(
        None, description="Pre-norm transformer (UP-DETR) instead of post-norm (DETR). None (unset): per task "
                          "(updetr.config.task_defaults): True for pretrain and for detect / oneshot starting from "
                          "init.checkpoint, False otherwise; a chained stage takes the previous stage's.")
    num_queries: int = Field(100, gt=0, description="Number of object queries N.")
    aux_loss: bool = Field(True, description="Auxiliary decoding losses on every decoder layer.")
    num_classes: Optional[int] = Field(
        None, gt=0, description="Detection classes (max category id + 1). None: 2 for pre-training "
                                "(index 1 = patch; pre-training needs >= 2), taken from the dataset "
                                "for fine-tuning.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")
        return self
