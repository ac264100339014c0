"""The official defaults of Deformable DETR (fundamentalvision/Deformable-DETR `main.py`), filled into a raw
experiment mapping whose `model.detector` is deformable_detr before the per-task defaults and validation:

| field                     | DETR default (unchanged) | deformable_detr          |
|---------------------------|--------------------------|--------------------------|
| model.num_queries         | 100                      | 300                      |
| model.dim_feedforward     | 2048                     | 1024                     |
| model.pre_norm            | per task                 | False (post-norm only)   |
| loss.ce / set_cost_class  | 1 / 1                    | 2 / 2 (1 / 1 with pretext.classification: softmax) |
| optim.lr_backbone         | per task                 | 2e-5                     |
| schedule.epochs / lr_drop | 60 / 40                  | 50 / 40                  |

`optim.lr` depends on the task as well (2e-4 for detection, 1e-4 for pre-training): updetr.tasks.defaults.
Deformable DETR's own fields (`model.num_feature_levels`, ..., `loss.focal_alpha`, `optim.lr_linear_proj_mult`)
carry their official values as plain defaults. Only fields left unset (absent or null) are filled; every
explicit value wins. A mapping without `model.detector: deformable_detr` passes through untouched.
"""
from __future__ import annotations

from typing import Any

DEFORMABLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"num_queries": 300, "dim_feedforward": 1024, "pre_norm": False},
    "loss": {"ce": 2.0, "set_cost_class": 2.0},
    "optim": {"lr_backbone": 2e-5},
    "schedule": {"epochs": 50, "lr_drop": 40},
}


def resolve_detector_defaults(data: Any) -> Any:
    """Fill the unset fields of the table above when `model.detector` is deformable_detr. Sections of the
    wrong type pass through untouched so that the field checks report them."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or \
            data["model"].get("detector") != "deformable_detr":
        return data
    out = dict(data)
    table = dict(DEFORMABLE_DEFAULTS)
    pretext = data.get("pretext")
    if isinstance(pretext, dict) and pretext.get("classification") == "softmax":
        # UP-DETR's softmax on Deformable DETR keeps DETR's class weights (Siamese DETR's port: 1 / 5 / 2)
        table["loss"] = {"ce": 1.0, "set_cost_class": 1.0}
    for section, defaults in table.items():
        value = out.get(section)
        if value is not None and not isinstance(value, dict):
            return data
        filled = dict(value or {})
        for key, default in defaults.items():
            if filled.get(key) is None:
                filled[key] = default
        out[section] = filled
    return out
