"""Task-neutral helpers of the per-task defaults (the table itself is `updetr.tasks.defaults`): a chained
stage inherits the transformer norm of the weights it loads, and whether a mapping sets `model.pre_norm`."""
from __future__ import annotations

from typing import Any, Optional


def inherit_pre_norm(merged: dict, previous_pre_norm: Optional[bool]) -> dict:
    """A chained stage loading the previous stage's weights gets its transformer norm when it sets none."""
    model = merged.get("model")
    if previous_pre_norm is None or (merged.get("init") or {}).get("checkpoint") != "previous":
        return merged
    if isinstance(model, dict) and model.get("pre_norm") is not None:
        return merged
    if model is not None and not isinstance(model, dict):
        return merged
    return {**merged, "model": {**(model or {}), "pre_norm": previous_pre_norm}}


def sets_pre_norm(tree: dict, overrides: Optional[list[str]] = None) -> bool:
    """Whether an experiment mapping (as read, `stages:` included) or its `k=v` overrides set model.pre_norm."""
    def in_model(d: Any) -> bool:
        return isinstance(d, dict) and isinstance(d.get("model"), dict) and d["model"].get("pre_norm") is not None

    stages = tree.get("stages") if isinstance(tree.get("stages"), list) else []
    return in_model(tree) or any(in_model(s) for s in stages) or \
        any(o.split("=", 1)[0].endswith("model.pre_norm") for o in overrides or [])
