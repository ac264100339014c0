"""Experiments of several stages (`stages:`, e.g. pretrain -> finetune -> eval), one config each."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from updetr.config.base import ConfigError
from updetr.config.experiment import ExperimentConfig
from updetr.config.loading import _format_validation, _merge, _set_dotted, load_config, parse_overrides, resolve_dict
from updetr.config.task_defaults import inherit_pre_norm


STAGE_ACTIONS = ("train", "eval")


@dataclass(frozen=True)
class Stage:
    """One stage of an experiment: `train` (fit the task) or `eval` (score the previous stage's weights)."""

    name: str
    action: str
    cfg: ExperimentConfig


@dataclass(frozen=True)
class Experiment:
    """An experiment file resolved into its stages (one stage when the file has no `stages:`)."""

    name: str
    stages: tuple[Stage, ...]
    chained: bool


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> Experiment:
    """Read an experiment that may hold `stages:` (a chain such as pretrain -> finetune -> eval).

    Each stage is a mapping `{name, action: train | eval, ...diff}` merged over the file's shared settings;
    its config name becomes `<name>-<stage>` and, after the first stage, `init.checkpoint` defaults to
    `previous` (the previous stage's final checkpoint). An `eval` stage's diff goes over the previous
    stage's settings (it scores that stage's weights on that stage's evaluation split). Overrides `k=v` apply to every stage;
    `stages.<stage>.k=v` to one stage only; `name=X` renames the chain. A file without `stages:` is one `train` stage.
    """
    origin = str(path) if path is not None else "<defaults>"
    tree = resolve_dict(path, None)
    raw_stages = tree.pop("stages", None)
    if raw_stages is None:
        cfg = load_config(path, overrides)
        return Experiment(cfg.name, (Stage(cfg.task, "train", cfg),), False)
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{origin}: stages: must be a non-empty list of mappings with a name")
    pairs = parse_overrides(overrides)
    names = [s.get("name") if isinstance(s, dict) else None for s in raw_stages]
    for key, _ in pairs:
        if key.startswith("stages.") and key.split(".")[1] not in names:
            raise ConfigError(f"override {key}: no stage named '{key.split('.')[1]}' (stages: {names})")
    # `name=X` names the chain (its stages become X-<stage>), it does not set every stage's name to X
    renamed = [v for k, v in pairs if k == "name"]
    pairs = [(k, v) for k, v in pairs if k != "name"]
    base_name = str(renamed[-1] if renamed else tree.get("name", "experiment"))
    stages = []
    previous_tree: Optional[dict] = None
    for i, raw in enumerate(raw_stages):
        where = f"{origin}: stages.{i}"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ConfigError(f"{where}: each stage is a mapping with a non-empty `name`")
        raw = dict(raw)
        sname, action = raw.pop("name"), raw.pop("action", "train")
        if names.count(sname) > 1:
            raise ConfigError(f"{where}.name: stage name '{sname}' is used twice")
        if action not in STAGE_ACTIONS:
            raise ConfigError(f"{where}.action: '{action}' is not train | eval")
        # an eval stage scores the previous stage's weights on that stage's data: its diff goes over it
        over = previous_tree if action == "eval" and previous_tree is not None else tree
        if over is previous_tree:
            over = {k: v for k, v in over.items() if k != "init"}
        merged = copy.deepcopy(_merge(over, raw))  # overrides below must not reach the shared tree
        previous_tree = merged
        merged["name"] = f"{base_name}-{sname}"
        # one MLflow experiment per chain: the parent run and every stage's child run live together
        merged["tracking"] = {"experiment": base_name, **(merged.get("tracking") or {})}
        if i > 0 and not (merged.get("init") or {}).get("checkpoint"):
            merged.setdefault("init", {})
            merged["init"] = {**merged["init"], "checkpoint": "previous"}
        for key, value in pairs:
            if key.startswith("stages."):
                if key.split(".")[1] != sname:
                    continue
                key = ".".join(key.split(".")[2:])
            _set_dotted(merged, key, value)
        merged = inherit_pre_norm(merged, stages[-1].cfg.model.pre_norm if stages else None)
        try:
            cfg = ExperimentConfig.model_validate(merged)
        except ValidationError as e:
            raise ConfigError(_format_validation(e, f"{origin} (stage {sname})")) from None
        if i == 0 and cfg.init.checkpoint == "previous":
            raise ConfigError(f"{where}: init.checkpoint: 'previous' needs a stage before this one")
        if action == "eval" and i == 0 and not cfg.init.checkpoint:
            raise ConfigError(f"{where}: an eval stage needs weights: a stage before it or init.checkpoint")
        stages.append(Stage(sname, action, cfg))
    return Experiment(base_name, tuple(stages), True)
