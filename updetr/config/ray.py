"""`ray:` Ray Train settings (workers, resources, storage)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from updetr.config.base import _Strict


class RayConfig(_Strict):
    """Ray Train scaling, storage and fault tolerance (owner: `updetr.orchestration`)."""

    address: Optional[str] = Field(None, description="Cluster address; None starts a local Ray.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    min_workers: Optional[int] = Field(
        None, gt=0, description="Elastic training: the run goes on with as few as this many workers when the "
                                "cluster cannot place ray.num_workers (a lost node), from its last checkpoint, and "
                                "grows back when room returns. The per-worker batch stays, so the global batch "
                                "follows the worker count. None = always ray.num_workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per training worker (leave some for Ray Data).")
    storage_path: Optional[str] = Field(None, description="Checkpoint storage (local path or s3://, gs://); "
                                                          "None = <output_dir>/ray.")
    run_name: Optional[str] = Field(None, description="Run name; None derives it from the experiment name.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts before the run fails (-1: forever).")
    num_to_keep: int = Field(2, gt=0, description="Checkpoints kept in storage.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How training workers are placed on nodes (Ray placement group strategy); "
                            "STRICT_SPREAD puts each worker on its own node.")
    stall_warn_s: float = Field(
        120.0, ge=0, description="Say on the terminal and in MLflow (with what Ray Data reports) when a training "
                                 "worker has waited this long for a batch; 0 disables.")
    resource_wait_s: float = Field(
        1800.0, ge=0, description="Stop the run (checkpoints kept, one line) when its training workers have "
                                  "waited this long for resources, e.g. after a node was lost; 0 waits for ever. "
                                  "While it waits, a line about every 30 s says what for.")
    stall_fail_s: float = Field(
        1800.0, ge=0, description="Fail the run (checkpoints kept) when a worker has waited this long for a batch; "
                                  "0 disables. Counts per worker attempt (ray.max_failures restarts it).")

    @model_validator(mode="after")
    def _min_le_max(self) -> "RayConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"ray.min_workers ({self.min_workers}) is more than ray.num_workers ({self.num_workers})")
        return self

    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) training workers: (num_workers, num_workers) unless min_workers makes it elastic."""
        return (self.min_workers or self.num_workers, self.num_workers)
