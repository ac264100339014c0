"""DETR: CNN backbone + transformer + class/box heads over a fixed set of learned object queries."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn

from updetr.models.mlp import MLP
from updetr.models.onednn import Linear
from updetr.util.nested_tensor import NestedTensor, to_nested_tensor

Samples = Union[NestedTensor, Tensor, Sequence[Tensor]]


class DETR(nn.Module):
    """Detection transformer. Keys match facebookresearch/detr (`class_embed`, `bbox_embed.layers.{0,1,2}`,
    `query_embed`, `input_proj`, `backbone.0.body.*`, `transformer.*`)."""

    def __init__(self, backbone: nn.Module, transformer: nn.Module, num_classes: int, num_queries: int,
                 aux_loss: bool = False):
        """
        Args:
            backbone: Joiner (`.num_channels`); transformer: Transformer (`.d_model`).
            num_classes: object classes (max id + 1); the head adds one no-object logit.
            num_queries: object queries N. aux_loss: also return every intermediate decoder layer's outputs.
        """
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples: Samples) -> dict:
        """Images -> predictions.

        Args:
            samples: NestedTensor (`tensors [B,3,H,W]`, `mask [B,H,W]` True on padding), a 4-D tensor
                (no padding) or a list of `[3, H_i, W_i]` images.
        Returns:
            `pred_logits [B, N, K+1]`, `pred_boxes [B, N, 4]` (sigmoid cxcywh normalised by the unpadded image
            size), and with aux_loss `aux_outputs`: list of L-1 dicts with the same two keys.
        """
        samples = to_nested_tensor(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        assert mask is not None
        bs = src.shape[0]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        hs = self.transformer(self.input_proj(src), mask, query_embed, pos[-1])[0]
        return self._heads(hs)

    def _heads(self, hs: Tensor) -> dict:
        """`hs [L, B, N, C]` -> output dict of the last layer (+ aux_outputs of layers 0..L-2)."""
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        return out

    @torch.jit.unused
    def _set_aux_loss(self, outputs_class: Tensor, outputs_coord: Tensor) -> list[dict]:
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
