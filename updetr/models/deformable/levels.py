"""Deformable DETR's input levels: the ResNet's C3-C5 maps (strides 8, 16, 32) projected to the model width,
plus extra levels made by stride-2 3x3 convolutions (the first one reads raw C5: stride 64), each with its own
padding mask and position embedding."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models.backbone import Backbone, Joiner
from updetr.models.position_encoding import build_position_encoding
from updetr.util.nested_tensor import NestedTensor

# The sine embedding of Deformable DETR measures positions from pixel centres (cumsum - 0.5); DETR's does not.
SINE_OFFSET = -0.5


def build_multiscale_backbone(name: str, hidden_dim: int, num_feature_levels: int,
                              position_embedding: str = "sine", train_backbone: bool = False,
                              dilation: bool = False, weights: Optional[Union[str, Path]] = None,
                              fold_bn: bool = False, channels_last: bool = False) -> Joiner:
    """The CNN returning C3-C5 (or C5 alone for a single level) joined with the position embedding.
    `.layer_channels` of `joiner[0]` gives each map's channels (e.g. 512, 1024, 2048 for ResNet-50)."""
    layers = ("layer2", "layer3", "layer4") if num_feature_levels > 1 else ("layer4",)
    body = Backbone(name, train_backbone, dilation, weights, fold_bn=fold_bn, channels_last=channels_last,
                    layers=layers)
    return Joiner(body, build_position_encoding(position_embedding, hidden_dim, sine_offset=SINE_OFFSET))


def build_input_proj(layer_channels: list[int], hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
    """`input_proj.{l}` = Conv + GroupNorm(32): 1x1 for each backbone map, 3x3 stride 2 for each extra level
    (the first reads C5, the next ones the previous level). Conv weights xavier, bias 0."""
    if hidden_dim % 32:
        raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by 32 (GroupNorm(32) after input_proj)")
    if num_feature_levels < len(layer_channels):
        raise ValueError(f"num_feature_levels ({num_feature_levels}) is below the backbone's "
                         f"{len(layer_channels)} maps: 1 (C5) or >= 3 (C3-C5 + extra levels)")
    projs = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
             for c in layer_channels]
    in_channels = layer_channels[-1]
    for _ in range(num_feature_levels - len(layer_channels)):
        projs.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                   nn.GroupNorm(32, hidden_dim)))
        in_channels = hidden_dim
    for proj in projs:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projs)


def project_levels(backbone: Joiner, input_proj: nn.ModuleList, samples: NestedTensor
                   ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Images -> the L input levels of the transformer.

    Args:
        backbone: the Joiner of `build_multiscale_backbone`. input_proj: `build_input_proj`'s list.
        samples: images `[N, 3, H, W]` with their padding mask `[N, H, W]` (True on padding).
    Returns:
        (srcs: L maps `[N, C, H_l, W_l]`, masks: L `[N, H_l, W_l]`, pos: L `[N, C, H_l, W_l]`).
    """
    features, pos = backbone(samples)
    srcs, masks = [], []
    for proj, feature in zip(input_proj, features):
        src, mask = feature.decompose()
        assert mask is not None
        srcs.append(proj(src))
        masks.append(mask)
    pos = list(pos)
    for lvl in range(len(features), len(input_proj)):
        src = input_proj[lvl](features[-1].tensors if lvl == len(features) else srcs[-1])
        # the extra level's mask is the image mask resized (nearest), its embedding computed from that mask
        mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
        srcs.append(src)
        masks.append(mask)
        pos.append(backbone[1](NestedTensor(src, mask)).to(src.dtype))
    return srcs, masks, pos
