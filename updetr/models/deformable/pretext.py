"""UP-DETR's random query patch detection on Deformable DETR: each image's query patches enter the decoder
through the position half of the queries, one group of queries per patch."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from updetr.models.deformable.levels import project_levels
from updetr.models.deformable.model import DeformableDETR
from updetr.models.deformable.transformer import DeformableTransformer
from updetr.models.mlp import MLP
from updetr.models.onednn import Linear
from updetr.models.updetr import build_group_attention_mask, patch_keep_mask
from updetr.util.nested_tensor import to_nested_tensor


class DeformableUPDETR(DeformableDETR):
    """Deformable DETR (plain or box refinement) plus the query-patch branch. Extra keys: `patch2query.*`,
    `feature_align.layers.{0,1}.*` (with feature_recon); the group mask is a non-persistent buffer.

    Choices (docs/detectors.md):
    - the patch feature is the concatenated global average of every map the CNN returns (C3-C5: 512 + 1024 +
      2048 = 3584 for ResNet-50; C5 alone with one feature level), and it is also the reconstruction target;
    - `patch2query(feature)` is added, per image, to the *position* half of the learned queries; the content
      half stays learned. The position half also makes the reference points, so the patches steer where the
      queries look;
    - the group mask goes into the decoder's query self-attention, the only place where queries meet.

    Args (beyond DeformableDETR's; two-stage has no learned queries to carry patches and is not offered):
        num_patches: query patches M per image; num_queries / M queries per patch.
        feature_recon: add `feature_align` and output pred_feature / gt_feature on every layer.
        query_shuffle: permute which learned queries go with which patch group (training only).
        attention_mask: block-diagonal group mask in the decoder's self-attention.
        patch_dropout, patch_dropout_mode: zero a patch feature in a query slot ('slot', official) or for a
            whole patch ('patch', paper) with this probability (`updetr.models.updetr.patch_keep_mask`).
        freeze_backbone: freeze the CNN (it then builds no autograd graph for images or patches).
    """

    def __init__(self, backbone: nn.Module, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 num_patches: int = 10, feature_recon: bool = True, query_shuffle: bool = False,
                 attention_mask: bool = True, patch_dropout: float = 0.1,
                 patch_dropout_mode: Literal["slot", "patch"] = "slot", freeze_backbone: bool = True):
        super().__init__(backbone, transformer, num_classes, num_queries, num_feature_levels, aux_loss,
                         with_box_refine, two_stage=False)
        if num_queries % num_patches:
            raise ValueError(f"num_queries ({num_queries}) must be divisible by num_patches ({num_patches})")
        hidden_dim = transformer.d_model
        feature_dim = sum(backbone[0].layer_channels)
        self.patch2query = Linear(feature_dim, hidden_dim)
        if feature_recon:
            self.feature_align = MLP(hidden_dim, hidden_dim, feature_dim, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_patches = num_patches
        self.feature_recon = feature_recon
        self.query_shuffle = query_shuffle
        self.use_attention_mask = attention_mask
        self.patch_dropout = patch_dropout
        self.patch_dropout_mode = patch_dropout_mode
        if freeze_backbone:
            backbone[0].freeze()
        # rebuilt at construction, never loaded (as UPDETR's)
        self.register_buffer("attention_mask", build_group_attention_mask(num_queries, num_patches),
                             persistent=False)

    def forward(self, samples, patches: Tensor) -> dict:  # type: ignore[override]
        """Images + their query patches -> predictions.

        Args:
            samples: NestedTensor / 4-D tensor / list of `[3, H, W]` images (B of them).
            patches: `[B, M_b, 3, P, P]`; training needs M_b = M, eval accepts M_b <= M and then uses the
                first M_b * N / M queries.
        Returns:
            DeformableDETR's keys over N' queries, with feature_recon `pred_feature [B, N', Cf]` and
            `gt_feature [B * M_b, Cf]` (image-major) in the last layer's and every aux layer's dict.
        """
        samples = to_nested_tensor(samples)
        bs, batch_patches = patches.shape[:2]
        if batch_patches > self.num_patches or (self.training and batch_patches != self.num_patches):
            raise ValueError(f"got {batch_patches} patches per image; the model has num_patches={self.num_patches} "
                             "(training needs exactly that many, eval at most)")
        per = self.num_queries // self.num_patches
        weight = self.query_embed.weight
        if self.training:
            n = self.num_queries
            order = (torch.randperm(n, device=weight.device) if self.query_shuffle
                     else torch.arange(n, device=weight.device))
            keep = (patch_keep_mask(n, self.num_patches, bs, self.patch_dropout, self.patch_dropout_mode,
                                    device=patches.device) if self.patch_dropout > 0 else None)
        else:
            n = batch_patches * per
            order, keep = torch.arange(n, device=weight.device), None
        srcs, masks, pos = project_levels(self.backbone, self.input_proj, samples)
        patch_maps = self.backbone(patches.flatten(0, 1))                        # CNN maps of every patch
        gt_feature = torch.cat([self.avgpool(m).flatten(1) for m in patch_maps], 1)   # [B*M_b, Cf]
        # patch p feeds query slots [p*N/M, (p+1)*N/M) of its own image
        patch_query = self.patch2query(gt_feature).view(bs, batch_patches, -1).repeat_interleave(per, dim=1)
        if keep is not None:
            patch_query = patch_query * keep.permute(1, 0, 2)                   # [N, B, 1] -> [B, N, 1]
        query_pos, tgt = torch.split(weight[order], self.transformer.d_model, dim=1)
        query_embed = torch.cat([query_pos.unsqueeze(0) + patch_query, tgt.unsqueeze(0).expand(bs, -1, -1)], -1)
        group_mask = self.attention_mask[:n, :n] if self.use_attention_mask else None
        hs, init_reference, inter_references, _, _ = self.transformer(srcs, masks, pos, query_embed, group_mask)
        out = self._predict(hs, init_reference, inter_references)
        if self.feature_recon:
            features = self.feature_align(hs)
            layers = [out] + out.get("aux_outputs", [])
            for layer_out, feat in zip(layers, [features[-1]] + list(features[:-1])):
                layer_out["pred_feature"] = feat
                layer_out["gt_feature"] = gt_feature
        return out
