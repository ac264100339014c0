"""Sweep overhead: the same N smoke chains (pre-train -> fine-tune -> eval) run as one `updetr sweep` (Ray Tune
trials) vs one by one with `updetr run`, in the same benchmark run; wall time and CPU-seconds of every process
involved (the CLI, Ray's GCS / raylet / dashboard / workers / Train and Data actors, MLflow's store).

CPU accounting: Ray's raylet reaps its worker processes itself and the kernel drops the CPU time of a
process reaped by a parent that is never waited for, so `getrusage(RUSAGE_CHILDREN)` misses most of Ray's
actors (on a quiet 2-core machine it saw 19 CPU-s of a stage that kept both cores busy for over a minute).
Instead a thread samples every process below this one (`TreeCpu`: psutil, every 0.2 s; this process is the
*child subreaper*, `prctl(PR_SET_CHILD_SUBREAPER)`, so orphaned daemons stay below it) and sums each
process' last-seen user + system CPU; only the last < 0.2 s of a process' life can escape it. After a path
exits this process waits until every descendant is gone (leftovers after 60 s are stopped).

    python benchmarks/bench_sweep_overhead.py                    # 2 chains, sweep 1 at a time (pure overhead)
    python benchmarks/bench_sweep_overhead.py --chains 3 --concurrency 1 2

Chains are smoke-sized (`--steps` steps per training stage, 1 Train worker) so the figure is the overhead, not
the training; the sweep's trials differ only in `seed`, and each `updetr run` gets the same settings as its cell.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAIN = REPO / "experiments" / "smoke_chain.yaml"
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed (Linux only)")


class TreeCpu:
    """CPU-seconds of every process below this one while it runs, per process (see the module docstring).

    `with TreeCpu() as tree: ...`, then `tree.total` (CPU-s) and `tree.by_name()` ({process name: CPU-s},
    Ray actors by their `ray::Class` title)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.seen: dict[tuple[int, float], tuple[str, float]] = {}     # (pid, start time) -> (name, CPU-s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    key, name = (p.pid, p.create_time()), _process_name(p)
            except psutil.Error:
                continue                                   # gone between listing and reading
            self.seen[key] = (name, t.user + t.system)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeCpu":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def total(self) -> float:
        return sum(cpu for _, cpu in self.seen.values())

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, cpu in self.seen.values():
            out[name] = out.get(name, 0.0) + cpu
        return merge_titles([out])[0]


def merge_titles(tables: list[dict[str, float]]) -> list[dict[str, float]]:
    """{process name: CPU-s} tables with a name seen while its title was cut to 15 characters
    (`ray::RayTrainWo`) counted under the full title seen anywhere in `tables` (`ray::RayTrainWorker`)."""
    names = {n for t in tables for n in t}
    full = {n: next((m for m in sorted(names) if m != n and m.startswith(n)), n) for n in names}
    merged = []
    for t in tables:
        out: dict[str, float] = {}
        for name, cpu in t.items():
            out[full[name]] = out.get(full[name], 0.0) + cpu
        merged.append(dict(sorted(out.items(), key=lambda kv: -kv[1])))
    return merged


def _process_name(p) -> str:
    """`ray::TrainController`, `raylet`, `updetr run`, ...: what a reader recognises."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0].split("(")[0]
    if cmd and len(cmd) > 2 and cmd[1:3] == ["-m", "updetr"]:
        return "updetr " + (cmd[3] if len(cmd) > 3 else "")
    for arg in cmd[:3]:
        base = os.path.basename(arg)
        if base.endswith(".py") or base in ("gcs_server", "raylet"):
            return base
    return p.name()


def reap_descendants(timeout_s: float = 60.0) -> int:
    """Wait until this process has no children left (reaping orphans re-parented to it); processes still alive
    after `timeout_s` (all started by this benchmark) are stopped. Returns how many had to be stopped."""
    import psutil

    deadline, stopped = time.monotonic() + timeout_s, 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return stopped                               # no children at all
        if pid:
            continue
        if time.monotonic() > deadline:
            left = psutil.Process().children(recursive=True)
            for p in left:
                try:
                    p.kill()
                    stopped += 1
                except psutil.NoSuchProcess:
                    pass
            deadline = time.monotonic() + 10
        time.sleep(0.2)


def run_path(argv: list[str], cwd: Path, log: Path) -> tuple[float, float, int]:
    """(wall s, CPU s of every process it started, exit code) of one CLI call in its own session and Ray temp dir."""
    ray_tmp = tempfile.mkdtemp(prefix="ubo", dir="/tmp")        # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    t0 = time.monotonic()
    with TreeCpu() as tree, open(log, "a") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "updetr", *argv], cwd=cwd, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait()
        wall = time.monotonic() - t0
        stopped = reap_descendants()
    if stopped:
        print(f"  note: {stopped} leftover process(es) stopped after the path ended", flush=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return wall, tree.total, code


def chain_overrides(steps: int, work: Path) -> list[str]:
    """Smoke chain with `steps` steps per training stage, 1 Train worker, everything under `work`."""
    return ["ray.num_workers=1", "data.preprocess_cpus=0.25", f"schedule.max_steps={steps}",
            "stages.finetune.schedule.eval_every=100", "data.synthetic_val_images=8",
            "stages.finetune.data.synthetic_images=16", f"runtime.output_dir={work}/runs",
            f"tracking.uri=sqlite:///{work}/mlflow.db"]


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=2, help="number of chains (sweep trials)")
    ap.add_argument("--steps", type=int, default=8, help="training steps per stage")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1],
                    help="sweep runs to time, by trials at a time (1: the pure per-trial overhead)")
    ap.add_argument("--keep", help="keep the work folder here (logs, runs, MLflow store)")
    args = ap.parse_args()
    become_subreaper()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1, args.chains + 1))
    print(f"sweep overhead: {args.chains} smoke chains (pretrain -> finetune -> eval, {args.steps} steps per "
          f"training stage, 1 Train worker), {os.cpu_count()} CPUs; logs in {work}", flush=True)
    results = []

    seq_dir = work / "run"
    seq_dir.mkdir(exist_ok=True)
    print(f"updetr run x{args.chains}, one by one (load {load()}) ...", flush=True)
    wall = cpu = 0.0
    for seed in seeds:
        w, c, code = run_path(["run", str(CHAIN), f"seed={seed}", f"name=bench-seed-{seed}",
                               *chain_overrides(args.steps, seq_dir)], seq_dir, seq_dir / "run.log")
        if code != 0:
            print(f"updetr run seed={seed} failed ({code}); see {seq_dir / 'run.log'}", file=sys.stderr)
            return 1
        print(f"  seed {seed}: {w:.1f} s wall, {c:.1f} CPU-s", flush=True)
        wall, cpu = wall + w, cpu + c
    results.append((f"updetr run x{args.chains}, one by one", wall, cpu))

    for k in args.concurrency:
        sw_dir = work / f"sweep-{k}"
        sw_dir.mkdir(exist_ok=True)
        spec = sw_dir / "bench.yaml"
        spec.write_text(f"name: bench\nexperiment: {CHAIN}\ngrid:\n  seed: {seeds}\n"
                        f"options: {{max_concurrent: {k}, workers_per_trial: 1}}\n")
        print(f"updetr sweep, {k} at a time (load {load()}) ...", flush=True)
        w, c, code = run_path(["sweep", str(spec), *chain_overrides(args.steps, sw_dir)], sw_dir, sw_dir / "sweep.log")
        if code != 0:
            print(f"updetr sweep failed ({code}); see {sw_dir / 'sweep.log'}", file=sys.stderr)
            return 1
        results.append((f"updetr sweep, {k} at a time", w, c))
    print(f"(load average after: {load()})\n")

    width = max(len(r[0]) for r in results)
    print(f"{'path':<{width}}  {'wall s':>8}  {'CPU s':>8}  {'wall / run':>10}  {'CPU / run':>9}")
    base_wall, base_cpu = results[0][1], results[0][2]
    for name, w, c in results:
        print(f"{name:<{width}}  {w:8.1f}  {c:8.1f}  {w / base_wall:10.2f}  {c / base_cpu:9.2f}")
    for name, w, c in results[1:]:
        print(f"per trial, {name} vs updetr run: {(w - base_wall) / args.chains:+.1f} s wall, "
              f"{(c - base_cpu) / args.chains:+.1f} CPU-s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
