"""The official per-task defaults of `model.freeze_backbone`, `model.pre_norm` and `optim.lr_backbone`, as the official code
runs each task (reference: dddzg/up-detr `main.py` for pre-training, `detr_main.py` for detection):

| task                                  | freeze_backbone | pre_norm               | lr_backbone              |
|---------------------------------------|-----------------|------------------------|--------------------------|
| pretrain                              | True (--fre_cnn)| True (--pre_norm)      | optim.lr when not frozen (main.py: `lr_backbone = 0 if fre_cnn else lr`), else 1e-5 (unused) |
| detect / oneshot with init.checkpoint | False           | True (UP-DETR fine-tuning recipe: --pre_norm --pretrain) | 5e-5 (the recipe's --lr_backbone) |
| detect / oneshot from scratch         | False           | False (DETR)           | 1e-5 (DETR's default)    |
| panoptic                              | False           | False (DETR's panoptic recipe starts from a DETR detector) | 1e-5 (DETR's default) |

`optim.lr` with `model.detector: deformable_detr`: 2e-4 (Deformable DETR's main.py), 1e-4 for pretrain (UP-DETR's
and Siamese DETR's pre-training rate; deformable-notes §6.9). DETR keeps OptimConfig's 1e-4 default.

`eval.metric`: voc07 for oneshot (CoAE's protocol, Table 3), coco otherwise (Table 1: COCO-style AP on VOC).

A chained stage's inheritance of `pre_norm` is `updetr.config.task_defaults.inherit_pre_norm`.
Only fields left unset (absent or null) are filled; every explicit value wins.
"""
from __future__ import annotations

from typing import Any, Optional

# the field was called `stage` before tasks existed (config._LEGACY_STAGE)
_LEGACY = {"pretrain": "pretrain", "finetune": "detect"}
DEFAULT_LR = 1e-4          # OptimConfig.lr's default
DETR_LR_BACKBONE = 1e-5    # detr_main.py --lr_backbone default
UPDETR_LR_BACKBONE = 5e-5  # UP-DETR's fine-tuning recipe (README, after its issue #8)
DEFORMABLE_LR = 2e-4       # Deformable DETR main.py --lr
DEFORMABLE_PRETRAIN_LR = 1e-4


def _section(data: dict, key: str) -> dict:
    value = data.get(key)
    if hasattr(value, "model_dump"):  # a section passed as an already validated model
        return value.model_dump()
    return dict(value) if isinstance(value, dict) else {}


def resolve_task_defaults(data: Any) -> Any:
    """Fill unset `model.freeze_backbone`, `model.pre_norm`, `optim.lr_backbone`, `eval.metric` (and `optim.lr`
    of deformable_detr) of a raw mapping by its task and `init.checkpoint` (table above). Non-mappings and
    wrongly typed sections pass through untouched so that the field checks report them."""
    if not isinstance(data, dict):
        return data
    task = data.get("task") or _LEGACY.get(data.get("stage"), "pretrain")
    for key in ("model", "optim", "init"):
        value = data.get(key)
        if value is not None and not isinstance(value, dict) and not hasattr(value, "model_dump"):
            return data
    model, optim, init = _section(data, "model"), _section(data, "optim"), _section(data, "init")
    from_weights = bool(init.get("checkpoint"))
    if model.get("freeze_backbone") is None:
        model["freeze_backbone"] = task == "pretrain"
    if model.get("pre_norm") is None:
        # a panoptic run loads a detector, DETR's (post-norm) in DETR's recipe; the UP-DETR one sets pre_norm
        model["pre_norm"] = task == "pretrain" or (from_weights and task in ("detect", "oneshot"))
    if model.get("detector") == "deformable_detr" and optim.get("lr") is None:
        optim["lr"] = DEFORMABLE_PRETRAIN_LR if task == "pretrain" else DEFORMABLE_LR
    if optim.get("lr_backbone") is None:
        if task == "pretrain":
            optim["lr_backbone"] = DETR_LR_BACKBONE if model["freeze_backbone"] is True else \
                optim.get("lr", DEFAULT_LR)
        elif task in ("detect", "oneshot") and from_weights:
            optim["lr_backbone"] = UPDETR_LR_BACKBONE
        else:
            optim["lr_backbone"] = DETR_LR_BACKBONE
    evaluation = _section(data, "eval") if data.get("eval") is None or isinstance(data.get("eval"), dict) \
        or hasattr(data.get("eval"), "model_dump") else None
    if evaluation is not None and evaluation.get("metric") is None:
        # one-shot AP50 as CoAE and the paper's Table 3 report it; detection COCO-style as Table 1
        evaluation["metric"] = "voc07" if task == "oneshot" else "coco"
        return {**data, "model": model, "optim": optim, "eval": evaluation}
    return {**data, "model": model, "optim": optim}
