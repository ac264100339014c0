"""Resource plan of a Ray run: CPUs / GPUs of training workers, preprocessing actors and read tasks.

Ray Data and Ray Train share the cluster's logical CPUs. If the training workers and the preprocessing
actors reserve every CPU, the read tasks never start and the pipeline waits forever without an error
(e.g. 2 workers x 0.5 + 1 actor x 1.0 on 2 cores). `plan_resources` fits all three before anything
starts, or raises `ResourceError` with one line naming what does not fit and which setting to change.

Rules, in order:
  1. GPUs: `ray.use_gpu` needs one GPU per training worker; never shrunk.
  2. Read tasks: one read task's CPUs (`READ_CPUS`) stay free whenever the source has a read stage
     (folder, shards, URIs, detection datasets; not the synthetic source).
  3. Training workers get `ray.cpus_per_worker` each. On a Ray this process starts (`flexible_train`) the
     request may be lowered so that at least one CPU (or what is left on a tiny machine) stays for the
     data pipeline, never below `MIN_TRAIN_CPUS` each; on a joined cluster it is honoured or refused.
  4. Preprocessing: `max(1, data.num_workers)` actors at `data.preprocess_cpus` each. When they do not fit
     in what is left, each actor's reservation is lowered (not below `MIN_ACTOR_CPUS`); when there is room
     for more, the pool may grow up to `max_actors` (Ray Data's autoscaling pool uses spare CPUs on a
     big node).
Reservations are logical (Ray does not pin cores), so a lowered reservation still computes; what matters
is that every stage can be scheduled at once.

`cluster` is `{"CPU": n, "GPU": n}` totals plus optionally `"node_cpus": [per node]` (a training worker
must fit on one node). `local_resources()` gives this machine's figures without starting Ray.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

# Reading is I/O bound; one read task's reservation stays free so reads can always be scheduled.
READ_CPUS = 0.25
MIN_TRAIN_CPUS = 0.1
MIN_ACTOR_CPUS = 0.25
# Below this many CPUs the data pipeline is not given a whole CPU on a local Ray (1-core machines).
DATA_SHARE_LOCAL = 1.0
# Sources without a read stage (the items are generated inside the preprocessing actors).
NO_READ_SOURCES = ("synthetic",)


class ResourceError(ValueError):
    """The requested workers / actors / read tasks cannot all run at once; the message is one line."""


@dataclass(frozen=True)
class ResourcePlan:
    """What each stage reserves; `total_cpus` is what the plan was made against."""

    total_cpus: float
    total_gpus: float
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    read_cpus: float           # per read task (0: the source has no read stage)
    actors: int                # preprocessing actors started with the pool
    max_actors: int            # the pool may grow to this many when CPUs are spare
    cpus_per_actor: float
    notes: tuple[str, ...] = ()

    @property
    def train_cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def reserved_cpus(self) -> float:
        """Worst case: every worker, the grown pool and one read task at once."""
        return self.train_cpus + self.max_actors * self.cpus_per_actor + self.read_cpus

    def describe(self) -> str:
        read = f" + reads {self.read_cpus:g} CPU" if self.read_cpus else ""
        pool = f"{self.actors}" if self.max_actors == self.actors else f"{self.actors}-{self.max_actors}"
        gpu = f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (f"{self.num_workers} worker(s) x {self.cpus_per_worker:g} CPU{gpu}, {pool} preprocessing "
                f"actor(s) x {self.cpus_per_actor:g} CPU{read} on {self.total_cpus:g} CPU(s)")


def local_resources() -> dict:
    """This machine's CPUs (the ones this process may use) and GPUs, without starting Ray."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    gpus = 0.0
    try:
        import torch

        gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    except Exception:  # noqa: BLE001 - no torch / broken driver: no GPU
        gpus = 0.0
    return {"CPU": cpus, "GPU": gpus, "node_cpus": [cpus]}


def cluster_resources() -> dict:
    """Totals and per-node CPUs of the Ray cluster this process is connected to."""
    import ray

    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0)), "node_cpus": nodes}


def _floor(x: float, step: float = 0.05) -> float:
    """Round down to a multiple of `step` (a reservation must never round up past what is free)."""
    return math.floor(x / step + 1e-9) * step


def has_read_stage(source: str) -> bool:
    return source not in NO_READ_SOURCES


def plan_resources(cfg, cluster: Mapping, *, flexible_train: bool = True) -> ResourcePlan:
    """Fit training workers, preprocessing actors and read tasks into `cluster` (module docstring).

    Raises:
        ResourceError: one line naming what does not fit and the setting to change.
    """
    r, d = cfg.ray, cfg.data
    total = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    node_cpus = [float(c) for c in cluster.get("node_cpus") or [total]]
    n = r.num_workers
    notes: list[str] = []

    gpw = 1.0 if r.use_gpu else 0.0
    if n * gpw > gpus:
        raise ResourceError(f"ray.use_gpu=true: {n} training worker(s) need {n * gpw:g} GPU(s), the cluster has "
                            f"{gpus:g}; set ray.use_gpu=false or lower ray.num_workers")

    read = READ_CPUS if has_read_stage(d.source) else 0.0
    actors = max(1, d.num_workers)
    data_min = read + actors * MIN_ACTOR_CPUS
    cpw = r.cpus_per_worker
    if n * cpw + data_min > total + 1e-9:
        if not flexible_train:
            raise ResourceError(
                f"{n} training worker(s) x {cpw:g} CPU + the data pipeline (>= {data_min:g} CPU: {actors} "
                f"preprocessing actor(s) x {MIN_ACTOR_CPUS:g}{f' + reads {read:g}' if read else ''}) need more "
                f"than the cluster's {total:g} CPU(s); lower ray.num_workers or ray.cpus_per_worker "
                f"(or data.num_workers)")
        # Our own Ray: leave the data pipeline one CPU (or what a tiny machine has), as documented.
        budget = total - max(min(DATA_SHARE_LOCAL, total / 2), data_min)
        lowered = _floor(budget / n) if n else cpw
        if lowered < MIN_TRAIN_CPUS - 1e-9:
            raise ResourceError(
                f"{n} training worker(s) (>= {MIN_TRAIN_CPUS:g} CPU each) + {actors} preprocessing actor(s) "
                f"(>= {MIN_ACTOR_CPUS:g} CPU each){f' + a read task ({read:g} CPU)' if read else ''} need at least "
                f"{n * MIN_TRAIN_CPUS + data_min:g} CPU, this machine has {total:g}; lower ray.num_workers "
                f"or data.num_workers")
        notes.append(f"ray.cpus_per_worker {cpw:g} -> {lowered:g} so the data pipeline keeps "
                     f"{total - n * lowered:g} of {total:g} CPU(s)")
        cpw = lowered
    biggest = max(node_cpus) if node_cpus else total
    if cpw > biggest + 1e-9:
        raise ResourceError(f"ray.cpus_per_worker={cpw:g}: no node has that many CPUs (largest: {biggest:g}); "
                            f"lower ray.cpus_per_worker")

    left = total - n * cpw - read
    cpa = d.preprocess_cpus
    if actors * cpa > left + 1e-9:
        lowered = _floor(left / actors)
        if lowered < MIN_ACTOR_CPUS - 1e-9:
            raise ResourceError(
                f"{actors} preprocessing actor(s) need at least {actors * MIN_ACTOR_CPUS:g} CPU "
                f"({MIN_ACTOR_CPUS:g} each) but {max(left, 0):g} of {total:g} CPU(s) are left after the training "
                f"workers ({n} x {cpw:g}){f' and a read task ({read:g})' if read else ''}; lower data.num_workers, "
                f"ray.num_workers or ray.cpus_per_worker")
        notes.append(f"data.preprocess_cpus {cpa:g} -> {lowered:g} so {actors} actor(s) fit next to the "
                     f"training workers{' and the read tasks' if read else ''}")
        cpa = lowered
    # Spare CPUs (a big node): let the pool grow into them.
    max_actors = max(actors, int((left + 1e-9) // cpa))
    return ResourcePlan(total, gpus, n, cpw, gpw, read, actors, max_actors, cpa, tuple(notes))
