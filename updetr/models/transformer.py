"""DETR encoder-decoder transformer (pre- or post-norm) with positional encodings added at every layer.

Same module names and op order as DETR/UP-DETR's transformer.py, so official weights load strictly and
fp32 outputs agree to ~1e-6. UP-DETR's change is kept: `query_embed` arrives already as `[N, B, C]` and an
optional `decoder_mask` becomes the decoder self-attention `attn_mask`.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models.dropout import Dropout
from updetr.models.onednn import Linear, MultiheadAttention


def _with_pos(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "glu":
        return F.glu
    raise ValueError(f"activation should be relu/gelu/glu, not {name}")


def _dropout_plan(module: nn.Module, shape: tuple[int, ...]) -> Optional[list]:
    """[(shape, p)] for a dropout that will draw a bool mask, [] for one that draws nothing, None for one that
    would draw in another way (then no plan: the order of draws could not be kept)."""
    if module.p == 0.0:
        return []
    return [(shape, module.p)] if getattr(module, "bool_mask", False) and not module.inplace else None


def _attention_plan(attn: nn.Module, bsz: int, tgt_len: int, src_len: int) -> Optional[list]:
    """The attention weights' dropout `[B*H, L, S]` (our oneDNN + bool-mask path only, see `_dropout_plan`)."""
    if attn.dropout == 0.0:
        return []
    if not (getattr(attn, "onednn", False) and getattr(attn, "bool_mask", False)):
        return None
    return [((bsz * attn.num_heads, tgt_len, src_len), attn.dropout)]


def _join(parts: list) -> Optional[list]:
    return None if any(p is None for p in parts) else [x for p in parts for x in p]


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN; sequences are `[S, B, C]` (sequence first)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward_post(self, src: Tensor, src_mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor],
                     pos: Optional[Tensor]) -> Tensor:
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, value=src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
        src = src + self.dropout1(src2)
        src = self.norm1(src)
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        src = src + self.dropout2(src2)
        return self.norm2(src)

    def forward_pre(self, src: Tensor, src_mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor],
                    pos: Optional[Tensor]) -> Tensor:
        src2 = self.norm1(src)
        q = k = _with_pos(src2, pos)
        src2 = self.self_attn(q, k, value=src2, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
        src = src + self.dropout1(src2)
        src2 = self.norm2(src)
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src2))))
        return src + self.dropout2(src2)

    def dropout_plan(self, s: int, b: int) -> Optional[list]:
        """Dropout masks of one training forward on `[S, B, C]`, in call order (pre- and post-norm alike)."""
        e, f = self.linear1.in_features, self.linear1.out_features
        return _join([_attention_plan(self.self_attn, b, s, s), _dropout_plan(self.dropout1, (s, b, e)),
                      _dropout_plan(self.dropout, (s, b, f)), _dropout_plan(self.dropout2, (s, b, e))])

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            return self.forward_pre(src, src_mask, src_key_padding_mask, pos)
        return self.forward_post(src, src_mask, src_key_padding_mask, pos)


class TransformerDecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the memory, FFN; `[N, B, C]` sequence first."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward_post(self, tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                     pos, query_pos) -> Tensor:
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = tgt + self.dropout1(tgt2)
        tgt = self.norm1(tgt)
        tgt2 = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                   attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        tgt = tgt + self.dropout2(tgt2)
        tgt = self.norm2(tgt)
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        tgt = tgt + self.dropout3(tgt2)
        return self.norm3(tgt)

    def forward_pre(self, tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                    pos, query_pos) -> Tensor:
        tgt2 = self.norm1(tgt)
        q = k = _with_pos(tgt2, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt2, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = tgt + self.dropout1(tgt2)
        tgt2 = self.norm2(tgt)
        tgt2 = self.multihead_attn(query=_with_pos(tgt2, query_pos), key=_with_pos(memory, pos), value=memory,
                                   attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        tgt = tgt + self.dropout2(tgt2)
        tgt2 = self.norm3(tgt)
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt2))))
        return tgt + self.dropout3(tgt2)

    def dropout_plan(self, n: int, s: int, b: int) -> Optional[list]:
        """Dropout masks of one training forward of N queries over a memory of S, in call order."""
        e, f = self.linear1.in_features, self.linear1.out_features
        return _join([_attention_plan(self.self_attn, b, n, n), _dropout_plan(self.dropout1, (n, b, e)),
                      _attention_plan(self.multihead_attn, b, n, s), _dropout_plan(self.dropout2, (n, b, e)),
                      _dropout_plan(self.dropout, (n, b, f)), _dropout_plan(self.dropout3, (n, b, e))])

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        fwd = self.forward_pre if self.normalize_before else self.forward_post
        return fwd(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                   pos, query_pos)


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class TransformerEncoder(nn.Module):
    """Stack of encoder layers; `norm` (final LayerNorm) exists only for pre-norm, as in DETR."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    """Stack of decoder layers with a shared final `norm`; optionally returns every layer's normed output."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None,
                 return_intermediate: bool = False):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        """-> `[L, N, B, C]` with return_intermediate, else `[1, N, B, C]`."""
        output = tgt
        intermediate = []
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            if self.return_intermediate:
                intermediate.append(self.norm(output) if self.norm is not None else output)
        if self.norm is not None:
            output = self.norm(output)
            if self.return_intermediate:
                intermediate.pop()
                intermediate.append(output)
        if self.return_intermediate:
            return torch.stack(intermediate)
        return output.unsqueeze(0)


class Transformer(nn.Module):
    """DETR transformer. `forward(src, mask, query_embed, pos_embed, decoder_mask=None)` -> (hs, memory)."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False, return_intermediate_dec: bool = False):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def dropout_plan(self, s: int, b: int, n: int) -> Optional[list]:
        """Every dropout mask of one training forward (S = H*W of the feature map, B images, N queries) as
        (shape, p) in call order, or None when some dropout would draw its mask another way
        (`updetr.models.mask_prefetch`)."""
        return _join([layer.dropout_plan(s, b) for layer in self.encoder.layers] +
                     [layer.dropout_plan(n, s, b) for layer in self.decoder.layers])

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                decoder_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Encode the image feature map and decode the queries.

        Args:
            src: `[B, C, H, W]` projected feature map; mask: `[B, H, W]` bool, True on padding.
            query_embed: `[N, B, C]` decoder positional queries (object queries, plus patch features).
            pos_embed: `[B, C, H, W]` position encoding of src.
            decoder_mask: optional `[N, N]` decoder self-attention attn_mask: float (0 allowed / -inf
                blocked, added to the logits) or bool (True = blocked).
        Returns:
            hs `[L, B, N, C]` (L = decoder layers with return_intermediate_dec, else 1) and memory `[B, C, H, W]`.
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)

        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, tgt_mask=decoder_mask, memory_key_padding_mask=mask, pos=pos_embed,
                          query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


def build_transformer(hidden_dim: int, nheads: int, enc_layers: int, dec_layers: int, dim_feedforward: int,
                      dropout: float, pre_norm: bool) -> Transformer:
    """Transformer with return_intermediate_dec=True (needed for the auxiliary losses)."""
    return Transformer(d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
                       num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward, dropout=dropout,
                       normalize_before=pre_norm, return_intermediate_dec=True)
