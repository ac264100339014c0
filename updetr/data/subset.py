"""Low-data fine-tuning: a seeded subset of the TRAIN split (`data.fraction` or `data.subset_size`).

The subset is drawn from the split's sorted image ids with its own generator, seeded by `data.subset_seed`
(default: the run seed), so the same config always trains on the same images, whichever driver or worker count
runs it. The evaluation split is never subset: scores stay comparable across fractions. The chosen ids are
written as JSON (`train_subset.json` in the run folder, `data/train_subset.json` in MLflow) so a run can be
reproduced or audited exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from updetr.data.seeding import numpy_rng

SUBSET_FILE = "train_subset.json"
_TAG = 0x5B5E7              # keeps the subset's stream apart from every other draw of the same seed


def subset_active(cfg) -> bool:
    return cfg.data.subset_size is not None or cfg.data.fraction < 1.0


def subset_seed(cfg) -> int:
    return cfg.seed if cfg.data.subset_seed is None else cfg.data.subset_seed


def subset_count(n: int, fraction: float, size: Optional[int]) -> int:
    """Images kept of `n`: `size` (at most n), else round(fraction * n), at least 1."""
    k = size if size is not None else int(round(fraction * n))
    return max(1, min(n, k))


def choose_subset(ids: Sequence[int], fraction: float = 1.0, size: Optional[int] = None, seed: int = 0) -> list[int]:
    """The kept image ids, sorted: a uniform draw without replacement from the sorted `ids`."""
    pool = sorted(int(i) for i in ids)
    k = subset_count(len(pool), fraction, size)
    if k == len(pool):
        return pool
    rng = numpy_rng((_TAG, int(seed) & 0xFFFFFFFF, len(pool)))
    return sorted(pool[int(j)] for j in rng.choice(len(pool), size=k, replace=False))


def subset_record(cfg, ids: Sequence[int], total: int) -> dict:
    """What the JSON file holds: the rule, the seed and the ids."""
    return {"split": "train", "fraction": cfg.data.fraction, "subset_size": cfg.data.subset_size,
            "subset_seed": subset_seed(cfg), "total_images": total, "kept_images": len(ids),
            "image_ids": [int(i) for i in ids]}


def subset_path(cfg) -> Path:
    return (Path(cfg.runtime.output_dir) / cfg.name / SUBSET_FILE).resolve()


def write_subset(cfg, ids: Sequence[int], total: int) -> Path:
    path = subset_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(subset_record(cfg, ids, total), indent=1) + "\n")
    return path


def log_subset(tracker, cfg) -> None:
    """Log the run folder's subset file to the stage's MLflow run (nothing when the run uses the whole split)."""
    path = subset_path(cfg)
    if subset_active(cfg) and path.is_file():
        tracker.log_text(path.read_text(), f"data/{SUBSET_FILE}")
