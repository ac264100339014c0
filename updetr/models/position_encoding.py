"""2-D positional encodings of a feature map: DETR's normalised sine and learned row/column embeddings."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from updetr.util.nested_tensor import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the (optionally normalised) cumulative pixel position, ignoring padding.

    Output `[B, 2 * num_pos_feats, H, W]` = cat(pos_y, pos_x) along channels, each with sin on even and
    cos on odd channels interleaved; identical op order to DETR's `PositionEmbeddingSine`.
    `offset` is added to the cumulative position before normalising: Deformable DETR uses -0.5 (the pixel
    centre), DETR 0.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None, offset: float = 0.0):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """`tensor_list.tensors [B, C, H, W]`, `mask [B, H, W]` (True = padding) -> `[B, 2F, H, W]`."""
        x = tensor_list.tensors
        mask = tensor_list.mask
        assert mask is not None
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            if self.offset:
                y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
                x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
            else:
                y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
                x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Absolute learned embedding: `row_embed`/`col_embed` = Embedding(50, num_pos_feats) (maps up to 50x50)."""

    def __init__(self, num_pos_feats: int = 256, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """`[B, C, H, W]` feature map (H, W <= 50) -> `[B, 2F, H, W]` = cat(col(x), row(y))."""
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        limit = self.row_embed.num_embeddings
        if h > limit or w > limit:
            raise ValueError(f"learned position embedding supports feature maps up to {limit}x{limit}, "
                             f"got {h}x{w}")
        i = torch.arange(w, device=x.device)
        j = torch.arange(h, device=x.device)
        x_emb = self.col_embed(i)
        y_emb = self.row_embed(j)
        pos = torch.cat([
            x_emb.unsqueeze(0).repeat(h, 1, 1),
            y_emb.unsqueeze(1).repeat(1, w, 1),
        ], dim=-1).permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)
        return pos


def build_position_encoding(kind: str, hidden_dim: int, sine_offset: float = 0.0) -> nn.Module:
    """'sine' (normalised, 2*pi, T=10000; `sine_offset` added before normalising) or 'learned', with
    hidden_dim // 2 features per axis."""
    if hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even for a 2-D position encoding, got {hidden_dim}")
    n_steps = hidden_dim // 2
    if kind == "sine":
        return PositionEmbeddingSine(n_steps, normalize=True, offset=sine_offset)
    if kind == "learned":
        return PositionEmbeddingLearned(n_steps)
    raise ValueError(f"unknown position_embedding '{kind}' (expected 'sine' or 'learned')")
