"""`panoptic:` DETR's mask head and its post-processing (task panoptic)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from updetr.config.base import _Strict


class PanopticConfig(_Strict):
    """DETR's mask head on a frozen detector and its post-processing (owner: `updetr.tasks.panoptic`)."""

    freeze_detector: bool = Field(True, description="Freeze every detector weight (DETR's --frozen_weights): only "
                                                    "the mask head (bbox_attention, mask_head) trains.")
    mask_attention_norm: Literal["per_head", "joint"] = Field(
        "per_head", description="Softmax of the mask head's attention maps: per_head = over H x W for each head "
                                "(UP-DETR's code, the paper's Table 4); joint = over heads x H x W (DETR's "
                                "code, facebookresearch/detr#247).")
    mask_loss: float = Field(1.0, ge=0, description="Weight of loss_mask (sigmoid focal loss; DETR mask_loss_coef).")
    dice_loss: float = Field(1.0, ge=0, description="Weight of loss_dice (DETR dice_loss_coef).")
    threshold: float = Field(0.85, gt=0, lt=1, description="PostProcessPanoptic: keep queries whose best "
                                                           "non-empty class probability exceeds this.")
    min_area: int = Field(4, ge=0, description="PostProcessPanoptic: drop segments of at most this many pixels "
                                               "(at the processed size), then re-assign their pixels.")
    mask_threshold: float = Field(0.5, gt=0, lt=1, description="PostProcessSegm: sigmoid threshold of the "
                                                               "per-query masks scored by AP^seg.")
