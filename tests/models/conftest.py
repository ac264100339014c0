"""Tiny configurations and inputs shared by the model tests (CPU, seconds per test)."""
from __future__ import annotations

import pytest
import torch

from updetr.config import load_config

TINY = ["model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=20", "pretext.num_patches=4",
        "tracking.enabled=false"]


def tiny_cfg(*overrides: str):
    """Pre-training config with a ResNet-18, width 32, 1 encoder / 2 decoder layers, N=20, M=4."""
    return load_config(None, TINY + list(overrides))


def tiny_finetune_cfg(*overrides: str):
    return load_config(None, TINY + ["stage=finetune", "data.source=coco", "data.path=/nonexistent",
                                     "model.num_classes=5"] + list(overrides))


def make_targets(batch: int, num: int, label: int = 1, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        cxcy = torch.rand(num, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(num, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.full((num,), label, dtype=torch.int64), "boxes": torch.cat([cxcy, wh], 1)})
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
