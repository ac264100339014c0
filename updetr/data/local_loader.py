"""Local (no Ray) pre-training batches: seeded epoch order, rank slicing, cheap skip, optional DataLoader workers.

Determinism: a sample's pixels depend only on (cfg.seed, epoch, sample id) and a batch is a fixed slice of
this rank's epoch order, so batches are identical for any `num_workers` (workers produce whole batches,
DataLoader returns them in order).
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from updetr.data.collate import collate_records
from updetr.data.pretext import safe_record
from updetr.data.seeding import epoch_permutation
from updetr.data.skips import SkipCounter
from updetr.data.sources import open_source

log = logging.getLogger("updetr.data")


def rank_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool, rank: int,
                 world_size: int, drop_last: bool = False) -> list[np.ndarray]:
    """Source indices of this rank's batches for one epoch -> list of int arrays (last one may be short,
    unless `drop_last`: then it is left out, as the official loader's batch sampler does).

    The epoch order is one seeded permutation shared by all ranks; rank r takes every world_size-th
    sample. The remainder n % world_size is dropped so every rank yields the same number of batches
    (DDP steps stay in lock-step), as Ray Train's `streaming_split(equal=True)` does.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    mine = order[rank: (n // world_size) * world_size: world_size]
    end = (len(mine) // batch_size) * batch_size if drop_last else len(mine)
    return [mine[i: i + batch_size] for i in range(0, end, batch_size)]


class _BatchDataset(Dataset):
    """Item j = the collated batch dict of batch j (so each worker builds whole batches)."""

    def __init__(self, cfg, epoch: int, batches: Sequence[np.ndarray]) -> None:
        self.cfg, self.epoch, self.batches = cfg, epoch, list(batches)
        self._source = None  # set by the caller, or opened lazily (sources hold listings, no open files)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict:
        if self._source is None:
            self._source = open_source(self.cfg)
        counter = SkipCounter()
        pcfg, d = self.cfg.pretext, self.cfg.data
        records = []
        for i in self.batches[j]:
            sid = self._source.sample_id(int(i))
            try:
                item = self._source.load(int(i))
            except Exception as e:  # noqa: BLE001 - BadImage(missing_file, ...) or an unexpected I/O error
                counter.add(getattr(e, "reason", "unreadable"))
                continue
            rec = safe_record(item, pcfg, (self.cfg.seed, self.epoch, sid), counter, d.decode)
            if rec is not None:
                records.append(rec)
        return collate_records(records, counter.take(), pcfg.num_patches, pcfg.patch_size)


def _identity(x):
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one process per core; torch's own threads would oversubscribe


def local_pretrain_batches(cfg, epoch: int, skip: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Batch dicts (CONTRACTS.md) of one epoch for one rank, without Ray.

    Args:
        cfg: ExperimentConfig (data.source synthetic | folder | shards).
        epoch: epoch number (seeds the order and every sample's draws).
        skip: batches of this rank to drop first (mid-epoch resume); nothing is read or decoded for them.
        rank, world_size: this process's slice of the epoch.
    Yields:
        dicts with images `[B, 3, H, W]`, mask `[B, H, W]`, patches `[B, M, 3, P, P]`, targets, skipped.
        B can be below data.batch_size when bad items were dropped (or in the last batch with
        data.drop_last=false) (B = 0 batches are yielded too, so
        all ranks yield the same count). At most schedule.steps_per_epoch batches (counting skipped ones).
    """
    source = open_source(cfg)
    batches = rank_batches(len(source), cfg.data.batch_size, cfg.seed, epoch, cfg.data.shuffle, rank, world_size,
                           drop_last=cfg.data.drop_last)
    if cfg.schedule.steps_per_epoch is not None:
        batches = batches[: cfg.schedule.steps_per_epoch]
    batches = batches[max(0, int(skip)):]
    if not batches:
        return
    ds = _BatchDataset(cfg, epoch, batches)
    ds._source = source  # workers inherit the listing (fork) instead of walking the folder again
    yield from iter_loader(ds, cfg, epoch, rank)


def iter_loader(batches: Dataset, cfg, epoch: int, rank: int) -> Iterator[dict]:
    """Iterate a dataset whose items are whole batch dicts, in order, with `cfg.data.num_workers` processes;
    sums their `skipped` counts and logs the epoch's bad-item summary at the end (pre-training and detection)."""
    nw = cfg.data.num_workers
    loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=nw, collate_fn=_identity,
                        worker_init_fn=_worker_init if nw else None,
                        prefetch_factor=max(1, cfg.data.prefetch_batches) if nw else None,
                        persistent_workers=False)
    counter = SkipCounter()
    try:
        for batch in loader:
            counter.update(batch["skipped"])
            yield batch
    finally:
        if counter:
            log.warning("%s (rank %d)", counter.summary(f"epoch {epoch}"), rank)
        else:
            log.info("data: epoch %d (rank %d): no bad items", epoch, rank)
