"""Reading an experiment: YAML with one `base:` file, dotted `key=value` overrides, validation into a
frozen `ExperimentConfig`; and back to plain dicts / YAML. Every error names the file, the field path
and the reason (`ConfigError`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from updetr.config.base import ConfigError
from updetr.config.experiment import ExperimentConfig


def _merge(base: dict, diff: dict) -> dict:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}={raw}: '{k}' is not a section")
        node = nxt
    # YAML parsing gives ints, floats, bools, null and lists the same types as in a file.
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, str]]:
    """`["a.b=1", ...]` -> `[("a.b", "1"), ...]`, with a clear error for a malformed item."""
    pairs = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected dotted key=value, e.g. schedule.epochs=2")
        pairs.append((key.strip(), value))
    return pairs


def _format_validation(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{origin}: {loc}: {msg}")
    return "\n".join(lines)


def resolve_dict(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The merged raw mapping (defaults not yet applied): base file, experiment file, overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        tree = _read_yaml(path)
        base = tree.pop("base", None)
        if base is not None:
            base_path = (path.parent / str(base)).resolve()
            base_tree = _read_yaml(base_path)
            if "base" in base_tree:
                raise ConfigError(f"{base_path}: base: a base file may not name another base (one level only)")
            tree = _merge(base_tree, tree)
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, merge and validate an experiment.

    Args:
        path: experiment YAML, or None for pure defaults.
        overrides: dotted `key=value` strings applied last (values parsed as YAML scalars / lists).
    Returns:
        the frozen `ExperimentConfig`.
    Raises:
        ConfigError: naming the file (or 'override'), the field path and the reason.
    """
    tree = resolve_dict(path, overrides)
    origin = str(path) if path is not None else "<defaults>"
    if "stages" in tree:
        raise ConfigError(f"{origin}: stages: a chained experiment holds one config per stage; this command "
                          "takes a single-stage experiment (`updetr run` / `debug` / `eval` / `config show` "
                          "read chains)")
    if overrides:
        origin += " (with overrides " + " ".join(overrides) + ")"
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, origin)) from None


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Plain, YAML-safe nested dict of a config (tuples become lists)."""
    return cfg.model_dump(mode="json")


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(data: dict) -> ExperimentConfig:
    """Rebuild a config saved with `config_to_dict` (e.g. from a checkpoint)."""
    return ExperimentConfig.model_validate(data)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists kept as values); used for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
