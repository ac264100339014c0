"""Coordinates of the multi-scale maps: valid ratios, the encoder's reference points, the two-stage proposals
and their sine embedding, and `inverse_sigmoid`.

Everything here is computed in float32 whatever the model's dtype, as the official code does (its grids and
ratios are float32 tensors that promote when they meet the features): a float64 model then reproduces the
official float64 numbers exactly, and fp32 / bf16 runs are unaffected.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from updetr.models.deformable.core import level_shapes


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x to at least `eps` (finite for any input)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios(mask: Tensor) -> Tensor:
    """`[N, H, W]` padding mask (True = padding, bottom / right) -> `[N, 2]` float32 (w, h): the unpadded
    share of each axis, read from the first row / column."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def encoder_reference_points(spatial_shapes: Tensor, ratios: Tensor) -> Tensor:
    """Reference point of every encoder token: its pixel centre, normalised by the *valid* size of its level,
    then mapped into every level (times each level's valid ratio), so a token looks at the same image point
    on all levels.

    Args:
        spatial_shapes: `[L, 2]` (H, W) per level. ratios: `[N, L, 2]` (w, h) valid ratios.
    Returns:
        `[N, S, L, 2]` (x, y), S = sum H_l * W_l.
    """
    per_level = []
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        ys = torch.arange(h, dtype=torch.float32, device=ratios.device) + 0.5
        xs = torch.arange(w, dtype=torch.float32, device=ratios.device) + 0.5
        y = ys[None, :, None] / (ratios[:, None, None, lvl, 1] * h)                   # [N, H, 1]
        x = xs[None, None, :] / (ratios[:, None, None, lvl, 0] * w)                   # [N, 1, W]
        per_level.append(torch.stack(torch.broadcast_tensors(x, y), -1).flatten(1, 2))  # [N, H*W, 2]
    points = torch.cat(per_level, 1)
    return points[:, :, None] * ratios[:, None]


def encoder_proposals(padding_mask: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """One box proposal per encoder token (two-stage): centred on the token's pixel (normalised by the
    valid size of its level), 0.05 * 2^level wide and high.

    Args:
        padding_mask: `[N, S]` True on padding. spatial_shapes: `[L, 2]` (H, W).
    Returns:
        (proposals `[N, S, 4]` cxcywh in logit space, +inf where the token is padding or the box is not
        well inside the image (any coordinate outside (0.01, 0.99)); usable `[N, S, 1]` bool).
    """
    n = padding_mask.shape[0]
    boxes, start = [], 0
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        pad = padding_mask[:, start:start + h * w].view(n, h, w)
        valid_h, valid_w = (~pad[:, :, 0]).sum(1), (~pad[:, 0, :]).sum(1)
        ys = torch.arange(h, dtype=torch.float32, device=pad.device)
        xs = torch.arange(w, dtype=torch.float32, device=pad.device)
        grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), -1)  # [H, W, 2] (x, y)
        size = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
        centre = (grid[None] + 0.5) / size                                          # [N, H, W, 2]
        wh = torch.ones_like(centre) * 0.05 * (2.0 ** lvl)
        boxes.append(torch.cat([centre, wh], -1).view(n, -1, 4))
        start += h * w
    proposals = torch.cat(boxes, 1)
    usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask[..., None], float("inf"))
    return proposals.masked_fill(~usable, float("inf")), usable


def proposal_pos_embed(proposals: Tensor, num_pos_feats: int = 128, temperature: float = 10000) -> Tensor:
    """Sine embedding of boxes given in logit space: each of the 4 coordinates (sigmoid, times 2*pi) gets
    `num_pos_feats` features, sin / cos interleaved. `[N, Q, 4]` -> `[N, Q, 4 * num_pos_feats]`."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = proposals.sigmoid() * (2 * math.pi)
    pos = pos[..., None] / dim_t                                                    # [N, Q, 4, F]
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)
