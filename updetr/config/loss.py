"""`loss:` loss and matcher weights."""
from __future__ import annotations

from pydantic import Field, model_validator

from updetr.config.base import _Strict


class LossConfig(_Strict):
    """Loss and matcher weights (owner: SetCriterion / HungarianMatcher). A loss with weight 0 is off."""

    ce: float = Field(1.0, ge=0, description="Weight of loss_ce (deformable_detr: 2 unless set).")
    bbox: float = Field(5.0, ge=0, description="Weight of loss_bbox (L1).")
    giou: float = Field(2.0, ge=0, description="Weight of loss_giou.")
    feature: float = Field(1.0, ge=0, description="Weight of loss_feature (pre-training reconstruction).")
    eos_coef: float = Field(0.1, gt=0, le=1, description="Relative class weight of no-object (paper's lambda). "
                            "`M/N` sets it to pretext.num_patches / model.num_queries, the paper's lambda for "
                            "any M (0.1, the official value, is M/N only for M=10, N=100).")
    focal_alpha: float = Field(0.25, gt=0, lt=1, description="deformable_detr: weight of the positives in the "
                               "sigmoid focal loss_ce (the matcher's class cost keeps its own 0.25, as official).")
    set_cost_class: float = Field(1.0, ge=0, description="Matcher cost of the class probability "
                                                         "(deformable_detr: 2 unless set).")
    set_cost_bbox: float = Field(5.0, ge=0, description="Matcher cost of the L1 box distance.")
    set_cost_giou: float = Field(2.0, ge=0, description="Matcher cost of the GIoU.")

    @model_validator(mode="after")
    def _something_trains(self) -> "LossConfig":
        if self.ce == 0 and self.bbox == 0 and self.giou == 0 and self.feature == 0:
            raise ValueError("every loss weight (ce, bbox, giou, feature) is 0: nothing would train")
        return self
