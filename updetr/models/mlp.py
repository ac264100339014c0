"""The small feed-forward head DETR uses for boxes (and UP-DETR for feature alignment)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from updetr.models.onednn import Linear


class MLP(nn.Module):
    """`num_layers` Linear layers (`layers.{i}`) with ReLU between them: `[..., in] -> [..., out]`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x
