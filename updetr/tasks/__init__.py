"""Tasks: what a run trains and how it is scored. The config names the task (`task:`); nothing else in
updetr branches on it. A task owns its model / criterion / postprocessors, its train and eval batches for
(rank, world size), its evaluator and how it initialises weights from a checkpoint.

    pretrain  random query patch detection (UP-DETR pre-training; no evaluation split)
    detect    DETR object detection: fine-tuning from pre-trained weights, or from scratch; COCO-style AP
    oneshot   one-shot detection on VOC (a query patch of a class from another image); AP50 per class, seen / unseen
    panoptic  DETR's mask head on a frozen detector (the detect stage's weights); PQ / SQ / RQ and AP^seg
"""
from __future__ import annotations

from updetr.config import ExperimentConfig
from updetr.tasks.base import InitError, InitReport, Task

_REGISTRY = {"pretrain": "updetr.tasks.pretrain:PretrainTask", "detect": "updetr.tasks.detect:DetectTask",
             "oneshot": "updetr.tasks.oneshot:OneShotTask",
             "panoptic": "updetr.tasks.panoptic:PanopticTask"}


def get_task(cfg: ExperimentConfig) -> Task:
    """The task object of `cfg` (`cfg.task` names it)."""
    import importlib

    module, _, cls = _REGISTRY[cfg.task].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)


def build_model(cfg: ExperimentConfig):
    """(model, criterion, postprocessors) of `cfg`'s task, as `get_task(cfg).build()` gives them (for callers
    that only have a config; num_classes must be known from the config)."""
    return get_task(cfg).build()


__all__ = ["InitError", "InitReport", "Task", "build_model", "get_task"]
