"""Reading runs back from MLflow for `updetr compare`: which runs are the variants, and their values.

A reference is a run id, a sweep name (the parent run tagged `updetr.sweep`), a run name or an MLflow
experiment name, tried in that order. A sweep's parent run (tagged `updetr.sweep`) stands for its
children, the trials; any other run (a chain's parent, a single run) is one variant. Each variant's numbers come from its own metrics first, then
from its descendants (the stage runs of its chain), so a trial, a chain parent and a single-stage run all
compare.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

TAG_SWEEP = "updetr.sweep"          # on a sweep's parent run: the sweep name
TAG_TRIAL = "updetr.trial"          # on a sweep trial's run: the trial name (cell and seed)
TAG_CELL = "updetr.cell"            # on a sweep trial's run: the cell it replicates (the same for every seed)
TAG_SEED = "updetr.seed"            # on a replicate's run: its seed
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
_IDENTITY_PARAMS = {"name", "init.checkpoint", "tracking.experiment", "ray.run_name"}
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class QueryError(ValueError):
    """Nothing to compare: the message says what was looked for and where."""


@dataclass
class Variant:
    """One compared run and the runs below it (stage runs of a chain), newest-first per level."""

    run: Any                                        # mlflow.entities.Run
    descendants: list[Any] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run_id[:8]

    @property
    def params(self) -> dict[str, str]:
        """The run's params; a chain's parent (no params of its own) shows its stage runs' params as
        `<stage>.<key>` (the stage is the child run's name after `<parent name>-`). Keys that only say where
        a run lives (`name`, `init.checkpoint`, `tracking.experiment`) are left out: they differ by design."""
        own = {k: v for k, v in self.run.data.params.items() if k not in _IDENTITY_PARAMS}
        if own:
            return own
        out = {}
        prefix = self.name + "-"
        for run in self.descendants:
            if run.data.tags.get(TAG_PARENT) != self.run_id:
                continue
            stage = (run.info.run_name or "").removeprefix(prefix) or run.info.run_id[:8]
            out.update({f"{stage}.{k}": v for k, v in run.data.params.items() if k not in _IDENTITY_PARAMS})
        return out

    def runs(self) -> list[Any]:
        return [self.run, *self.descendants]

    def metric(self, key: str) -> Optional[float]:
        """Latest value of `key` on the run itself, else on the newest descendant that has it."""
        for run in self.runs():
            if key in run.data.metrics:
                return float(run.data.metrics[key])
        return None

    def metric_keys(self) -> set[str]:
        return {k for run in self.runs() for k in run.data.metrics}


@dataclass
class Group:
    """The runs of one cell that differ only by seed (a sweep's replicates: same `updetr.cell` tag under the
    same sweep run); a run outside such a cell is a group of one."""

    name: str
    variants: list[Variant]

    @property
    def params(self) -> dict[str, str]:
        """The first run's params without its seed (the seed is what the replicates vary)."""
        return {k: v for k, v in self.variants[0].params.items() if k != "seed" and not k.endswith(".seed")}

    def values(self, key: str) -> list[float]:
        return [x for x in (v.metric(key) for v in self.variants) if x is not None]

    def metric(self, key: str) -> Optional[float]:
        """The mean over the runs that have `key` (None when none has it)."""
        xs = self.values(key)
        return sum(xs) / len(xs) if xs else None

    def metric_keys(self) -> set[str]:
        return {k for v in self.variants for k in v.metric_keys()}


def _seed_of(variant: Variant) -> Optional[int]:
    raw = variant.run.data.tags.get(TAG_SEED, variant.run.data.params.get("seed"))
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def replicate_groups(variants: list[Variant]) -> list[Group]:
    """Variants grouped by cell (tag `updetr.cell` and the sweep run above them), in order of first appearance,
    each group's runs by seed; a variant without the tag is its own group. Only the tag groups: runs that merely
    look alike (same params) may differ in what was not logged, so they stay apart."""
    groups: dict[tuple, Group] = {}
    for v in variants:
        cell = v.run.data.tags.get(TAG_CELL)
        key = (v.run.data.tags.get(TAG_PARENT), cell) if cell else ("run", v.run_id)
        if key not in groups:
            seed = v.run.data.tags.get(TAG_SEED)
            name = v.name.removesuffix(f"_seed-{seed}") if cell and seed is not None else v.name
            groups[key] = Group(name, [])
        groups[key].variants.append(v)
    for g in groups.values():
        g.variants.sort(key=lambda v: (_seed_of(v) is None, _seed_of(v) or 0))
    return list(groups.values())


@dataclass
class Selection:
    title: str                       # what the user asked for, for messages and file names
    variants: list[Variant]
    parent: Optional[Any] = None     # the one parent run (a sweep) when the selection is its children


def _all_experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _search(client, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def children(client, run) -> list[Any]:
    runs = _search(client, [run.info.experiment_id], f"tags.`{TAG_PARENT}` = {_quote(run.info.run_id)}")
    return sorted(runs, key=lambda r: r.info.start_time or 0)      # oldest first: the order trials started


def descendants(client, run, depth: int = 3) -> list[Any]:
    out, level = [], [run]
    for _ in range(depth):
        level = [c for r in level for c in children(client, r)]
        out += level
        if not level:
            break
    return out


def _variants_of(client, runs: list[Any]) -> list[Variant]:
    return [Variant(r, descendants(client, r)) for r in runs]


def _expand(client, run, title: str) -> Selection:
    if TAG_SWEEP in run.data.tags:
        return Selection(title, _variants_of(client, children(client, run)), parent=run)
    return Selection(title, _variants_of(client, [run]))


def resolve(client, ref: str) -> Selection:
    """A run id, sweep name, run name or experiment name -> the runs to compare (see module doc)."""
    if _RUN_ID.match(ref):
        try:
            return _expand(client, client.get_run(ref), ref)
        except Exception:           # MlflowException: not a run id here; try the names below
            pass
    ids = _all_experiment_ids(client)
    for key in (TAG_SWEEP, TAG_RUN_NAME):
        found = _search(client, ids, f"tags.`{key}` = {_quote(ref)}")
        top = [r for r in found if TAG_PARENT not in r.data.tags]
        if key == TAG_SWEEP or top:      # a chain's parent and its stage may share a name: the parent
            found = top
        if found:
            return _expand(client, found[0], ref)            # newest
    exp = client.get_experiment_by_name(ref)
    if exp is not None:
        top = [r for r in _search(client, [exp.experiment_id]) if TAG_PARENT not in r.data.tags]
        if top:
            if len(top) == 1:
                return _expand(client, top[0], ref)
            return Selection(ref, _variants_of(client, sorted(top, key=lambda r: r.info.start_time or 0)))
    raise QueryError(f"no MLflow run, sweep, run name or experiment called '{ref}' with runs")


def by_tag(client, key: str, value: str) -> Selection:
    runs = _search(client, _all_experiment_ids(client), f"tags.`{key}` = {_quote(value)}")
    if not runs:
        raise QueryError(f"no MLflow run has tag {key}={value}")
    title = f"{key}={value}"
    if len(runs) == 1:
        return _expand(client, runs[0], title)
    return Selection(title, _variants_of(client, sorted(runs, key=lambda r: r.info.start_time or 0)))


def history(client, variant: Variant, key: str, prefer_task: Optional[str] = None) -> list[tuple[int, float]]:
    """(step, value) of `key` from the run of the variant's tree with the longest history of it; with
    `prefer_task`, runs whose `task` param is that task win (the pre-training stage's `loss`, not the
    fine-tuning stage's), and a variant whose runs name their tasks but not this one has no such curve (a
    from-scratch chain has no pre-training loss)."""
    tasks = {run.data.params.get("task") for run in variant.runs()} - {None}
    if prefer_task is not None and tasks and prefer_task not in tasks:
        return []
    best: list[tuple[int, float]] = []
    best_rank = (-1, -1)
    for run in variant.runs():
        if key not in run.data.metrics:
            continue
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        rank = (int(prefer_task is not None and run.data.params.get("task") == prefer_task), len(points))
        if rank > best_rank:
            best, best_rank = points, rank
    return best
