"""Ray overhead: steady-state steps/s of the same training through `updetr run` (Ray Train, 1 worker, Ray Data)
vs the in-process engine of `updetr debug` (local batches), in the same benchmark run.

Both paths train the same config with the same engine and log the same metrics to an MLflow store every
`--log-every` steps; the engine's `steps_per_s` window of each log point is read back from MLflow, the first
`--warmup` windows are dropped, and the steady-state rate is the number of steps over the summed window times.
Each dataset is large enough to stay inside one epoch, so per-epoch Ray Data restarts are not in the figure
(they are in the wall time printed beside it).

    python benchmarks/bench_ray_overhead.py                       # smoke + paper shape, a few minutes on 2 CPUs
    python benchmarks/bench_ray_overhead.py --only smoke --steps 80

Workloads: `smoke` (experiments/smoke.yaml: ResNet-18, d=64, N=10, M=2, ~96-160 px images) and `paper`
(ResNet-50 frozen, d=256, 6+6 layers, N=100, M=10, batch 2, shorter side 320-480, longer <= 600, patches 128).
Torch threads are the same on both paths (`--threads`, default: cores - 1, leaving one for the data process).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from updetr.config import load_config  # noqa: E402

WORKLOADS = {
    "smoke": (REPO / "experiments" / "smoke.yaml", []),
    "paper": (None, ["name=paper_shape", "model.backbone=resnet50", "model.num_queries=100",
                     "pretext.num_patches=10", "data.batch_size=2", "data.synthetic_size=[320,640]"]),
}


def overrides_for(name: str, steps: int, threads: int, log_every: int, store: Path, tag: str) -> list[str]:
    _, extra = WORKLOADS[name]
    cfg0 = load_config(WORKLOADS[name][0], extra)
    images = (steps + 4) * cfg0.data.batch_size  # one epoch covers every measured step
    return [*extra, f"data.synthetic_images={images}", "data.num_workers=1", "data.preprocess_cpus=0.5",
            f"schedule.max_steps={steps}", f"schedule.log_every={log_every}", f"schedule.checkpoint_every={10 * steps}",
            "schedule.epochs=1", f"runtime.threads={threads}", "runtime.device=cpu", "ray.num_workers=1",
            "ray.cpus_per_worker=1", f"ray.storage_path={store}/ray", f"runtime.output_dir={store}/runs",
            f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.experiment=bench-{name}", f"ray.run_name={tag}"]


def steady_rate(client, run_id: str, warmup: int) -> tuple[float, int]:
    """Steps/s over the engine's throughput windows after `warmup` windows (windows of log_every steps)."""
    hist = sorted(client.get_metric_history(run_id, "steps_per_s"), key=lambda m: m.step)
    steps = [m.step for m in hist]
    windows = [(b - a, m.value) for a, b, m in zip([0] + steps[:-1], steps, hist)]
    kept = [(n, r) for n, r in windows[warmup:] if r > 0]
    total_steps = sum(n for n, _ in kept)
    total_time = sum(n / r for n, r in kept)
    return (total_steps / total_time if total_time else float("nan")), total_steps


def bench_local(name: str, args, store: Path) -> tuple[float, int, float]:
    """The `updetr debug` path: engine Trainer + local_pretrain_batches in this process."""
    import torch

    from updetr.config import config_to_dict, config_to_yaml
    from updetr.data import local_pretrain_batches
    from updetr.engine import Trainer
    from updetr.tracking import start_tracking

    cfg = load_config(WORKLOADS[name][0], overrides_for(name, args.steps, args.threads, args.log_every, store, "local"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    tracker = start_tracking(True, cfg.tracking.uri, cfg.tracking.experiment, "local", f"{store}/local",
                             config_to_dict(cfg), config_to_yaml(cfg))

    class CB:
        def on_step(self, state, metrics):
            tracker.log_metrics(metrics, step=state.step)

        def on_checkpoint(self, state, ckpt):
            pass

        def on_epoch_end(self, state, metrics):
            pass

    t0 = time.perf_counter()
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.fit(lambda epoch, skip: local_pretrain_batches(cfg, epoch, skip=skip), CB())
    wall = time.perf_counter() - t0
    tracker.end()
    rate, n = steady_rate(tracker.client, tracker.run_id, args.warmup)
    return rate, n, wall


def bench_ray(name: str, args, store: Path) -> tuple[float, int, float]:
    """The `updetr run` path: local Ray, TorchTrainer with 1 worker, Ray Data pipeline (driver in-process)."""
    from updetr.orchestration.launch import run

    cfg = load_config(WORKLOADS[name][0], overrides_for(name, args.steps, args.threads, args.log_every, store, "ray"))
    t0 = time.perf_counter()
    outcome = run(cfg, out=open(os.devnull, "w"))
    wall = time.perf_counter() - t0
    rate, n = steady_rate(outcome.tracker.client, outcome.tracker.run_id, args.warmup)
    return rate, n, wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(WORKLOADS), default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per path (default: smoke 60, paper 12)")
    p.add_argument("--log-every", type=int, default=None, help="window length (default: smoke 10, paper 2)")
    p.add_argument("--warmup", type=int, default=1, help="windows dropped at the start")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="torch threads on both paths (default: cores - 1, one core left for data)")
    p.add_argument("--keep", default=None, help="keep the stores in this folder")
    args = p.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    names = [args.only] if args.only else ["smoke", "paper"]
    rows = []
    for name in names:
        a = argparse.Namespace(**vars(args))
        a.steps = args.steps or {"smoke": 60, "paper": 12}[name]
        a.log_every = args.log_every or {"smoke": 10, "paper": 2}[name]
        store = Path(args.keep or tempfile.mkdtemp(prefix="bench-ray-")) / name
        store.mkdir(parents=True, exist_ok=True)
        load0 = os.getloadavg()[0]
        local = bench_local(name, a, store)
        ray_ = bench_ray(name, a, store)
        import ray

        ray.shutdown()
        rows.append((name, a.steps, local, ray_, load0))
        if not args.keep:
            shutil.rmtree(store.parent, ignore_errors=True)
    print(f"\nRay overhead ({os.cpu_count()} CPUs, torch threads {args.threads}; steady state after "
          f"{args.warmup} window(s); load average at start in brackets)")
    print(f"{'workload':<8} {'steps':>5} {'debug steps/s':>14} {'run steps/s':>12} {'run/debug':>10} {'overhead':>9} "
          f"{'debug wall s':>13} {'run wall s':>11}")
    for name, steps, (lr, ln, lw), (rr, rn, rw), load0 in rows:
        print(f"{name:<8} {steps:>5} {lr:>14.3f} {rr:>12.3f} {rr / lr:>10.3f} {100 * (lr / rr - 1):>8.1f}% "
              f"{lw:>13.1f} {rw:>11.1f}   [load {load0:.1f}; measured {ln} / {rn} steps]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
