"""Unset freeze_backbone / pre_norm / lr_backbone resolve per task as the official code runs it: pre-training
frozen pre-norm, UP-DETR fine-tuning pre-norm with lr_backbone 5e-5, DETR from scratch post-norm with a
trainable CNN; chained stages keep the norm of the weights they load; explicit values always win."""
import textwrap

import pytest

from updetr.config import load_config, load_experiment
from updetr.tasks import build_model


def _cfg(*overrides):
    return load_config(None, list(overrides) + ["tracking.enabled=false"])


@pytest.mark.parametrize("task,source", [("detect", "synthetic_coco"), ("oneshot", "synthetic_voc")])
def test_detection_from_scratch_is_detr_trainable_cnn_post_norm(task, source):
    cfg = _cfg(f"task={task}", f"data.source={source}")
    assert cfg.model.freeze_backbone is False and cfg.model.pre_norm is False
    assert cfg.optim.lr_backbone == 1e-5


@pytest.mark.parametrize("task,source", [("detect", "synthetic_coco"), ("oneshot", "synthetic_voc")])
def test_finetuning_from_weights_is_updetr_recipe(task, source):
    cfg = _cfg(f"task={task}", f"data.source={source}", "init.checkpoint=ckpt.pt")
    assert cfg.model.freeze_backbone is False and cfg.model.pre_norm is True
    assert cfg.optim.lr_backbone == 5e-5


def test_pretraining_is_frozen_pre_norm_and_an_unfrozen_cnn_trains_at_lr():
    cfg = _cfg()
    assert cfg.task == "pretrain" and cfg.model.freeze_backbone is True and cfg.model.pre_norm is True
    unfrozen = _cfg("model.freeze_backbone=false", "optim.lr=2e-4")
    assert unfrozen.optim.lr_backbone == 2e-4  # main.py: lr_backbone = 0 if fre_cnn else lr


def test_explicit_values_win():
    cfg = _cfg("task=detect", "data.source=synthetic_coco", "model.freeze_backbone=true", "model.pre_norm=true",
               "optim.lr_backbone=3e-5")
    assert cfg.model.freeze_backbone is True and cfg.model.pre_norm is True and cfg.optim.lr_backbone == 3e-5
    legacy = _cfg("stage=finetune", "data.source=synthetic_coco")
    assert legacy.task == "detect" and legacy.model.freeze_backbone is False


def test_detect_default_trains_backbone_layers_2_to_4():
    cfg = _cfg("task=detect", "data.source=synthetic_coco", "model.backbone=resnet18", "model.num_classes=8",
               "model.enc_layers=1", "model.dec_layers=1", "model.dim_feedforward=32")
    model = build_model(cfg)[0]
    trains = {n.split(".")[3] for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad}
    assert trains == {"layer2", "layer3", "layer4"}
    assert not model.transformer.encoder.norm  # post-norm: no final encoder norm


def test_chain_stages_keep_the_norm_of_the_weights_they_load(tmp_path):
    scratch = tmp_path / "scratch.yaml"
    scratch.write_text(textwrap.dedent("""
        stages:
          - {name: finetune, task: detect, data: {source: synthetic_coco}}
          - {name: seg, task: panoptic, data: {source: synthetic_panoptic}}
          - {name: eval, action: eval}
        """))
    stages = {s.name: s.cfg for s in load_experiment(scratch).stages}
    assert [stages[n].model.pre_norm for n in ("finetune", "seg", "eval")] == [False, False, False]
    chain = tmp_path / "chain.yaml"
    chain.write_text(textwrap.dedent("""
        stages:
          - {name: pretrain, task: pretrain}
          - {name: finetune, task: detect, data: {source: synthetic_coco}}
        """))
    stages = {s.name: s.cfg for s in load_experiment(chain).stages}
    assert stages["pretrain"].model.freeze_backbone and stages["pretrain"].model.pre_norm
    assert not stages["finetune"].model.freeze_backbone and stages["finetune"].model.pre_norm
    assert stages["finetune"].optim.lr_backbone == 5e-5
