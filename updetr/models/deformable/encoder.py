"""The deformable encoder: post-norm layers of multi-scale deformable self-attention + FFN over the tokens of
every level at once (tokens are `[N, S, C]`, batch first)."""
from __future__ import annotations

import copy
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models.deformable.attention import MSDeformAttn
from updetr.models.deformable.geometry import encoder_reference_points
from updetr.models.dropout import Dropout
from updetr.models.onednn import Linear


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention (query = token + position, value = token), add & norm, FFN, add & norm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, d_ffn)
        self.dropout2 = Dropout(dropout)
        self.linear2 = Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """`src`, `pos` `[N, S, C]`; `reference_points [N, S, L, 2]`; `padding_mask [N, S]` -> `[N, S, C]`."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """`num_layers` copies of a layer (`layers.{i}`); every layer uses the same reference points."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, src: Tensor, spatial_shapes: Tensor, ratios: Tensor, pos: Tensor,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        """`src`, `pos [N, S, C]`, `spatial_shapes [L, 2]`, valid `ratios [N, L, 2]` -> memory `[N, S, C]`."""
        reference_points = encoder_reference_points(spatial_shapes, ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, padding_mask)
        return out
