"""Linear layers and multi-head attention whose matrix products run on oneDNN on CPU (`runtime.onednn_linear`).

Why: PyTorch sends a CPU fp32 `F.linear` (and the two products of its backward) to MKL's sgemm, which on
AMD processors runs a narrower code path; oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the kernel
PyTorch's own inductor uses on CPU) runs its AVX-512 kernels on any x86 CPU and is about 2x faster at the
transformer's shapes (README, Benchmarks). Same products, other summation order: rounding-level
differences only (tests/models/test_fast_path.py).

`Linear` and `MultiheadAttention` subclass the torch modules (same parameters, same state-dict keys, same
results with the flag off). With `onednn = True` they take the oneDNN path only where it applies (CPU, fp32,
no autocast) and fall back to torch's own forward everywhere else (CUDA, bf16, meta tensors).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models.dropout import dropout


def _dnn_matmul(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """oneDNN `a @ b.T (+ bias)`: a `[T, K]`, b `[N, K]` (any strides, transposed views included) -> `[T, N]`."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _DnnLinear(torch.autograd.Function):
    """y = x W^T + b with forward and both backward products on oneDNN. x `[T, K]`, W `[N, K]`, b `[N]`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dnn_matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = _dnn_matmul(grad, weight.t()) if need_x else None       # [T, N] @ [N, K]
        gw = None
        if need_w:  # [N, T] @ [T, K]; oneDNN copies a transposed input, so the smaller one goes there
            n, k = weight.shape
            gw = _dnn_matmul(x.t(), grad.t()).t() if n > k else _dnn_matmul(grad.t(), x.t())
        gb = grad.sum(0) if (need_b and ctx.has_bias) else None      # as addmm's backward: sum over rows
        return gx, gw, gb


def _applies(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu"))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], onednn: bool) -> Tensor:
    """`F.linear(x, weight, bias)` for x `[..., K]` -> `[..., N]`; on oneDNN when `onednn` and it applies."""
    if not (onednn and _applies(x, weight)):
        return F.linear(x, weight, bias)
    y = _DnnLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """`nn.Linear` that runs on oneDNN when `onednn` is set (`updetr.models.set_switches`)."""

    onednn = False

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.onednn)


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """bool (True = blocked) -> additive float mask (0 / -inf), as torch's `_canonical_mask`; float as is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class MultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` (sequence first, packed in-projection, no bias_k / zero-attention) whose four
    projections run on oneDNN when `onednn` is set. The attention itself is torch's `need_weights` path op for
    op (scaled q, baddbmm with the additive mask, softmax, dropout on the weights, bmm), so the dropout masks
    are drawn from the same generator in the same order as the reference module's."""

    onednn = False
    bool_mask = False  # the attention weights' dropout mask as bool (updetr.models.dropout)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not (self.onednn and _applies(query, self.in_proj_weight) and query.dim() == 3
                and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
                and not self.batch_first and not is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        tgt_len, bsz, embed = query.shape
        src_len, heads = key.shape[0], self.num_heads
        head_dim = embed // heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = linear(query, w_q, b_q, True).view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = linear(key, w_k, b_k, True).view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = linear(value, w_v, b_v, True).view(src_len, bsz * heads, head_dim).transpose(0, 1)
        # the additive mask [1 or B*H, L, S]: attn_mask (2-D, shared by every batch item and head) + padding
        mask = _float_mask(attn_mask, query.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if key_padding_mask is not None:
            pad = _float_mask(key_padding_mask, query.dtype).view(bsz, 1, 1, src_len)
            pad = pad.expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            mask = pad if mask is None else mask + pad
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if mask is not None:
            weights = torch.baddbmm(mask, q_scaled, k.transpose(-2, -1))  # [B*H, L, S]
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if self.training and self.dropout > 0.0:
            weights = dropout(weights, self.dropout, True, self.bool_mask)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed)  # [L*B, E]
        out = linear(out, self.out_proj.weight, self.out_proj.bias, True).view(tgt_len, bsz, embed)
        if not need_weights:
            return out, None
        weights = weights.view(bsz, heads, tgt_len, src_len)
        return out, (weights.mean(dim=1) if average_attn_weights else weights)
