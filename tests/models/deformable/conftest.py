"""Tiny Deformable DETR configurations (CPU, seconds per test)."""
from __future__ import annotations

from updetr.config import load_config

TINY_DEFORMABLE = ["task=detect", "data.source=coco", "data.path=/nonexistent", "model.num_classes=5",
                   "model.detector=deformable_detr", "model.backbone=resnet18", "model.hidden_dim=32",
                   "model.nheads=2", "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64",
                   "model.num_queries=12", "model.enc_n_points=2", "model.dec_n_points=2", "tracking.enabled=false"]


def tiny_deformable_cfg(*overrides: str):
    """Detection with a ResNet-18, width 32, 2 heads, 1 encoder / 2 decoder layers, 12 queries, 4 levels."""
    return load_config(None, TINY_DEFORMABLE + list(overrides))
