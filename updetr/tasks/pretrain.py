"""`pretrain`: random query patch detection on unlabeled images (UP-DETR pre-training)."""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

from updetr.tasks.base import Task


class PretrainTask(Task):
    name = "pretrain"
    sources = ("synthetic", "folder", "shards")
    detectors = ("detr", "deformable_detr")
    default_num_classes = 2   # label 1 = patch
    ray_data = True
    has_eval = False
    curve = ("loss", "step", "pretrain_loss.png")
    visualize = True

    @classmethod
    def check_config(cls, cfg) -> None:
        n, m = cfg.model.num_queries, cfg.pretext.num_patches
        if n % m:
            raise ValueError(f"model.num_queries ({n}) must be divisible by pretext.num_patches ({m})")
        if cfg.model.num_classes is not None and cfg.model.num_classes < 2:
            # Index num_classes is no-object: with 1 class, the patch label 1 would be no-object.
            raise ValueError(f"model.num_classes ({cfg.model.num_classes}) must be >= 2 for pre-training "
                             "(label 1 = patch; index num_classes is no-object)")
        if cfg.model.two_stage:
            raise ValueError("model.two_stage: pre-training feeds query patches into learned queries, which "
                             "two-stage Deformable DETR does not have (pre-train plain or with_box_refine)")
        if cfg.data.source not in cls.sources:
            raise ValueError(f"data.source '{cfg.data.source}' is a detection dataset; pre-training "
                             "reads synthetic | folder | shards")
        if cfg.data.fraction < 1.0 or cfg.data.subset_size is not None:
            raise ValueError("data.fraction / data.subset_size: a subset of a labelled TRAIN split is for "
                             "fine-tuning (detect / oneshot / panoptic); in a chain, set it on that stage "
                             "(stages.finetune.data.fraction=...)")

    def prepare(self):
        """Check the data source before any work (one line naming the path and the reason)."""
        from updetr.data.preflight import check_source

        self.num_items = check_source(self.cfg)
        return super().prepare()

    def build(self):
        from updetr.models import build_pretrainer

        return build_pretrainer(self.cfg, self.cfg.num_classes)

    def train_batches(self, epoch: int, skip: int = 0, rank: int = 0, world_size: int = 1,
                      shard: Any = None) -> Iterator[dict]:
        if shard is not None:
            from updetr.data.ray_pipeline import iter_worker_batches

            return iter_worker_batches(shard, self.cfg, epoch, skip=skip)
        from updetr.data import local_pretrain_batches

        return local_pretrain_batches(self.cfg, epoch, skip=skip, rank=rank, world_size=world_size)

    num_items: Optional[int] = None  # counted by `prepare` (the driver's preflight) when the source is listed

    def batches_per_epoch(self, world_size: int = 1, ray: bool = False) -> Optional[int]:
        """Ray: streaming_split(equal=True) drops the remainder; bad items still take their row, so count."""
        d = self.cfg.data
        n = d.synthetic_images if d.source == "synthetic" else self.num_items
        if n is None and not ray:
            from updetr.data.sources import open_source

            n = len(open_source(self.cfg))
        if not n:
            return None
        return max(1, math.ceil((n // world_size) / d.batch_size))

    def ray_datasets(self, resources=None) -> dict:
        from updetr.data import ray_pipeline

        # Built on the driver, which so owns the named EpochClock actor: it outlives worker-group restarts.
        return {"train": ray_pipeline.build_pretrain_dataset(self.cfg, resources)}
