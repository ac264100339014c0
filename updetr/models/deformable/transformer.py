"""The deformable transformer: flattens the levels, runs the encoder, chooses the queries (learned, or the
encoder's top-scoring proposals in two-stage mode) and runs the decoder."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from updetr.models.deformable.attention import MSDeformAttn
from updetr.models.deformable.decoder import DeformableDecoder, DeformableDecoderLayer
from updetr.models.deformable.encoder import DeformableEncoder, DeformableEncoderLayer
from updetr.models.deformable.geometry import encoder_proposals, proposal_pos_embed, valid_ratios
from updetr.models.onednn import Linear


class DeformableTransformer(nn.Module):
    """Encoder + decoder over L feature levels (official parameter names: `encoder`, `decoder`, `level_embed`,
    and `reference_points` or, two-stage, `enc_output(_norm)` / `pos_trans(_norm)`).

    Args:
        d_model: width C. nhead: heads. num_encoder_layers / num_decoder_layers: depth. dim_feedforward: FFN.
        dropout: dropout everywhere. num_feature_levels: L. enc_n_points / dec_n_points: sampling points.
        two_stage: queries from the encoder's proposals. two_stage_num_proposals: how many (= num_queries).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 enc_n_points: int = 4, dec_n_points: int = 4, two_stage: bool = False,
                 two_stage_num_proposals: int = 300):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.encoder = DeformableEncoder(DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                                nhead, enc_n_points), num_encoder_layers)
        self.decoder = DeformableDecoder(DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                                nhead, dec_n_points), num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = Linear(d_model, 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """xavier for every matrix, then the deformable attentions' own pattern, reference_points xavier with
        bias 0, level_embed ~ N(0, 1) (the official order, so seeded inits agree)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def _two_stage_queries(self, memory: Tensor, padding_mask: Tensor, spatial_shapes: Tensor):
        """Score a proposal per encoder token with the extra heads (`decoder.class_embed[-1]`,
        `decoder.bbox_embed[-1]`) and keep the top `two_stage_num_proposals` by their first logit.

        Returns (query_pos, tgt `[N, Q, C]`, reference boxes `[N, Q, 4]` (detached), encoder class logits
        `[N, S, K]`, encoder boxes before the sigmoid `[N, S, 4]`).
        """
        proposals, usable = encoder_proposals(padding_mask, spatial_shapes)
        tokens = memory.masked_fill(padding_mask[..., None], 0.0).masked_fill(~usable, 0.0)
        tokens = self.enc_output_norm(self.enc_output(tokens))
        n_heads = self.decoder.num_layers  # the heads after the decoder's are the encoder's
        enc_class = self.decoder.class_embed[n_heads](tokens)
        enc_coord_unact = self.decoder.bbox_embed[n_heads](tokens) + proposals
        top = torch.topk(enc_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
        boxes_unact = torch.gather(enc_coord_unact, 1, top.unsqueeze(-1).repeat(1, 1, 4)).detach()
        embedded = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(boxes_unact, self.d_model // 2)))
        query_pos, tgt = torch.split(embedded, self.d_model, dim=2)
        return query_pos, tgt, boxes_unact.sigmoid(), enc_class, enc_coord_unact

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Optional[Tensor] = None, self_attn_mask: Optional[Tensor] = None):
        """
        Args:
            srcs: L maps `[N, C, H_l, W_l]`. masks: L `[N, H_l, W_l]` (True on padding). pos_embeds: L
                `[N, C, H_l, W_l]`. query_embed: `[Q, 2C]` learned queries, position half first, content
                half second, or `[N, Q, 2C]` per image (UP-DETR adds each image's patch features to the
                position half); None in two-stage mode. self_attn_mask: `[Q, Q]` additive mask of the
                decoder's query self-attention, or None.
        Returns:
            hs `[D, N, Q, C]` (every decoder layer), initial references `[N, Q, 2 | 4]`, references after
            each layer `[D, N, Q, 2 | 4]`, and in two-stage mode the encoder's class logits `[N, S, K]` and
            boxes before the sigmoid `[N, S, 4]` (else None, None).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage")
        shapes = [src.shape[-2:] for src in srcs]
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)          # [N, S, C]
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)                             # [N, S]
        # the level embedding tells the encoder which level a token comes from
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos_embeds)], 1)
        spatial_shapes = [(h, w) for h, w in shapes]  # (H, W) per level, Python numbers (`level_shapes`)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)                            # [N, L, 2] (w, h)
        memory = self.encoder(src_flat, spatial_shapes, ratios, pos_flat, mask_flat)

        enc_class = enc_coord_unact = None
        if self.two_stage:
            query_pos, tgt, reference_points, enc_class, enc_coord_unact = self._two_stage_queries(
                memory, mask_flat, spatial_shapes)
        else:
            n = memory.shape[0]
            query_pos, tgt = torch.split(query_embed, self.d_model, dim=-1)
            if query_embed.dim() == 2:                                                      # shared by the batch
                query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
                tgt = tgt.unsqueeze(0).expand(n, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()                   # [N, Q, 2]
        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, ratios, query_pos,
                                            mask_flat, self_attn_mask)
        return hs, reference_points, inter_references, enc_class, enc_coord_unact
