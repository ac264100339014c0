"""`DeformableDETR`: multi-scale levels -> deformable transformer -> sigmoid class logits and boxes predicted
relative to each query's reference point, for every decoder layer."""
from __future__ import annotations

import copy
import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from updetr.models.deformable.geometry import inverse_sigmoid
from updetr.models.deformable.levels import build_input_proj, project_levels
from updetr.models.deformable.transformer import DeformableTransformer
from updetr.models.mlp import MLP
from updetr.models.onednn import Linear
from updetr.util.nested_tensor import NestedTensor, to_nested_tensor

Samples = Union[NestedTensor, Tensor, Sequence[Tensor]]

PRIOR_PROB = 0.01  # focal-loss prior: every class starts at p = 0.01 (class bias -4.595)


class DeformableDETR(nn.Module):
    """Deformable DETR and its variants. Keys match fundamentalvision/Deformable-DETR: `backbone.0.body.*`,
    `input_proj.{l}.{0,1}`, `transformer.*`, `query_embed` (`[Q, 2C]`: position half, then content half;
    absent in two-stage), `class_embed.{i}`, `bbox_embed.{i}.layers.{0,1,2}`.

    Heads: one per decoder layer (+ one for the encoder's proposals in two-stage). Without box refinement
    the entries are the *same* module repeated (shared weights, official layout); with it they are
    independent copies, also registered under `transformer.decoder.bbox_embed` (and `class_embed` in
    two-stage), as in the official model.

    Args:
        backbone: `levels.build_multiscale_backbone`'s Joiner. transformer: DeformableTransformer.
        num_classes: sigmoid logits K (no no-object logit; COCO: 91 = max id + 1).
        num_queries: Q. num_feature_levels: L. aux_loss: return every decoder layer's outputs.
        with_box_refine: each decoder layer refines the previous layer's boxes. two_stage: queries from the
            encoder's top proposals.
    """

    def __init__(self, backbone: nn.Module, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False):
        super().__init__()
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.transformer = transformer
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        hidden_dim = transformer.d_model
        # modules are registered in the official order (transformer, heads, queries, input_proj, backbone), so
        # parameters enumerate alike and an official optimizer state lines up with ours
        class_embed = Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        with torch.no_grad():
            class_embed.bias.fill_(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
            nn.init.zeros_(bbox_embed.layers[-1].weight)
            nn.init.zeros_(bbox_embed.layers[-1].bias)
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            # only the first layer predicts a box from the bare reference point: start it small (sigmoid(-2))
            with torch.no_grad():
                self.bbox_embed[0].layers[-1].bias[2:].fill_(-2.0)
            transformer.decoder.bbox_embed = self.bbox_embed
        else:
            with torch.no_grad():
                bbox_embed.layers[-1].bias[2:].fill_(-2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
            # the references are already boxes: no size prior
            with torch.no_grad():
                for head in self.bbox_embed:
                    head.layers[-1].bias[2:].fill_(0.0)
        else:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.input_proj = build_input_proj(backbone[0].layer_channels, hidden_dim, num_feature_levels)
        self.backbone = backbone

    def forward(self, samples: Samples) -> dict:
        """Images -> predictions.

        Args:
            samples: NestedTensor (`tensors [N, 3, H, W]`, `mask [N, H, W]` True on padding), a 4-D tensor or
                a list of `[3, H_i, W_i]` images.
        Returns:
            `pred_logits [N, Q, K]` (sigmoid logits), `pred_boxes [N, Q, 4]` (cxcywh in [0, 1] of the unpadded
            image); with aux_loss `aux_outputs` (the D-1 earlier layers, same keys); in two-stage mode
            `enc_outputs` {`pred_logits [N, S, K]`, `pred_boxes [N, S, 4]`} of every encoder token.
        """
        samples = to_nested_tensor(samples)
        srcs, masks, pos = project_levels(self.backbone, self.input_proj, samples)
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed)
        out = self._predict(hs, init_reference, inter_references)
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out

    def _predict(self, hs: Tensor, init_reference: Tensor, inter_references: Tensor) -> dict:
        """Every decoder layer's `hs [D, N, Q, C]` and references -> the output dict (last layer + aux)."""
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                unact = delta + reference
            else:  # a point reference: the centre is relative to it, the size absolute
                unact = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(unact.sigmoid())
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out
