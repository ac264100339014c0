"""Sweep YAML: a base experiment, a grid of config fields, and options; expanded into validated cells.

```yaml
name: table5_frozen-cnn_feature-recon        # optional; default: the file's stem
experiment: ../chain_updetr-r50_in1k-15e_voc-150e.yaml   # relative to this file
overrides: {stages.pretrain.loss.eos_coef: M/N}          # fixed for every cell (optional)
grid:                                                    # cartesian product of dotted key -> values
  stages.pretrain.model.freeze_backbone: [false, true]
zip:                                                     # fields that vary together (equal lengths)
  stages.pretrain.pretext.num_patches: [1, 10]
variants:                                                # extra cells, e.g. another experiment
  - {name: detr-scratch, experiment: ../detect_detr-r50-scratch_voc_8xb2-150e.yaml}
  - {name: random-init, stages: [finetune, eval]}        # the same chain without its pre-training stage
options: {max_concurrent: 2, workers_per_trial: 1, metric: eval/AP, mode: max}
replicates: 3                                            # every cell over seeds 0, 1, 2 (or options.seeds)
```

Keys are the dotted overrides of `updetr run` (`stages.<stage>.k` scopes a key to one stage of a chain).
Every cell is resolved with `load_experiment` when the sweep is loaded, so an unknown field, a value of the
wrong type or an invalid combination (N not divisible by M) fails before any trial starts, naming the cell
and the field. Trial names are built from the cell's parameters only, so a re-run finds the same trials.

Replicates: with `replicates: n` or `options.seeds: [...]` every cell runs once per seed (the run's `seed`, which
every random draw of every stage derives from: data order, model init, augmentation, synthetic data). Such a
trial is named `<cell>_seed-<s>`; its `Cell.group` is the cell's own name, so tools group the seeds of a cell.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from updetr.config import (_LEGACY_STAGE, ConfigError, Experiment, ExperimentConfig, Stage, _format_validation, _read_yaml, load_experiment,
                           resolve_dict)

_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_TRIAL_NAME = 96
MAX_REPORTED = 3        # bad cells named in one error (a typo in a 32-cell grid fails every cell)


class SweepError(ValueError):
    """Bad sweep input; the message names the file, the cell and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EarlyStopping(_Strict):
    """ASHA early stopping of trials on a metric reported per epoch (Ray Tune `ASHAScheduler`)."""

    scheduler: Literal["asha"] = Field("asha", description="Only ASHA is offered.")
    metric: str = Field("eval/AP", description="Metric the scheduler compares: an `eval/*` metric of a "
                                                "fine-tuning stage or an `epoch/*` one (epoch/loss: pre-training loss).")
    mode: Literal["max", "min"] = Field("max", description="Whether higher or lower is better.")
    time_attr: Literal["epoch"] = Field("epoch", description="Counter the rungs are keyed on: the stage's epochs "
                                                            "done (Tune's own iteration count restarts on a resume).")
    grace_period: int = Field(1, gt=0, description="Epochs every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA halving rate.")
    max_t: Optional[int] = Field(None, gt=0, description="Last rung; None: the stage's epochs (the longest "
                                                         "over the cells).")
    stage: Optional[str] = Field(None, min_length=1, description="Stage whose per-epoch results are compared; "
                                 "None: the first detection training stage for eval/* metrics, else the first "
                                 "training stage.")


class SweepOptions(_Strict):
    """How trials run and how the summary ranks them."""

    max_concurrent: Optional[int] = Field(
        None, gt=0, description="Trials at once; None: as many as the cluster's free CPUs / GPUs hold.")
    workers_per_trial: Optional[int] = Field(
        None, gt=0, description="Ray Train workers per trial (ray.num_workers of every stage); None: the "
                                "experiment's own.")
    metric: str = Field("eval/AP", description="Metric of the summary table and of the best trial.")
    mode: Literal["max", "min"] = Field("max", description="Whether higher or lower `metric` is better.")
    early_stopping: Optional[EarlyStopping] = Field(None, description="Optional ASHA early stopping.")
    seeds: Optional[list[int]] = Field(None, min_length=1, description="Run every cell once per seed (the run's "
                                       "`seed`); None: once, with the experiment's own seed.")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"a seed is listed twice: {v}")
        return v


class Variant(_Strict):
    """An extra cell outside the grid (e.g. DETR from scratch next to the pre-trained models)."""

    name: str = Field(min_length=1, description="Trial name suffix of this cell.")
    experiment: Optional[str] = Field(None, description="Experiment file (relative to the sweep file); None: "
                                                        "the sweep's experiment.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted key -> value for this cell.")
    stages: Optional[list[str]] = Field(
        None, min_length=1, description="Run only these last stages of the chain (e.g. [finetune, eval]: "
                                        "fine-tuning from random init, no pre-training); None: every stage.")


class SweepSpec(_Strict):
    """The sweep file as written (before expansion)."""

    name: Optional[str] = Field(None, min_length=1, description="Sweep name; None: the file's stem.")
    experiment: str = Field(min_length=1, description="Base experiment file, relative to the sweep file.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted key -> value for every cell; a "
                                                                 "`stages.<s>.` key skips cells without stage s.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values (product).")
    zip: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted keys whose values go together.")
    variants: list[Variant] = Field(default_factory=list, description="Extra cells.")
    options: SweepOptions = Field(default_factory=SweepOptions, description="Trial resources and summary.")
    replicates: Optional[int] = Field(None, gt=0, description="Run every cell over seeds 0..n-1 (shorthand of "
                                                              "options.seeds); None: options.seeds or once.")

    @property
    def seeds(self) -> Optional[list[int]]:
        """The seeds every cell runs with, or None (one run per cell, the experiment's own seed)."""
        if self.options.seeds is not None:
            return list(self.options.seeds)
        return list(range(self.replicates)) if self.replicates else None

    @field_validator("grid", "zip")
    @classmethod
    def _non_empty_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
            if len(set(map(to_override_value, values))) != len(values):
                raise ValueError(f"{key}: a value is listed twice")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        lengths = {k: len(v) for k, v in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"zip: every key needs the same number of values, got {lengths}")
        keys = list(self.grid) + list(self.zip)
        for key in keys + list(self.overrides):
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"'{key}': not a dotted config key")
            if key == "name" or key.endswith(".name") and key.startswith("stages."):
                raise ValueError(f"{key}: names come from the sweep (trial names); do not sweep them")
        both = set(self.grid) & set(self.zip)
        if both:
            raise ValueError(f"{sorted(both)}: a key is in both grid and zip")
        if not keys and not self.variants:
            raise ValueError("grid / zip / variants: the sweep has no cells")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        if self.replicates and self.options.seeds is not None and len(self.options.seeds) != self.replicates:
            raise ValueError(f"replicates ({self.replicates}) and options.seeds ({self.options.seeds}) disagree; "
                             f"give one of them")
        if self.seeds is not None:
            seeded = [k for k in keys + list(self.overrides) + [k for v in self.variants for k in v.overrides]
                      if k == "seed" or k.startswith("stages.") and k.endswith(".seed") and k.count(".") == 2]
            if seeded:
                raise ValueError(f"{seeded[0]}: the seed comes from replicates / options.seeds; do not set it too")
        return self


def to_override_value(value: Any) -> str:
    """A YAML value as the text of a `key=value` override that parses back to the same value.

    JSON is YAML flow syntax except for floats like 1e-05, which YAML 1.1 (PyYAML) reads as strings: those
    get a mantissa dot (1.0e-05).
    """
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {to_override_value(v)}" for k, v in value.items()) + "}"
    raise SweepError(f"value {value!r}: unsupported type {type(value).__name__}")


def _slug(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _NAME_RE.sub("_", str(value)).strip("_") or "x"


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key -> its shortest dotted suffix that no other key shares (`pretext.num_patches`
    -> `num_patches` unless another key also ends in `num_patches`)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


def trial_name(params: dict[str, Any], labels: dict[str, str]) -> str:
    """Deterministic trial name from the cell's parameters, e.g. `freeze_backbone-true_feature_recon-false`;
    a name over MAX_TRIAL_NAME characters is cut and ends in a hash of the full one."""
    name = "_".join(f"{labels[k]}-{_slug(v)}" for k, v in params.items())
    if len(name) > MAX_TRIAL_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name[:MAX_TRIAL_NAME - 9].rstrip("_-.") + "-" + digest
    return name


@dataclass(frozen=True)
class Cell:
    """One trial of a sweep: its name, the parameters that define it, and the resolved experiment."""

    name: str                     # trial name (unique in the sweep, derived from `params` only)
    params: dict[str, Any]        # dotted key -> value: the grid / zip values, or a variant's overrides
    experiment_path: Path         # the experiment file it runs
    overrides: tuple[str, ...]    # every `key=value` applied to that file, in order
    experiment: Experiment        # resolved and validated
    group: str = ""               # the cell without its seed (replicates share it); "" -> name
    seed: Optional[int] = None    # the replicate's seed (also in params as `seed`), None without replicates

    @property
    def cell(self) -> str:
        """The cell this trial replicates (its name without the seed)."""
        return self.group or self.name


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    spec: SweepSpec
    cells: tuple[Cell, ...]

    def trial(self, cell: Cell) -> Experiment:
        """The cell's experiment as a trial of this sweep: named `<sweep>-<trial>` (stages
        `<sweep>-<trial>-<stage>`), tracked in the sweep's MLflow experiment. Everything a run derives from its
        name (run folder, Ray Train storage, chain state, the Ray Data epoch clock) is then the trial's own, so
        concurrent trials share nothing mutable, and a re-run finds the same trial again."""
        name = f"{self.name}-{cell.name}"
        stages = []
        for st in cell.experiment.stages:
            stage_name = f"{name}-{st.name}" if cell.experiment.chained else name
            tracking = st.cfg.tracking.model_copy(update={"experiment": self.name})
            stages.append(Stage(st.name, st.action, st.cfg.model_copy(update={"name": stage_name,
                                                                              "tracking": tracking})))
        return Experiment(name, tuple(stages), cell.experiment.chained)

    @property
    def varying_keys(self) -> list[str]:
        """Dotted keys that differ between cells (grid, zip and variant keys)."""
        keys: list[str] = []
        for cell in self.cells:
            keys += [k for k in cell.params if k not in keys]
        return keys


def _pairs(mapping: dict[str, Any]) -> list[str]:
    return [f"{k}={to_override_value(v)}" for k, v in mapping.items()]


def stage_names(exp_path: Path) -> tuple[list[str], bool]:
    """(stage names, chained) of an experiment file, read before validation."""
    tree = resolve_dict(exp_path)
    stages = tree.get("stages")
    if isinstance(stages, list):
        return [s.get("name") for s in stages if isinstance(s, dict)], True
    default = ExperimentConfig.model_fields["task"].default
    task = tree.get("task") or _LEGACY_STAGE.get(tree.get("stage"), default)
    return [str(task)], False


def scope_overrides(items: list[str], stages: list[str], chained: bool, strict: bool) -> list[str]:
    """Fit `stages.<stage>.k=v` items to one experiment: on a single-stage experiment, `stages.<its
    stage>.k` becomes `k`; an item for a stage the experiment lacks is dropped (sweep-wide settings such as
    `stages.pretrain.*` do not reach a from-scratch variant) or, when `strict`, left for the loader to reject."""
    out = []
    for item in items:
        key = item.partition("=")[0]
        if key.startswith("stages.") and key.count(".") >= 2:
            stage = key.split(".")[1]
            if stage not in stages:
                if strict:
                    out.append(item)
                continue
            if not chained:
                item = item.split(".", 2)[2]
        out.append(item)
    return out


def tail_stages(exp: Experiment, keep: list[str]) -> Experiment:
    """The chain's last stages `keep` (a variant without the chain's first stages, e.g. fine-tuning from random
    init without pre-training). The first kept stage loses `init.checkpoint: previous` (its previous stage is
    not run); its settings are otherwise those of the full chain, so the two trials differ only in that."""
    names = [s.name for s in exp.stages]
    if not exp.chained or keep != names[len(names) - len(keep):]:
        raise ConfigError(f"stages: {keep} must be the last stages of the chain, in order (stages: {names})")
    kept = list(exp.stages[len(names) - len(keep):])
    first = kept[0]
    if first.action == "eval":
        raise ConfigError(f"stages: the first stage run ({first.name}) is an eval stage: it needs the weights of "
                          f"a stage before it")
    if first.cfg.init.checkpoint == "previous":
        init = first.cfg.init.model_copy(update={"checkpoint": None})
        kept[0] = Stage(first.name, first.action, first.cfg.model_copy(update={"init": init}))
    return Experiment(exp.name, tuple(kept), True)


def _grid_params(spec: SweepSpec) -> list[dict[str, Any]]:
    axes: list[list[dict[str, Any]]] = [[{key: v} for v in values] for key, values in spec.grid.items()]
    if spec.zip:
        n = len(next(iter(spec.zip.values())))
        axes.append([{key: values[i] for key, values in spec.zip.items()} for i in range(n)])
    if not axes:
        return []
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def load_sweep(path: str | Path, overrides: Optional[list[str]] = None, name: Optional[str] = None) -> Sweep:
    """Read a sweep file and resolve every cell.

    Args:
        path: the sweep YAML.
        overrides: `key=value` applied to every cell after the sweep's own (e.g. smoke-sized settings).
        name: sweep name instead of the file's `name:` / stem.
    Returns:
        the `Sweep`, its cells in grid order (last key fastest), then the variants.
    Raises:
        SweepError: naming the file, the cell and the field.
    """
    path = Path(path)
    try:
        raw = _read_yaml(path)
        spec = SweepSpec.model_validate(raw)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    except ValidationError as e:
        raise SweepError(_format_validation(e, str(path))) from None
    sweep_name = _slug(name or spec.name or path.stem)
    base_path = (path.parent / spec.experiment)
    grid = _grid_params(spec)
    labels = short_keys(list(spec.grid) + list(spec.zip))
    plans: list[tuple[str, dict[str, Any], Path, Optional[list[str]]]] = [
        (trial_name(p, labels), p, base_path, None) for p in grid]
    for v in spec.variants:
        plans.append((_slug(v.name), dict(v.overrides),
                      (path.parent / v.experiment) if v.experiment else base_path, v.stages))
    seen = [p[0] for p in plans]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise SweepError(f"{path}: two cells get the same trial name {dupes}; rename a variant")
    seeds = spec.seeds
    if seeds is not None:
        if any(p.partition("=")[0] == "seed" for p in overrides or []):
            raise SweepError(f"{path}: override seed=...: the seeds come from replicates / options.seeds")
        # seed-major: with trials 2 at a time, every cell gets its first seeds before any cell its last
        plans = [(f"{trial}_seed-{s}", {**params, "seed": s}, exp_path, keep, trial, s)
                 for s in seeds for trial, params, exp_path, keep in plans]
    else:
        plans = [(*p, "", None) for p in plans]
    fixed = _pairs(spec.overrides)
    if spec.options.workers_per_trial:
        fixed.append(f"ray.num_workers={spec.options.workers_per_trial}")
    cells, failures = [], []
    for trial, params, exp_path, keep, group, seed in plans:
        where = f"{path}: cell {trial}"
        if not exp_path.is_file():
            raise SweepError(f"{where}: experiment: {exp_path}: no such file")
        try:
            stages, chained = stage_names(exp_path)
            items = tuple(scope_overrides(fixed, stages, chained, strict=False)
                          + scope_overrides(_pairs(params), stages, chained, strict=True)
                          + scope_overrides(list(overrides or []), stages, chained, strict=False))
            exp = load_experiment(exp_path, list(items))
            if keep is not None:
                exp = tail_stages(exp, keep)
        except ConfigError as e:
            failures.append("\n".join(f"{where}: {line}" for line in str(e).splitlines()))
            continue
        cells.append(Cell(trial, params, exp_path, items, exp, group, seed))
    if failures:
        more = f"\n{path}: ... and {len(failures) - MAX_REPORTED} more cells fail" if len(failures) > MAX_REPORTED else ""
        raise SweepError("\n".join(failures[:MAX_REPORTED]) + more)
    known = {s.name for c in cells for s in c.experiment.stages}
    for item in fixed + list(overrides or []):
        key = item.partition("=")[0]
        if key.startswith("stages.") and key.count(".") >= 2 and key.split(".")[1] not in known:
            raise SweepError(f"{path}: override {item}: no cell has a stage named '{key.split('.')[1]}' "
                             f"(stages: {sorted(known)})")
    es = spec.options.early_stopping
    trains = {s.name for c in cells for s in c.experiment.stages if s.action == "train"}
    if es is not None and es.stage is not None and es.stage not in trains:
        raise SweepError(f"{path}: options.early_stopping.stage: no cell has a training stage named '{es.stage}' "
                         f"(training stages: {sorted(trains)})")
    return Sweep(sweep_name, path, spec, tuple(cells))


def is_sweep_file(path: str | Path) -> bool:
    """A sweep YAML names an `experiment:` at the top level (an experiment file cannot: it is no config field)."""
    try:
        return "experiment" in _read_yaml(Path(path))
    except ConfigError:
        return False


def source_files(sweep: Sweep) -> list[Path]:
    """Every file the sweep reads: the sweep YAML, its experiment files and their `base:` files (what a Ray Job
    of the sweep must carry), resolved, sweep file first."""
    files = [sweep.path.resolve()]
    for cell in sweep.cells:
        exp = cell.experiment_path.resolve()
        base = _read_yaml(exp).get("base")
        for f in (exp, (exp.parent / str(base)).resolve() if base else None):
            if f is not None and f not in files:
                files.append(f)
    return files
