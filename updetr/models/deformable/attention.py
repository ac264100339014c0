"""`MSDeformAttn`: each query attends to a few learned sampling points around its reference point on every
feature level (Deformable DETR, eq. 3), on top of the plain-PyTorch core."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models.deformable.core import level_shapes, ms_deform_attn_core
from updetr.models.onednn import Linear


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the official parameter names (`sampling_offsets`,
    `attention_weights`, `value_proj`, `output_proj`), so official weights load strictly.

    Args:
        d_model: width C (divisible by n_heads).
        n_levels: feature levels L. n_heads: heads M. n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation: offsets start as a fixed pattern (weight 0; the bias puts head h's
        points on the ray at angle 2*pi*h/M, point k at k+1 pixels along the ray's largest axis, alike on
        every level), attention weights start uniform (all zero before the softmax), projections xavier."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        rays = torch.stack([angles.cos(), angles.sin()], -1)
        rays = rays / rays.abs().max(-1, keepdim=True)[0]                     # largest component = 1
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        pattern = rays.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * steps
        self.sampling_offsets.bias.copy_(pattern.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def sampling_locations(self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        """`[N, Lq, M, L, P, 2]` locations in [0, 1] of the padded maps.

        2-d references (points): offsets are in pixels of each level, so they are divided by the level's
        (W, H) — locations are (x, y) while spatial_shapes are (H, W); dividing by (H, W) was the released
        code's bug, fixed in fundamentalvision/Deformable-DETR#7. 4-d references (boxes, cxcywh): offsets
        are in units of half the box size over P points.
        """
        n, lq, _ = query.shape
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        if reference_points.shape[-1] == 2:
            # [L, 2] as (W, H); exact integers, so the division is the same whatever the tensor's dtype
            wh = offsets.new_tensor([[w, h] for h, w in level_shapes(spatial_shapes)])
            return reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            box = reference_points[:, :, None, :, None, :]
            return box[..., :2] + offsets / self.n_points * box[..., 2:] * 0.5
        raise ValueError(f"reference points end in 2 (points) or 4 (boxes), got {reference_points.shape[-1]}")

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            query: `[N, Lq, C]` (with its position embedding added).
            reference_points: `[N, Lq, L, 2]` (x, y) or `[N, Lq, L, 4]` (cx, cy, w, h), in [0, 1] of each
                padded level map (already scaled by the valid ratios).
            value: `[N, S, C]` the flattened levels (S = sum H_l * W_l).
            spatial_shapes: `[L, 2]` LongTensor of (H_l, W_l).
            padding_mask: `[N, S]` bool, True on padding; those values are zeroed so no sample reads them.
        Returns:
            `[N, Lq, C]`.
        """
        n, lq, _ = query.shape
        s = value.shape[1]
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(n, s, self.n_heads, self.d_model // self.n_heads)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        # normalised jointly over every level and point of a head
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        locations = self.sampling_locations(query, reference_points, spatial_shapes)
        return self.output_proj(ms_deform_attn_core(v, spatial_shapes, locations, weights))
