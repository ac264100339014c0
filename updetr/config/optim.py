"""`optim:` the optimizer."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from updetr.config.base import _Strict


class OptimConfig(_Strict):
    """AdamW with a separate backbone learning rate and gradient clipping (owner: engine)."""

    lr: float = Field(1e-4, gt=0, description="Learning rate of transformer and heads.")
    lr_backbone: Optional[float] = Field(
        None, ge=0, description="Learning rate of trainable backbone layers. None (unset): per task "
                                "(updetr.config.task_defaults): 5e-5 for detect / oneshot from init.checkpoint "
                                "(UP-DETR's recipe), optim.lr for an unfrozen pretrain (main.py), else 1e-5.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    clip_max_norm: float = Field(0.1, ge=0, description="Gradient-norm clip; 0 disables.")
