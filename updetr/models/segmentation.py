"""DETR's mask head for panoptic segmentation: an attention map per query over the encoder memory, refined
by a small FPN-style conv head on the backbone's layer1-3 maps; plus the mask losses (focal + dice).

Layer sizes follow facebookresearch/detr `models/segmentation.py` (`DETRsegm`, `MHAttentionMap`,
`MaskHeadSmallConv`), so the state-dict keys are the official ones (`detr.*`, `bbox_attention.*`,
`mask_head.*`) and an official panoptic checkpoint converts key for key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models.detr import DETR, Samples
from updetr.util.nested_tensor import to_nested_tensor


def _gn_groups(channels: int, wanted: int = 8) -> int:
    """DETR uses GroupNorm(8, C); narrow smoke models (hidden_dim < 128) get the largest divisor of C <= 8."""
    for g in range(min(wanted, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


ATTENTION_NORMS = ("per_head", "joint")


class MHAttentionMap(nn.Module):
    """Multi-head attention weights only (no values): softmax of q.k per query, over H x W for each head
    (`norm="per_head"`, UP-DETR's code) or jointly over heads x H x W (`norm="joint"`, DETR's code: one
    softmax across heads lets a head with large logits starve the others, facebookresearch/detr#247)."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 norm: str = "per_head"):
        super().__init__()
        if norm not in ATTENTION_NORMS:
            raise ValueError(f"norm '{norm}' is not one of {ATTENTION_NORMS}")
        self.norm = norm
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        self.k_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.scale = float(hidden_dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """`q [B, N, C]` (last decoder layer), `k [B, C, H, W]` (encoder memory), `mask [B, H, W]` True on
        padding -> weights `[B, N, heads, H, W]`: each (query, head) map sums to 1 over H x W (per_head), or each
        query's maps sum to 1 over heads x H x W (joint)."""
        b, n = q.shape[:2]
        h, w = k.shape[-2:]
        d = self.hidden_dim // self.num_heads
        qh = self.q_linear(q).view(b, n, self.num_heads, d)
        # the key projection applied per pixel, as a 1x1 convolution with the linear layer's weights
        kh = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        kh = kh.view(b, self.num_heads, d, h, w)
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.scale, kh)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        start = 3 if self.norm == "per_head" else 2  # flatten H x W, or heads x H x W, into the softmax dim
        weights = F.softmax(weights.flatten(start), dim=-1).view_as(weights)
        return self.dropout(weights)


class MaskHeadSmallConv(nn.Module):
    """Conv head (GroupNorm, ReLU) upsampling the attention maps FPN-style to stride 4: one mask logit map
    per (image, query)."""

    def __init__(self, dim: int, fpn_dims: tuple[int, int, int], context_dim: int):
        """
        Args:
            dim: input channels = hidden_dim + heads (projected memory concatenated with the attention maps).
            fpn_dims: channels of the backbone's layer3, layer2, layer1 maps (1024, 512, 256 for ResNet-50).
            context_dim: hidden_dim; the head narrows to context_dim / 2, / 4, / 8, / 16.
        """
        super().__init__()
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(_gn_groups(dim), dim)
        self.lay2 = nn.Conv2d(dim, inter[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(_gn_groups(inter[1]), inter[1])
        self.lay3 = nn.Conv2d(inter[1], inter[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(_gn_groups(inter[2]), inter[2])
        self.lay4 = nn.Conv2d(inter[2], inter[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(_gn_groups(inter[3]), inter[3])
        self.lay5 = nn.Conv2d(inter[3], inter[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(_gn_groups(inter[4]), inter[4])
        self.out_lay = nn.Conv2d(inter[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def _per_query(t: Tensor, n: int) -> Tensor:
        """`[B, C, H, W]` -> `[B*n, C, H, W]` (each image repeated for its n queries, image-major)."""
        return t.unsqueeze(1).expand(-1, n, -1, -1, -1).flatten(0, 1)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: list[Tensor]) -> Tensor:
        """`x [B, C, H, W]` projected layer4 map, `bbox_mask [B, N, heads, H, W]`, fpns = layer3, layer2,
        layer1 maps -> mask logits `[B*N, 1, H4, W4]` at layer1's resolution (stride 4)."""
        n = bbox_mask.shape[1]
        x = torch.cat([self._per_query(x, n), bbox_mask.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for adapter, lay, gn, fpn in ((self.adapter1, self.lay3, self.gn3, fpns[0]),
                                      (self.adapter2, self.lay4, self.gn4, fpns[1]),
                                      (self.adapter3, self.lay5, self.gn5, fpns[2])):
            cur = self._per_query(adapter(fpn), n)
            x = cur + F.interpolate(x, size=cur.shape[-2:], mode="nearest")
            x = F.relu(gn(lay(x)))
        return self.out_lay(x)


class DETRsegm(nn.Module):
    """A DETR (`self.detr`, built with a backbone that returns layer1-4) plus the mask head.

    `freeze_detr` (DETR's --frozen_weights) sets requires_grad False on every detector parameter before the
    head exists, so only `bbox_attention` and `mask_head` train and the detector stays bit-identical.
    `attention_norm`: see `MHAttentionMap` (per_head = UP-DETR's fix, joint = DETR's form).
    """

    def __init__(self, detr: DETR, freeze_detr: bool = True, attention_norm: str = "per_head"):
        super().__init__()
        self.detr = detr
        if freeze_detr:
            for p in self.parameters():
                p.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        cb = detr.backbone.num_channels  # layer4; layer3/2/1 have 1/2, 1/4, 1/8 of it (ResNet)
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0, norm=attention_norm)
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, (cb // 2, cb // 4, cb // 8), hidden_dim)

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    def forward(self, samples: Samples) -> dict:
        """Images -> DETR's outputs plus `pred_masks [B, N, H/4, W/4]` (mask logits of the padded batch)."""
        samples = to_nested_tensor(samples)
        features, pos = self.detr.backbone(samples)
        if len(features) < 4:
            raise ValueError("DETRsegm needs a backbone built with return_interm_layers=True (layer1-4 maps)")
        src, mask = features[-1].decompose()
        assert mask is not None
        bs = src.shape[0]
        src_proj = self.detr.input_proj(src)
        query = self.detr.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        hs, memory = self.detr.transformer(src_proj, mask, query, pos[-1])
        out = self.detr._heads(hs)
        bbox_mask = self.bbox_attention(hs[-1], memory, mask=mask)
        seg = self.mask_head(src_proj, bbox_mask,
                             [features[2].tensors, features[1].tensors, features[0].tensors])
        out["pred_masks"] = seg.view(bs, hs.shape[2], seg.shape[-2], seg.shape[-1])
        return out


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """Σ (1 - (2|p∩t| + 1) / (|p| + |t| + 1)) / num_boxes over masks; `inputs` logits `[T, P]`, targets 0/1."""
    p = inputs.sigmoid().flatten(1)
    numerator = 2 * (p * targets).sum(1)
    denominator = p.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """RetinaNet's focal loss per pixel, averaged over the pixels of each mask, summed / num_boxes.
    `inputs` logits `[T, P]`, targets 0/1 `[T, P]`; alpha < 0 disables the class balance."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes
