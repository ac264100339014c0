"""`schedule:` how long to train, when to evaluate, checkpoint and log."""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from updetr.config.base import _Strict


class ScheduleConfig(_Strict):
    """Length of training, LR drop and checkpoint cadence (owner: engine)."""

    epochs: int = Field(60, gt=0, description="Training epochs (deformable_detr: 50 unless set).")
    lr_drop: int = Field(40, gt=0, description="Epoch at which the LR is multiplied by 0.1 (StepLR).")
    max_steps: Optional[int] = Field(None, gt=0, description="Stop after this many optimizer steps (smoke runs).")
    steps_per_epoch: Optional[int] = Field(
        None, gt=0, description="Cap on steps per epoch (streaming sources); None: one pass over the data.")
    checkpoint_every: int = Field(500, gt=0, description="Write a checkpoint every K optimizer steps.")
    keep_checkpoints: int = Field(
        2, gt=0, description="`updetr debug` keeps this many newest checkpoints (as Ray's `num_to_keep`), so a "
                             "damaged newest one falls back to the one before it.")
    log_every: int = Field(10, gt=0, description="Progress line / per-step metrics every K steps.")
    eval_every: int = Field(1, ge=0, description="Evaluate every K epochs and at the end (tasks with an "
                                                 "evaluation split); 0: only at the end.")
