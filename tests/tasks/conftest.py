"""A tiny synthetic COCO set and tiny detect / pretrain configs (ResNet-18, width 32, N=10)."""
from __future__ import annotations

import pytest

from updetr.config import load_config
from updetr.data.synthetic import write_coco_dataset

TINY = ["model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=2", "model.enc_layers=1",
        "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=10", "model.dropout=0.0",
        "pretext.num_patches=2", "pretext.patch_size=32", "runtime.device=cpu", "tracking.enabled=false",
        "detection.scales=[96,128]", "detection.max_size=200", "detection.crop_resize=[80,96]",
        "detection.crop_min=64", "detection.crop_max=96", "detection.eval_size=112", "data.num_workers=0"]


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinycoco")
    write_coco_dataset(root, 8, seed=3, split="train")
    write_coco_dataset(root, 7, seed=4, split="val")  # odd: two ranks get unequal parts
    return root


def detect_cfg(root, *extra):
    # pre-norm and a frozen CNN, explicitly: these runs load tiny pre-training checkpoints (pre-norm) by hand,
    # and the tiny CNN stays frozen to keep them fast (per-task defaults: post-norm, layers 2-4 trained)
    return load_config(None, TINY + ["task=detect", "data.source=coco", f"data.path={root}", "model.pre_norm=true",
                                     "model.freeze_backbone=true"] + list(extra))


def pretrain_cfg(*extra):
    return load_config(None, TINY + list(extra))
