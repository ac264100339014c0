"""The multi-scale deformable attention core: bilinear sampling of each head's value maps at given locations,
then a weighted sum over levels and points, in plain PyTorch (`F.grid_sample`, any device, differentiable)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Shapes = Union[Tensor, Sequence[Sequence[int]]]


def level_shapes(spatial_shapes: Shapes) -> list[tuple]:
    """(H_l, W_l) per level as Python numbers. Int pairs are kept as they are, which under torch.compile keeps
    them symbolic (a read of a tensor's values would break the graph, and int() would fix each size)."""
    if isinstance(spatial_shapes, Tensor):
        return [(h, w) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def ms_deform_attn_core(value: Tensor, spatial_shapes: Shapes, sampling_locations: Tensor,
                        attention_weights: Tensor) -> Tensor:
    """Sample and sum: out[n, q, m] = sum over (level l, point p) of w[n, q, m, l, p] * bilinear(V_l^m, loc).

    Convention (the official CUDA kernel's): a location (x, y) in [0, 1] covers the *padded* level map,
    pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H), and samples outside the map read zeros.
    That is `grid_sample(align_corners=False, padding_mode='zeros')` on the grid 2 * loc - 1.

    Args:
        value: `[N, S, M, D]` per-head values of the flattened levels (S = sum of H_l * W_l, levels in order,
            each row-major).
        spatial_shapes: `[L, 2]` (H_l, W_l) per level (a LongTensor or int pairs).
        sampling_locations: `[N, Lq, M, L, P, 2]` (x, y) in [0, 1].
        attention_weights: `[N, Lq, M, L, P]` (already normalised over L * P by the caller).
    Returns:
        `[N, Lq, M * D]`, the heads concatenated.
    """
    n, _, heads, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    shapes = level_shapes(spatial_shapes)
    # grid_sample works per (batch item, head): fold the heads into the batch, channels = D
    per_head = value.permute(0, 2, 3, 1).reshape(n * heads, d, -1)                 # [N*M, D, S]
    grids = 2 * sampling_locations - 1                                              # [-1, 1] over the padded map
    sampled = []
    for lvl, (chunk, (h, w)) in enumerate(zip(per_head.split([h * w for h, w in shapes], dim=-1), shapes)):
        grid = grids[:, :, :, lvl].transpose(1, 2).reshape(n * heads, lq, points, 2)  # [N*M, Lq, P, 2]
        sampled.append(F.grid_sample(chunk.reshape(n * heads, d, h, w), grid, mode="bilinear",
                                     padding_mode="zeros", align_corners=False))   # [N*M, D, Lq, P]
    stacked = torch.cat(sampled, dim=-1)                                            # [N*M, D, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, lq, levels * points)
    out = (stacked * weights).sum(-1)                                               # [N*M, D, Lq]
    return out.view(n, heads * d, lq).transpose(1, 2).contiguous()
