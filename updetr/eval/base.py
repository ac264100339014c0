"""What every evaluator is: the interface the engine drives and the helpers its implementations share.

An evaluator is a plain accumulator so that it works the same in one process and under DDP: each rank
`add_batch`es its own images, `state()` is what a rank sends (ids first: the engine counts them), rank 0
`merge`s every rank's part and `summarize`s once (DETR's CocoEvaluator gathers the same way). COCO boxes
(`coco_eval`), one-shot AP50 (`oneshot_eval`) and panoptic PQ / AP^seg (`panoptic_eval`) implement it side
by side; none imports another.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


class EvalError(ValueError):
    """Evaluation cannot give a meaningful number (empty split, predictions for unknown images)."""


class Evaluator:
    """The evaluator interface. `metric_names`: the summary's headline names, in the printed table's order."""

    metric_names: tuple[str, ...] = ()

    def add_batch(self, outputs: dict, targets: list[dict], postprocessors: dict) -> None:
        """One batch of model outputs (`pred_logits` [B, Q, C+1], `pred_boxes` [B, Q, 4], ...) and its B
        targets (`image_id`, `orig_size`, ...): post-process and accumulate."""
        raise NotImplementedError

    def state(self) -> tuple[list[int], Any]:
        """What one rank contributes (plain Python / CPU tensors, for `all_gather_object`): (ids, the rest)."""
        raise NotImplementedError

    def merge(self, parts: Iterable[tuple[list[int], Any]]) -> None:
        """Replace the accumulated state by the union of `parts` (every rank's `state()`, this one included)."""
        raise NotImplementedError

    def summarize(self) -> dict[str, float]:
        """The metrics of everything accumulated; EvalError when nothing was evaluated."""
        raise NotImplementedError

    def write_results(self, path: str | os.PathLike) -> Path:
        """The accumulated predictions as a results JSON file (atomic)."""
        raise NotImplementedError

    @classmethod
    def format_table(cls, metrics: Mapping[str, float], title: str = "") -> str:
        """The summary as a small two-line table of `metric_names` (values in %, -1 and NaN shown as n/a)."""
        return metrics_table(metrics, cls.metric_names, title)


def metrics_table(metrics: Mapping[str, float], names: Iterable[str], title: str = "") -> str:
    """`names` that `metrics` holds as a header line and a line of values in % (n/a: -1 or NaN)."""
    names = [n for n in names if n in metrics]
    head = " ".join(f"{n:>6}" for n in names)
    vals = " ".join(f"{'n/a':>6}" if not metrics[n] >= 0 else f"{100 * metrics[n]:6.2f}" for n in names)
    return (f"{title}\n" if title else "") + f"  {head}\n  {vals}"


def distinct_ids(ids: Sequence[int], empty: str, unit: str = "image") -> list[int]:
    """The sorted distinct ids an evaluator accumulated (over every rank's part). Raises EvalError when there
    are none (`empty` says so and what to check) or when any came twice (overlapping rank parts)."""
    unique = sorted(set(ids))
    if not unique:
        raise EvalError(empty)
    if len(unique) != len(ids):
        raise EvalError(f"{len(ids) - len(unique)} {unit}(s) were evaluated twice (overlapping rank parts)")
    return unique


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON to `path` via a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
    return path
