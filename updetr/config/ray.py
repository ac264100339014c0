"""`ray:` Ray Train settings (workers, resources, storage)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from updetr.config.base import _Strict


class RayConfig(_Strict):
    """Ray Train scaling, storage and fault tolerance (owner: `updetr.orchestration`)."""

    address: Optional[str] = Field(None, description="Cluster address; None starts a local Ray.")
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
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
    stall_fail_s: float = Field(
        1800.0, ge=0, description="Fail the run (checkpoints kept) when a worker has waited this long for a batch; "
                                  "0 disables. Counts per worker attempt (ray.max_failures restarts it).")
