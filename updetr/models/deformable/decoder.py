"""The deformable decoder: query self-attention, multi-scale deformable cross-attention around each query's
reference point, FFN (post-norm); with iterative box refinement each layer moves the references."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models.deformable.attention import MSDeformAttn
from updetr.models.deformable.geometry import inverse_sigmoid
from updetr.models.dropout import Dropout
from updetr.models.onednn import Linear, MultiheadAttention


class DeformableDecoderLayer(nn.Module):
    """Self-attention over the queries (global: they must see each other to avoid duplicates), add & norm2;
    deformable cross-attention into the memory, add & norm1; FFN, add & norm3 (the official names)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = Linear(d_model, d_ffn)
        self.dropout3 = Dropout(dropout)
        self.linear2 = Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, padding_mask: Optional[Tensor] = None,
                self_attn_mask: Optional[Tensor] = None) -> Tensor:
        """`tgt`, `query_pos [N, Q, C]`; `reference_points [N, Q, L, 2 | 4]`; `memory [N, S, C]` -> `[N, Q, C]`.
        `self_attn_mask [Q, Q]` (additive, -inf = blocked): UP-DETR's query groups; the only place where
        queries meet, so a block-diagonal mask isolates the groups completely."""
        q = (tgt + query_pos).transpose(0, 1)                    # nn.MultiheadAttention is sequence first
        attended = self.self_attn(q, q, tgt.transpose(0, 1), attn_mask=self_attn_mask)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableDecoder(nn.Module):
    """`num_layers` copies of a layer (`layers.{i}`) returning every layer's output and references.

    `bbox_embed` (box refinement) and `class_embed` (two-stage) are the model's head lists, set by
    `DeformableDETR`: registered here too because the official model does so, which puts them in the state
    dict under `transformer.decoder.*` as well (official checkpoints hold those keys). `bbox_embed` None:
    the references stay the initial ones in every layer.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
                ratios: Tensor, query_pos: Tensor, padding_mask: Optional[Tensor] = None,
                self_attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """
        Args:
            tgt, query_pos: `[N, Q, C]`. reference_points: `[N, Q, 2]` (x, y) or `[N, Q, 4]` (cxcywh) in [0, 1]
                of the valid image. memory: `[N, S, C]`. spatial_shapes: `[L, 2]`. ratios: `[N, L, 2]` (w, h).
            padding_mask: `[N, S]` True on padding. self_attn_mask: `[Q, Q]` additive mask of the queries'
                self-attention (UP-DETR's groups), or None.
        Returns:
            (hs `[num_layers, N, Q, C]`, references after each layer `[num_layers, N, Q, 2 | 4]`).
        """
        out, outs, refs = tgt, [], []
        for i, layer in enumerate(self.layers):
            # valid-image coordinates -> coordinates of each padded level map
            scale = ratios if reference_points.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
            out = layer(out, query_pos, reference_points[:, :, None] * scale[:, None], memory, spatial_shapes,
                        padding_mask, self_attn_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[i](out)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:  # a point reference moves the centre; the size comes from the head alone
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                # detached: each layer learns its own correction, not the earlier layers' (the paper's choice)
                reference_points = refined.sigmoid().detach()
            outs.append(out)
            refs.append(reference_points)
        return torch.stack(outs), torch.stack(refs)
