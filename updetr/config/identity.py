"""A run's identity: the settings that change what a training step computes (resume checks)."""
from __future__ import annotations

from typing import Any, Optional

from updetr.config.experiment import ExperimentConfig
from updetr.config.loading import config_to_dict, flatten


# Settings that never change what a training step computes: where it runs, how data is prepared (samples
# are seeded per item, so worker counts do not matter), what is logged and where things are stored.
# Everything else (runtime.precision and any runtime switch included) is part of a run's identity.
OPERATIONAL_PREFIXES = ("ray.", "tracking.", "runtime.output_dir", "runtime.threads", "data.num_workers",
                        "data.preprocess_cpus", "data.prefetch_batches", "data.preprocess_batch_size",
                        "schedule.checkpoint_every", "schedule.keep_checkpoints", "schedule.log_every",
                        "eval.metric")
IDENTITY_KEEP = ("ray.use_gpu",)  # GPU vs CPU arithmetic
# How long to train: extending a run (updetr debug --resume with a higher max_steps) continues it.
RUN_LENGTH_FIELDS = ("schedule.epochs", "schedule.max_steps")


def identity_fields(config: "ExperimentConfig | dict") -> dict[str, Any]:
    """Flattened settings that change the arithmetic of training: equal identity = same run, resumable.

    A change of `ray.num_workers` is not in it: the run resumes, and `resume_note` states the new global
    batch size.
    """
    data = config_to_dict(config) if isinstance(config, ExperimentConfig) else dict(config)
    return {k: v for k, v in flatten(data).items()
            if k in IDENTITY_KEEP or not k.startswith(OPERATIONAL_PREFIXES)}


def identity_diff(saved: Optional[dict], cfg: "ExperimentConfig", ignore: tuple[str, ...] = ()) -> list[str]:
    """`["runtime.precision: checkpoint 'fp32' vs config 'bf16'", ...]` for identity fields that differ.

    Fields missing from `saved` (a checkpoint of an older updetr) are not compared.
    """
    if not saved:
        return []
    old, now = identity_fields(saved), identity_fields(cfg)
    return [f"{k}: checkpoint {old[k]!r} vs config {v!r}" for k, v in now.items()
            if k in old and old[k] != v and k not in ignore]


def resume_note(saved: Optional[dict], cfg: "ExperimentConfig", world_size: int,
                saved_world_size: Optional[int] = None) -> Optional[str]:
    """One line when a resume changes the worker count (and so the global batch size), else None.
    `saved`: the checkpoint's config; `saved_world_size`: the workers that wrote it (an elastic run,
    `ray.min_workers`, may have had fewer than its `ray.num_workers`), taken over the config when given."""
    before = saved_world_size or ((saved or {}).get("ray") or {}).get("num_workers")
    if before is None or int(before) == world_size:
        return None
    b = cfg.data.batch_size
    return (f"resuming with {world_size} worker(s) instead of {before}: the global batch size changes from "
            f"{int(before) * b} to {world_size * b} ({b} per worker); the learning rate is not rescaled")
