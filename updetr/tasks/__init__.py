"""Tasks: what a run trains and how it is scored. The config names the task (`task:`); nothing else in
updetr branches on it: the rest asks the task's class (`task_class(name)`: its sources, config rules,
evaluator, ...; see `Task`). A task owns its model / criterion / postprocessors, its train and eval batches for
(rank, world size), its evaluator and how it initialises weights from a checkpoint.

    pretrain  random query patch detection (UP-DETR pre-training; no evaluation split)
    detect    DETR object detection: fine-tuning from pre-trained weights, or from scratch; COCO-style AP
    oneshot   one-shot detection on VOC (a query patch of a class from another image); AP50 per class, seen / unseen
    panoptic  DETR's mask head on a frozen detector (the detect stage's weights); PQ / SQ / RQ and AP^seg
"""
from __future__ import annotations

import importlib
from typing import Any, Union

from updetr.tasks.base import InitError, InitReport, Task

# name -> "module:Class" (imported when first asked for) or the class itself (`register_task`).
_REGISTRY: dict[str, Union[str, type[Task]]] = {
    "pretrain": "updetr.tasks.pretrain:PretrainTask", "detect": "updetr.tasks.detect:DetectTask",
    "oneshot": "updetr.tasks.oneshot:OneShotTask", "panoptic": "updetr.tasks.panoptic:PanopticTask"}


def register_task(cls: type[Task]) -> type[Task]:
    """Add a task class under its `name` (usable as a decorator); a config may then say `task: <name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a task needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> tuple[str, ...]:
    """Every registered task name, built-in ones first."""
    return tuple(_REGISTRY)


def task_class(name: str) -> type[Task]:
    """The class of task `name` (KeyError for an unknown name)."""
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(module), cls)
    return entry


def get_task(cfg: Any) -> Task:
    """The task object of `cfg` (`cfg.task` names it)."""
    return task_class(cfg.task)(cfg)


def build_model(cfg: Any):
    """(model, criterion, postprocessors) of `cfg`'s task, as `get_task(cfg).build()` gives them (for callers
    that only have a config; num_classes must be known from the config)."""
    return get_task(cfg).build()


__all__ = ["InitError", "InitReport", "Task", "build_model", "get_task", "register_task", "task_class", "task_names"]
