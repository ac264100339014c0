"""Detection training on the synthetic COCO set raises AP above the untrained model's (through the whole
path: DETR augmentation, the engine, PostProcess, pycocotools). Scored on the training images themselves,
4 of them, so that a few dozen CPU steps suffice: this checks that learning reaches the metric, not
generalisation."""
from __future__ import annotations

import shutil

import pytest
import torch

from updetr.data.synthetic import write_coco_dataset
from updetr.runner import evaluate_weights, setup, train
from updetr.tasks import get_task

from .conftest import detect_cfg


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_on_synthetic_coco_raises_ap_above_the_untrained_model(tmp_path):
    write_coco_dataset(tmp_path, 4, seed=5, split="train", size_range=(64, 80))
    shutil.copytree(tmp_path / "train", tmp_path / "val")
    shutil.copy(tmp_path / "annotations" / "instances_train.json", tmp_path / "annotations" / "instances_val.json")
    # no crop branch (crop_min above the image side), one scale: the 4 images stay whole
    cfg = detect_cfg(tmp_path, "model.freeze_backbone=false", "optim.lr=1e-3", "optim.lr_backbone=1e-4",
                     "detection.scales=[64]", "detection.crop_resize=[64]", "detection.crop_min=1000",
                     "detection.crop_max=1000", "detection.eval_size=64", "data.batch_size=4",
                     "schedule.epochs=100", "schedule.eval_every=0", "schedule.lr_drop=1000",
                     "schedule.checkpoint_every=100000", "runtime.threads=2")
    task = get_task(cfg)
    cfg = task.prepare()
    trainer, _ = setup(cfg, task, torch.device("cpu"))
    before = evaluate_weights(task, trainer.model, trainer.postprocessors, trainer.device)
    train(trainer, task, None)
    epoch, after = trainer.last_eval
    assert epoch == 100
    assert after["AP50"] >= 0.05 and after["AP50"] > before["AP50"], (before, after)
    assert after["AP"] > before["AP"], (before, after)
