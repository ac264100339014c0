"""`optim:` the optimizer."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from updetr.config.base import _Strict


class OptimConfig(_Strict):
    """AdamW with a separate backbone learning rate and gradient clipping (owner: engine)."""

    lr: float = Field(1e-4, gt=0, description="Learning rate of transformer and heads (deformable_detr: 2e-4, "
                                              "pretrain 1e-4, unless set).")
    lr_backbone: Optional[float] = Field(
        None, ge=0, description="Learning rate of trainable backbone layers. None (unset): per task "
                                "(updetr.config.task_defaults): 5e-5 for detect / oneshot from init.checkpoint "
                                "(UP-DETR's recipe), optim.lr for an unfrozen pretrain (main.py), else 1e-5; "
                                "deformable_detr: 2e-5 (updetr.config.detector_defaults).")
    lr_linear_proj_mult: float = Field(
        0.1, gt=0, description="deformable_detr: learning rate of the sampling_offsets and reference_points "
                               "projections, as a multiple of optim.lr (their own optimizer group).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    clip_max_norm: float = Field(0.1, ge=0, description="Gradient-norm clip; 0 disables.")
