"""Dropout that keeps its mask as bool between forward and backward (`runtime.bool_dropout_masks`).

PyTorch's CPU dropout draws `noise = empty_like(x).bernoulli_(1 - p)`, scales it in place (`noise.div_(1 - p)`)
and returns `x * noise`, so autograd holds a float32 noise tensor (4 bytes per element) until the backward.
Here the same draws go into a bool tensor of the same layout (the Bernoulli kernel makes the same draws from
the same generator for every dtype) and the product is `x * mask * c` with c = 1 / (1 - p) computed as the
reference does (in x's dtype): x * 1 * c == x * c and x * 0 * c == x * 0 exactly, so outputs and gradients
are bit for bit the reference's, with a quarter of the memory (~66 MB less at the paper's pre-training
shapes). CPU only: CUDA's fused dropout draws from another generator and is left as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models import mask_prefetch


class _MaskedScale(torch.autograd.Function):
    """y = x * mask * scale; dy/dx = mask * scale (mask bool, scale a 0-dim tensor of x's dtype)."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(mask, scale)
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        mask, scale = ctx.saved_tensors
        return grad.mul(mask).mul_(scale), None, None


def dropout(x: Tensor, p: float, training: bool, bool_mask: bool) -> Tensor:
    """`F.dropout(x, p, training)`, with a bool mask when `bool_mask` and it applies (CPU, 0 < p < 1)."""
    if not (bool_mask and training and 0.0 < p < 1.0 and x.device.type == "cpu" and x.is_floating_point()
            and x.numel() > 0):
        return F.dropout(x, p, training)
    prefetch = mask_prefetch.active()
    if prefetch is not None:  # drawn ahead, in this order, from the same generator
        mask = prefetch.take(x, p)
    else:
        mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)  # same layout, same draw order
    scale = torch.ones((), dtype=x.dtype).div_(1.0 - p)
    return _MaskedScale.apply(x, mask, scale)


class Dropout(nn.Dropout):
    """`nn.Dropout` whose mask is a bool tensor when `bool_mask` is set (`updetr.models.set_switches`)."""

    bool_mask = False

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training, self.bool_mask)
