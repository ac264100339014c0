"""The `Task` interface and the one weight-initialisation routine every task uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from updetr.checkpoint import CheckpointError, strip_prefixes
from updetr.eval.base import Evaluator


class InitError(CheckpointError):
    """Checkpoint weights that do not fit the task's model; the message names the file and the keys."""


@dataclass
class InitReport:
    """What `init_weights` did: tensors copied, keys dropped on purpose, keys left at their fresh init."""

    source: str
    loaded: int
    dropped: list[str] = field(default_factory=list)      # in the checkpoint, not used (expected)
    reinitialised: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (expected)

    def describe(self) -> str:
        def short(keys):
            heads = sorted({k.rsplit(".", 1)[0] for k in keys})
            return ", ".join(heads) if heads else "none"
        return (f"init from {self.source}: {self.loaded} tensors loaded; dropped {len(self.dropped)} "
                f"({short(self.dropped)}); re-initialised {len(self.reinitialised)} ({short(self.reinitialised)})")


def _names(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, state_dict: dict[str, Any], *, source: str,
                 drop_prefixes: Sequence[str] = (), reinit_prefixes: Sequence[str] = (),
                 strict: bool = True) -> InitReport:
    """Copy `state_dict` into `model`, dropping `drop_prefixes` keys of the checkpoint and leaving the
    model's `reinit_prefixes` keys at their fresh initialisation.

    Any other missing or unexpected key, and any shape mismatch, is refused (InitError naming the keys)
    unless `strict` is False (then they are reported and skipped). Transferred tensors are copied exactly.
    """
    sd = strip_prefixes(state_dict)
    dropped = [k for k in sd if k.startswith(tuple(drop_prefixes))]
    sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    reinit = [k for k in missing if k.startswith(tuple(reinit_prefixes))]
    missing = [k for k in missing if k not in set(reinit)]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in sd
              if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_names(shapes, 4)}")
    if problems and strict:
        raise InitError(f"{source}: the weights do not fit this model: {'; '.join(problems)} "
                        "(check model.* settings such as pre_norm, num_queries, num_classes; "
                        "init.strict=false skips them)")
    bad = {s.split(" ", 1)[0] for s in shapes}
    use = {k: v for k, v in sd.items() if k in own and k not in bad}
    with torch.no_grad():
        for k, v in use.items():
            own[k].copy_(v)
    return InitReport(source, len(use), sorted(dropped + unexpected + sorted(bad)), sorted(reinit + missing))


class Task:
    """One kind of training run over `cfg`, the run's `updetr.config.ExperimentConfig` (not imported here:
    config validation asks the task classes, so tasks/ must import without config/). Subclasses set `name`, declare what the rest of updetr asks about them
    (the class attributes and classmethods below, read without building anything) and implement the
    methods that build and feed the run."""

    name: str = ""
    # data.source values the task reads; `check_config` refuses the others.
    sources: tuple[str, ...] = ()
    # model.detector values the task builds; config validation refuses the others.
    detectors: tuple[str, ...] = ("detr",)
    # Classes of the head (no-object excluded) when model.num_classes is unset; None: it must be set.
    default_num_classes: Optional[int] = None
    # Streams its training data through Ray Data (`ray_datasets`): the launcher and the sweep's CPU
    # budget count preprocessing actors for it.
    ray_data: bool = False
    # Evaluates on a split (while training too); the evaluator's class gives its metric names and table.
    has_eval: bool = False
    evaluator_class: type[Evaluator] = Evaluator
    # eval.metric values its evaluation can report (voc07 / voc12: the VOC devkit's, on VOC data only).
    eval_metrics: tuple[str, ...] = ("coco",)
    # `updetr compare`'s curve PNG for this task: (which metric: "loss" | "eval", x label, file name).
    curve: Optional[tuple[str, str, str]] = None
    # `updetr visualize` draws this task's checkpoints (query patches and the boxes found for them).
    visualize: bool = False

    @classmethod
    def config_defaults(cls, tree: dict) -> dict:
        """The raw experiment mapping with this task's defaults filled in, before validation."""
        return tree

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Cross-field rules of a config of this task; ValueError with one line naming the fields."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def prepare(self) -> Any:
        """Driver side, before any worker starts: resolve data locations (absolute), write generated data.
        Returns the config the run should use (workers get this one)."""
        init = self.cfg.init.checkpoint
        if init and init != "previous" and "://" not in init:
            from pathlib import Path

            # Ray Train workers chdir into Ray's session folder: hand them an absolute path
            self.cfg = self.cfg.model_copy(update={"init": self.cfg.init.model_copy(
                update={"checkpoint": str(Path(init).expanduser().resolve())})})
        return self.cfg

    def build(self) -> tuple[nn.Module, nn.Module, dict]:
        """(model, criterion, postprocessors)."""
        raise NotImplementedError

    def train_batches(self, epoch: int, skip: int = 0, rank: int = 0, world_size: int = 1,
                      shard: Any = None) -> Iterator[dict]:
        """Batch dicts (CONTRACTS.md) of one epoch for one rank, the first `skip` left out. `shard` is the
        rank's Ray Data iterator when the task's `ray_datasets` gave one."""
        raise NotImplementedError

    def batches_per_epoch(self, world_size: int = 1, ray: bool = False) -> Optional[int]:
        """Batches per rank per epoch when known without reading the data (ETA); None otherwise."""
        return None

    def ray_datasets(self, resources=None) -> dict:
        """Ray Data datasets for the TorchTrainer (driver side); {} when each worker reads its own part."""
        return {}

    def eval_batches(self, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        """Batch dicts of this rank's part of the evaluation split."""
        raise NotImplementedError(f"task {self.name} has no evaluation split")

    def evaluator(self) -> Evaluator:
        """A fresh evaluator (an `evaluator_class`) for one pass over the evaluation split."""
        raise NotImplementedError(f"task {self.name} has no evaluator")

    def format_table(self, metrics: dict, title: str = "") -> str:
        """The evaluation table of `metrics` (what `evaluator().summarize()` gave), under `title`."""
        return self.evaluator_class.format_table(metrics, title)

    def init_weights(self, model: nn.Module, ckpt: dict, source: str) -> InitReport:
        """Initialise `model` from a checkpoint dict (our schema) before training starts."""
        return load_weights(model, ckpt["model"], source=source, strict=self.cfg.init.strict)
