"""Ray Data pre-training pipeline: read (folder | shards | object store | synthetic) -> decode + patch-crop
actors -> padded batch dicts on each training worker (CONTRACTS.md).

Stages (streaming; nothing is counted or materialised: the first batch follows the actor start and one
decode call):
  1. read: `read_binary_files(include_paths=True)` for a folder / URI prefix, `read_webdataset(decoder=None)`
     for tar shards (raw bytes, no eager decode), `from_items` of ids for the synthetic source;
  2. `map_batches(PretrainPreprocessor, compute=ActorPoolStrategy(min..max from the resource plan),
     num_cpus=plan.cpus_per_actor)`: decode + RGB conversion + box draws + crops + augmentation, one
     output row per input row; a bad item becomes a row with ok=False and its reason in `events`
     (never an exception), conversions are recorded in `events` of good rows;
  3. `iter_worker_batches`: `iter_torch_batches(collate_fn=PretrainCollate)` pads, normalises and
     turns the `events` of the batch into the `skipped` counts.

Per-sample randomness comes from (cfg.seed, epoch, sample id), so results do not depend on worker count,
block layout or arrival order. Sample id = `seeding.sample_id_from_key(path relative to data.path)` for
folders and URIs, the same relative path stored in each shard's `.path` member for shards (so a folder
and its shards agree), and the index for the synthetic source.

The epoch reaches the preprocessing actors through a tiny named `EpochClock` actor: `iter_worker_batches`
sets it before it starts iterating, and the actors read it when they start. That is race-free because Ray
Data builds a fresh executor (and fresh actor pools) for each pass, and `streaming_split` starts a pass
only once every consumer has asked for it (its epoch barrier). The clock sits on the node of the process
that builds the dataset (the driver), so a run that loses another node keeps it. The clock name is derived
from the run's seed / data / pretext settings and experiment name, so two concurrent runs with
byte-identical settings would share it (give them different names). Without `iter_worker_batches` (e.g.
`ds.take()`) epoch 0 is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Iterator

import numpy as np
import ray
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from updetr.data.collate import collate_records
from updetr.data.image_io import IMAGE_EXTENSIONS
from updetr.data.ray_preprocess import CLOCK_NAMESPACE, PretrainPreprocessor, count_events, strip_scheme
from updetr.data.shards import read_manifest
from updetr.data.skips import SkipCounter
from updetr.resources import READ_CPUS

log = logging.getLogger("updetr.data")

# Reading is I/O bound; a small CPU request (READ_CPUS, 0.25) keeps read tasks schedulable when training
# workers and the preprocessing actors hold the node's CPUs; the resource planner keeps that much free.
# Drill (tests only): with this env var set on the driver, every preprocessing call blocks, so the stall
# watchdog can be shown a pipeline that never delivers a batch.
STALL_DRILL_ENV = "UPDETR_DRILL_STALL_PREPROCESS"

@ray.remote(num_cpus=0)
class EpochClock:
    """Holds the epoch the next pass of the dataset belongs to."""

    def __init__(self) -> None:
        self.epoch = 0

    def set(self, epoch: int) -> int:
        self.epoch = int(epoch)
        return self.epoch

    def get(self) -> int:
        return self.epoch


def clock_name(cfg) -> str:
    key = json.dumps({"name": cfg.name, "seed": cfg.seed, "data": cfg.data.model_dump(mode="json"),
                      "pretext": cfg.pretext.model_dump(mode="json")}, sort_keys=True)
    return "updetr-epoch-" + hashlib.sha1(key.encode()).hexdigest()[:16]


# Handles kept alive on purpose: a named, non-detached actor is destroyed once no handle refers to it.
_CLOCKS: dict[str, "ray.actor.ActorHandle"] = {}


def epoch_clock(cfg):
    """Get (or create) the run's clock actor; it lives as long as the process that created it, on its node."""
    name = clock_name(cfg)
    if name not in _CLOCKS:
        # A zero-CPU actor may be placed on any node (about half of them on the other node of a two-node
        # cluster), and losing that node would lose the clock, so every later worker group of the run fails
        # at its first epoch. An actor dies with its owner anyway; on the owner's node it is lost only with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _CLOCKS[name] = EpochClock.options(name=name, namespace=CLOCK_NAMESPACE, get_if_exists=True,
                                           scheduling_strategy=here).remote()
    return _CLOCKS[name]


def _read(cfg):
    """Stage 1: the raw-item dataset and the prefix that makes paths relative."""
    d = cfg.data
    shuffle = ray.data.FileShuffleConfig(seed=cfg.seed) if d.shuffle else None  # new order each pass
    if d.source == "synthetic":
        # from_items has no read tasks (no CPU to wait for); ids are tiny, the pixels are made in stage 2.
        return ray.data.from_items([{"id": i} for i in range(d.synthetic_images)]), ""
    path = str(d.path)
    if "://" not in path:
        # Ray reads in worker processes whose working directory (and node) is not the driver's.
        path = os.path.abspath(path)
    if d.source == "folder":
        ds = ray.data.read_binary_files(path, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS),
                                        shuffle=shuffle, num_cpus=READ_CPUS)
        # Ray reports files under the path as given (object stores: "bucket/key", no scheme); a local path
        # may also come back absolute, so both forms are tried when making paths relative.
        prefixes = [strip_scheme(path).rstrip("/")]
        if "://" not in path:
            prefixes.append(os.path.abspath(path).rstrip("/"))
        return ds, "\n".join(prefixes)
    if d.source == "shards":
        paths: list[str] | str = path
        if "://" not in path:
            manifest = read_manifest(path)  # local: read exactly the listed (complete) shards
            if d.shuffle and not (manifest.get("order") or {}).get("shuffled"):
                log.warning("data: %s was written in path order; batches of a class-sorted folder will hold "
                            "few classes (re-shard with `updetr data shard`, which now writes a random order)",
                            path)
            paths = [f"{path.rstrip('/')}/{s['name']}" for s in manifest["shards"]]
        ds = ray.data.read_webdataset(paths, decoder=None, file_extensions=["tar"], shuffle=shuffle,
                                      num_cpus=READ_CPUS)
        return ds, ""
    raise ValueError(f"data.source '{d.source}' is not a pre-training source (synthetic | folder | shards)")


class _StalledPreprocessor(PretrainPreprocessor):
    """Drill UDF: never returns (see STALL_DRILL_ENV)."""

    def __call__(self, batch: dict) -> dict:
        while True:
            time.sleep(3600)


def _pool(cfg, resources=None) -> tuple[int, int, float]:
    """(min actors, max actors, CPUs per actor): the resource plan's, or a plan made against the cluster."""
    if resources is None:
        from updetr.resources import cluster_resources, plan_resources

        # Sized against the whole cluster (the training workers are counted in), flexible like a local run.
        resources = plan_resources(cfg, cluster_resources())
    return resources.actors, resources.max_actors, resources.cpus_per_actor


def build_pretrain_dataset(cfg, resources=None) -> "ray.data.Dataset":
    """Lazy, streaming pre-training dataset (one row per input item, bad ones flagged; module docstring).

    Requires a running Ray (`ray.init`). URIs (s3://, gs://, ...) in data.path pass straight to Ray Data
    (pyarrow filesystems); local shard dirs are read through their manifest. `resources` is the run's
    `ResourcePlan` (actor pool size and CPUs per actor); None plans against the connected cluster.
    """
    ds, prefix = _read(cfg)
    epoch_clock(cfg)  # make sure the clock exists (owned by the process that builds the dataset)
    d = cfg.data
    lo, hi, cpus = _pool(cfg, resources)
    udf = _StalledPreprocessor if os.environ.get(STALL_DRILL_ENV) else PretrainPreprocessor
    return ds.map_batches(
        udf,
        fn_constructor_kwargs={"cfg": cfg, "root_prefix": prefix, "clock": clock_name(cfg)},
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=cpus,
        batch_size=d.preprocess_batch_size,
        batch_format="numpy",
        udf_modifying_row_count=False,
    )


class PretrainCollate(NumpyBatchCollateFn):
    """numpy batch of preprocessed rows -> batch dict (bad rows dropped, their reasons in `skipped`)."""

    def __init__(self, num_patches: int, patch_size: int) -> None:
        super().__init__()
        self.num_patches, self.patch_size = num_patches, patch_size

    def __call__(self, batch: dict) -> dict:
        keep = np.nonzero(np.asarray(batch["ok"], dtype=bool))[0]
        records = [{"image": batch["image"][i], "patches": batch["patches"][i], "boxes": batch["boxes"][i],
                    "image_id": batch["image_id"][i], "orig_size": batch["orig_size"][i],
                    "size": batch["size"][i]} for i in keep]
        return collate_records(records, count_events(batch["events"]), self.num_patches, self.patch_size)


def set_epoch(cfg, epoch: int) -> None:
    """Point the preprocessing actors of the next pass at `epoch` (blocking, so it happens first)."""
    ray.get(epoch_clock(cfg).set.remote(int(epoch)))


def iter_worker_batches(shard, cfg, epoch: int, skip: int = 0) -> Iterator[dict]:
    """Batch dicts of one epoch from a `ray.data.DataIterator` (a Train dataset shard) or a Dataset.

    Args:
        shard: `ray.train.get_dataset_shard(...)`, `ds.streaming_split(k)[i]`, `ds.iterator()` or `ds`.
        epoch: the epoch (sets the clock, seeds the draws and the local shuffle).
        skip: batches to drop first (mid-epoch resume). Unlike the local path the rows are still read and
            decoded (a stream cannot seek); they are dropped before collation. Which rows form the first
            `skip` batches is not reproducible across runs (arrival order is not), only their number.
    Yields:
        CONTRACTS.md batch dicts (B <= data.batch_size, B = 0 when a whole batch was bad; every
        consumer of an equal split gets the same number of batches). At most schedule.steps_per_epoch.
    Every rank must call this once per epoch (streaming_split consumers wait for each other).
    """
    set_epoch(cfg, epoch)
    d, pcfg = cfg.data, cfg.pretext
    kwargs = dict(batch_size=d.batch_size, prefetch_batches=d.prefetch_batches, drop_last=d.drop_last)
    if d.shuffle:
        kwargs.update(local_shuffle_buffer_size=max(4 * d.batch_size, 16),
                      local_shuffle_seed=(cfg.seed * 1000003 + epoch) % (2 ** 31))
    batches = shard.iter_torch_batches(collate_fn=PretrainCollate(pcfg.num_patches, pcfg.patch_size),
                                       device="cpu", **kwargs)
    limit = cfg.schedule.steps_per_epoch
    counter = SkipCounter()
    n = 0
    try:
        for batch in batches:
            n += 1
            if n > skip:
                counter.update(batch["skipped"])
                yield batch
            if limit is not None and n >= limit:
                break
    finally:
        # This rank's share only (debug detail): the epoch line of the run reports all ranks' sums,
        # dropped and converted items apart.
        log.debug("%s", counter.summary(f"epoch {epoch}"))
