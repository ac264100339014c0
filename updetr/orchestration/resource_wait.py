"""While a run waits for its training workers' resources, say so about every 30 s; give up after
`ray.resource_wait_s`.

Why: when a node is lost, Ray Train 2.60 retries the worker group, and a group that cannot be placed is
retried for ever (a placement group that stays PENDING; `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` only
restarts the wait). The driver then prints nothing. This thread, on the driver, watches the placement group
of the run's shape (`num_workers` bundles, or `min_workers` to `num_workers` for an elastic run, of the
per-worker resources, the run's strategy) in the GCS: while one is PENDING or RESCHEDULING and none is
CREATED, the run is waiting. A wait is one span from the first pending sight to the next CREATED one (the
retries in between do not restart it).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional, TextIO

PENDING = ("PENDING", "RESCHEDULING")


def _cpu(x: float) -> str:
    return f"{x:g}"


class ResourceWait(threading.Thread):
    """Started before `trainer.fit()`, stopped after; `gave_up` tells the driver why `fit()` ended."""

    def __init__(self, name: str, num_workers: int, per_worker: dict, strategy: str, out: TextIO,
                 limit_s: Optional[float], abort: Callable[[], None], interval_s: float = 30.0,
                 poll_s: float = 2.0, min_workers: Optional[int] = None) -> None:
        super().__init__(name="updetr-resource-wait", daemon=True)
        self.label, self.num_workers, self.per_worker, self.strategy = name, num_workers, per_worker, strategy
        self.min_workers = min_workers or num_workers  # elastic: a group of min..max workers is this run's
        self.out, self.limit_s, self.abort, self.interval_s, self.poll_s = out, limit_s, abort, interval_s, poll_s
        self.gave_up: Optional[str] = None   # the one-line reason, once the limit passed
        self.waited_s = 0.0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    # -- what we wait for / what the cluster has -------------------------------------------------------------
    def wanted(self) -> str:
        res = ", ".join(f"{_cpu(v)} {k}" for k, v in self.per_worker.items() if v)
        count = (f"{self.min_workers}-{self.num_workers}" if self.min_workers < self.num_workers
                 else f"{self.num_workers}")
        return f"{count} worker(s) x {res} ({self.strategy})"

    def cluster_now(self) -> str:
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        total, free = ray.cluster_resources(), ray.available_resources()
        parts = [f"{len(alive)} node(s)", f"{_cpu(free.get('CPU', 0))} of {_cpu(total.get('CPU', 0))} CPU free"]
        if total.get("GPU") or self.per_worker.get("GPU"):
            parts.append(f"{_cpu(free.get('GPU', 0))} of {_cpu(total.get('GPU', 0))} GPU free")
        return ", ".join(parts)

    def _ours(self, pg: dict) -> bool:
        bundles = list((pg.get("bundles") or {}).values())
        want = {k: float(v) for k, v in self.per_worker.items() if v}
        return (pg.get("strategy") == self.strategy and self.min_workers <= len(bundles) <= self.num_workers
                and all({k: float(v) for k, v in b.items() if v} == want for b in bundles))

    def states(self) -> set[str]:
        """States of the placement groups of this run's shape."""
        from ray.util import placement_group_table

        return {pg.get("state") for pg in placement_group_table().values() if self._ours(pg)}

    # -- loop ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        since: Optional[float] = None
        next_line = 0.0
        while not self._halt.wait(self.poll_s):
            try:
                states = self.states()
            except Exception:  # noqa: BLE001 - the GCS is busy or restarting: look again next time
                continue
            now = time.monotonic()
            if "CREATED" in states:
                if since is not None and now - since >= self.interval_s:
                    print(f"[{self.label}] resources found after {now - since:.0f} s; training goes on",
                          file=self.out, flush=True)
                since = None
                continue
            if not states & set(PENDING):
                continue  # between two retries of the controller (or not started yet): the wait goes on
            if since is None:
                since, next_line = now, now + self.interval_s
            self.waited_s = now - since
            if self.limit_s and self.waited_s >= self.limit_s:
                self.gave_up = (f"waited {self.waited_s:.0f} s for {self.wanted()}; the cluster has "
                                f"{self._safe_cluster_now()} (ray.resource_wait_s={self.limit_s:g})")
                self.abort()
                return
            if now >= next_line:
                left = f"; gives up after ray.resource_wait_s={self.limit_s:g} s" if self.limit_s else ""
                print(f"[{self.label}] waiting {self.waited_s:.0f} s for resources: {self.wanted()}; the cluster "
                      f"has now {self._safe_cluster_now()}{left}", file=self.out, flush=True)
                next_line = now + self.interval_s

    def _safe_cluster_now(self) -> str:
        try:
            return self.cluster_now()
        except Exception:  # noqa: BLE001
            return "(cannot be read now)"


def watch_resources(cfg, trainer, per_worker: dict, out: TextIO) -> ResourceWait:
    """Start the `ResourceWait` of this run (below); it aborts the Train
    controller (handed to `trainer._register_sigint_handler` when `fit()` starts) past `ray.resource_wait_s`."""
    box: dict = {}
    hook = getattr(trainer, "_register_sigint_handler", None)
    if hook is not None:
        def register(controller) -> None:
            box["controller"] = controller
            hook(controller)
        trainer._register_sigint_handler = register

    def abort() -> None:
        if "controller" in box:
            import ray

            controller = box["controller"]
            try:
                ref = controller.abort.remote()
                # The controller can sit in a blocking wait for its placement group and never run the abort
                # call: past a grace period it is killed (its workers go with it; checkpoints are on disk).
                ready, _ = ray.wait([ref], timeout=15)
                if not ready:
                    ray.kill(controller, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    wait = ResourceWait(cfg.tracking.experiment or cfg.name, cfg.ray.num_workers, per_worker,
                        cfg.ray.placement_strategy, out, cfg.ray.resource_wait_s or None, abort,
                        min_workers=cfg.ray.min_workers)
    wait.start()
    return wait
