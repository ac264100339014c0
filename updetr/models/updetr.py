"""UP-DETR: DETR pre-trained by random query patch detection (patch features added to object queries)."""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import Tensor, nn

from updetr.models import mask_prefetch
from updetr.models.detr import DETR, Samples
from updetr.models.mlp import MLP
from updetr.models.onednn import Linear
from updetr.util.nested_tensor import to_nested_tensor


def build_group_attention_mask(num_queries: int, num_patches: int) -> Tensor:
    """Block-diagonal decoder self-attention mask `[N, N]` float: 0 inside each patch's query group, -inf elsewhere.

    Group p = query slots `[p*N/M, (p+1)*N/M)`. The official code loops `range(N // M)` instead of
    `range(M)`, which is only right when N/M >= M; with e.g. N=100, M=20 it leaves 75 rows fully masked and the
    decoder outputs NaN. Here there is one block per patch, for every N divisible by M.
    """
    if num_patches <= 0 or num_queries % num_patches:
        raise ValueError(f"num_queries ({num_queries}) must be a positive multiple of num_patches ({num_patches})")
    per = num_queries // num_patches
    group = torch.arange(num_queries) // per  # query slot -> patch index
    other_group = group[:, None] != group[None, :]
    return torch.zeros(num_queries, num_queries).masked_fill_(other_group, float("-inf"))


def patch_keep_mask(num_queries: int, num_patches: int, batch_size: int, p: float,
                    mode: Literal["slot", "patch"], device=None) -> Tensor:
    """Bernoulli keep mask `[N, B, 1]` float (1 keep, 0 drop the patch feature) for query patch dropout.

    'slot' (official code): independent draw per (query slot, image). 'patch' (paper): one draw per
    (patch, image), shared by that patch's N/M slots.
    """
    if mode == "slot":
        return (torch.rand(num_queries, batch_size, 1, device=device) > p).float()
    if mode == "patch":
        keep = (torch.rand(num_patches, batch_size, 1, device=device) > p).float()
        return keep.repeat_interleave(num_queries // num_patches, dim=0)
    raise ValueError(f"patch_dropout_mode must be 'slot' or 'patch', got {mode!r}")


class UPDETR(DETR):
    """DETR plus the query-patch branch. Extra keys: `patch2query.*`, `feature_align.layers.{0,1}.*`
    (only with feature_recon); the group mask is a non-persistent buffer (not in the state_dict)."""

    def __init__(self, backbone: nn.Module, transformer: nn.Module, num_classes: int = 2, num_queries: int = 100,
                 aux_loss: bool = True, num_patches: int = 10, feature_recon: bool = True,
                 query_shuffle: bool = False, attention_mask: bool = True, patch_dropout: float = 0.1,
                 patch_dropout_mode: Literal["slot", "patch"] = "slot", freeze_backbone: bool = True):
        """
        Args (beyond DETR's):
            num_patches: query patches M per image; N/M queries per patch.
            feature_recon: add `feature_align` and output pred_feature / gt_feature.
            query_shuffle: permute which object-query rows go with which patch group (training only).
            attention_mask: block-diagonal group mask in decoder self-attention.
            patch_dropout: probability of zeroing a patch feature in a query slot (official mask_ratio 0.1).
            patch_dropout_mode: 'slot' (official) or 'patch' (paper), see `patch_keep_mask`.
            freeze_backbone: freeze the CNN; it then runs under no_grad for both branches.
        """
        super().__init__(backbone, transformer, num_classes, num_queries, aux_loss)
        if num_queries % num_patches:
            raise ValueError(f"num_queries ({num_queries}) must be divisible by num_patches ({num_patches})")
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {patch_dropout}")
        if patch_dropout_mode not in ("slot", "patch"):
            raise ValueError(f"patch_dropout_mode must be 'slot' or 'patch', got {patch_dropout_mode!r}")
        hidden_dim = transformer.d_model
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.patch2query = Linear(backbone.num_channels, hidden_dim)
        self.num_patches = num_patches
        self.feature_recon = feature_recon
        if feature_recon:
            self.feature_align = MLP(hidden_dim, hidden_dim, backbone.num_channels, 2)
        self.query_shuffle = query_shuffle
        self.use_attention_mask = attention_mask
        self.patch_dropout = patch_dropout
        self.patch_dropout_mode = patch_dropout_mode
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone[0].freeze()
        # Rebuilt at construction, never loaded: the official code keeps it out of the state_dict too.
        self.register_buffer("attention_mask", build_group_attention_mask(num_queries, num_patches),
                             persistent=False)

    prefetch_masks = False  # `runtime.prefetch_dropout_masks`, set by `updetr.models.apply_runtime_paths`

    def _mask_prefetch(self, images: Tensor, bs: int, n: int):
        """`MaskPrefetch` of this training forward's dropout masks (CPU fp32, 2+ threads, every dropout on the
        bool-mask path, a folded CNN: the one that hands its threads back between blocks), else a no-op."""
        if not (self.training and self.prefetch_masks and self.backbone[0].fold_bn and images.device.type == "cpu"
                and images.dtype == torch.float32 and torch.get_num_threads() > 1
                and not torch.is_autocast_enabled("cpu")):
            return contextlib.nullcontext()
        h, w = self.backbone[0].feature_size(*images.shape[-2:])
        plan = self.transformer.dropout_plan(h * w, bs, n)
        return mask_prefetch.MaskPrefetch(plan) if plan else contextlib.nullcontext()

    def forward(self, samples: Samples, patches: Tensor) -> dict:  # type: ignore[override]
        """Images + their query patches -> predictions.

        Args:
            samples: NestedTensor / 4-D tensor / list of `[3, H, W]` images (B of them).
            patches: `[B, M_b, 3, P, P]` query patches; training needs M_b = M, eval accepts M_b <= M and
                then uses only the first M_b*N/M queries.
        Returns:
            `pred_logits [B, N', K+1]`, `pred_boxes [B, N', 4]`, with feature_recon `pred_feature [B, N', Cb]`
            and `gt_feature [B*M_b, Cb]` (image-major), plus `aux_outputs` (L-1 dicts, same keys) with aux_loss.
        """
        samples = to_nested_tensor(samples)
        bs, batch_num_patches = patches.shape[:2]
        if batch_num_patches > self.num_patches or (self.training and batch_num_patches != self.num_patches):
            raise ValueError(f"got {batch_num_patches} patches per image; the model has num_patches="
                             f"{self.num_patches} (training needs exactly that many, eval at most)")
        per = self.num_queries // self.num_patches
        if self.training:
            # The step's own draws (query shuffle, patch dropout) come first: nothing between here and the
            # transformer draws, so the same values as drawing them after the CNN, and the transformer's
            # dropout masks can then be drawn while the CNN runs (`_mask_prefetch`).
            n = self.num_queries
            idx = (torch.randperm(n, device=self.query_embed.weight.device) if self.query_shuffle
                   else torch.arange(n, device=self.query_embed.weight.device))
            keep = (patch_keep_mask(n, self.num_patches, bs, self.patch_dropout, self.patch_dropout_mode,
                                    device=patches.device) if self.patch_dropout > 0 else None)
        else:
            n = batch_num_patches * per
            idx, keep = slice(0, n), None  # the first n queries, no patch dropout
        with self._mask_prefetch(samples.tensors, bs, n):
            # Both branches share the same CNN; when frozen it builds no autograd graph (the official code
            # relies on requires_grad=False only and still records the graph of the activations).
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
                features, pos = self.backbone(samples)
                patch_maps = self.backbone(patches.flatten(0, 1))
            mask_prefetch.cnn_done()
            src, mask = features[-1].decompose()
            assert mask is not None
            gt_feature = self.avgpool(patch_maps[-1]).flatten(1)  # [B*M_b, Cb], image-major

            # Patch p feeds query slots [p*N/M, (p+1)*N/M): repeat_interleave, not repeat.
            patch_feature = (self.patch2query(gt_feature)
                             .view(bs, batch_num_patches, -1)
                             .repeat_interleave(per, dim=1)
                             .permute(1, 0, 2)
                             .contiguous())  # [N', B, C]
            if keep is not None:
                patch_feature = patch_feature * keep
            query_pos = patch_feature + self.query_embed.weight[idx, :].unsqueeze(1).repeat(1, bs, 1)
            decoder_mask = self.attention_mask[:n, :n] if self.use_attention_mask else None
            hs = self.transformer(self.input_proj(src), mask, query_pos, pos[-1], decoder_mask)[0]

        out = self._heads(hs)
        if self.feature_recon:
            outputs_feature = self.feature_align(hs)
            out["pred_feature"] = outputs_feature[-1]
            out["gt_feature"] = gt_feature
            if self.aux_loss:
                for aux, feat in zip(out["aux_outputs"], outputs_feature[:-1]):
                    aux["pred_feature"] = feat
                    aux["gt_feature"] = gt_feature
        return out
