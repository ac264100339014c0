"""Where a Ray stage's fixed cost goes: `updetr run` of a tiny stage, phase by phase, against `updetr debug` of
the same work measured in the same benchmark run.

    python benchmarks/bench_stage_overhead.py                    # smoke, 2 steps, 2 repeats of each path
    python benchmarks/bench_stage_overhead.py --chain            # + the smoke chain (3 stages) on both paths
    python benchmarks/bench_stage_overhead.py --repeats 3 --steps 2

Each path is one CLI call in its own process, session and Ray temp dir; the paths alternate (debug, run,
debug, run, ...) so a change in the machine's load hits both. Phases come from `UPDETR_PHASE_LOG`
(updetr/util/phases.py): the driver and every Ray Train worker append a timestamp at each boundary, and
the benchmark adds the launch and exit of the CLI process. CPU seconds count every process a path started
(CLI, GCS, raylet, dashboard, Ray workers, Train and Data actors), sampled per process while they live
(`TreeCpu` in bench_sweep_overhead.py), and the run's CPU is also broken down by process. The load average
is printed beside every figure; on a shared machine CPU seconds are the steadier figure.

Targets: `updetr run` of a 2-step smoke stage <= `updetr debug` + 12 s; in a chain (Ray already up) each
further stage costs <= 8 s more than the same stage under `updetr debug`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_sweep_overhead import TreeCpu, become_subreaper, load, merge_titles, reap_descendants  # noqa: E402

from updetr.phases import ENV, read  # noqa: E402

SMOKE = REPO / "experiments" / "smoke.yaml"
CHAIN = REPO / "experiments" / "smoke_chain.yaml"

# (label, from mark, to mark): "d:" marks are the CLI process', "w:" marks rank 0's worker process'
PHASES = [
    ("python start + CLI imports", "d:launch", "d:cli_ready"),
    ("config, data check, resource plan", "d:cli_ready", "d:preflight_done"),
    ("Ray start (ray.init)", "d:preflight_done", "d:ray_up"),
    ("Ray Data pipeline built (driver)", "d:ray_up", "d:data_built"),
    ("MLflow run opened", "d:data_built", "d:mlflow_open"),
    ("trainer built", "d:mlflow_open", "d:fit_start"),
    ("controller, placement, worker processes", "d:fit_start", "w:worker_import_start"),
    ("worker imports (torch, engine, task)", "w:worker_import_start", "w:worker_import_end"),
    ("worker group set-up (backend, shard)", "w:worker_import_end", "w:worker_fn"),
    ("model build + restore", "w:worker_fn", "w:worker_setup"),
    ("data pipeline start -> first step", "w:worker_setup", "w:first_step"),
    ("training steps", "w:first_step", "w:report_start"),
    ("final report + checkpoint", "w:report_start", "w:report_end"),
    ("worker end -> fit() returns", "w:report_end", "d:fit_end"),
    ("closing the stage (MLflow, summary)", "d:fit_end", "d:stage_end"),
    ("gap to Ray shutdown", "d:stage_end", "d:shutdown_start"),
    ("Ray shutdown", "d:shutdown_start", "d:shutdown_end"),
    ("process exit", "d:shutdown_end", "d:exit"),
]


def run_cli(argv: list[str], cwd: Path, log: Path, phase_log: Path, tree: Path = REPO) -> dict:
    """One CLI call with the code of `tree`: wall, CPU of its whole process tree, exit code, launch/exit
    times, the phase marks."""
    import subprocess

    ray_tmp = tempfile.mkdtemp(prefix="ubs", dir="/tmp")        # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1", ENV: str(phase_log),
                "PYTHONPATH": str(tree) + os.pathsep + env.get("PYTHONPATH", "")})
    load0 = load()
    t0, launch = time.monotonic(), time.time()
    with TreeCpu() as tree, open(log, "a") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "updetr", *argv], cwd=cwd, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait()
        end = time.time()
        wall = time.monotonic() - t0
        stopped = reap_descendants()
    if stopped:
        print(f"  note: {stopped} leftover process(es) stopped after the path ended", flush=True)
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"wall": wall, "cpu": tree.total, "by_process": tree.by_name(), "code": code, "launch": launch, "exit": end,
            "pid": proc.pid, "marks": read(str(phase_log)), "load": f"{load0} -> {load()}"}


def phase_times(res: dict) -> dict[str, float]:
    """Seconds per phase of one `updetr run` of a single stage (first occurrence of each mark; the last of
    `report_*`, the final checkpoint)."""
    marks = res["marks"]
    rank0 = next((m["pid"] for m in marks if m["phase"] == "report_start"), None)
    pids = {"d": res["pid"], "w": rank0}

    def at(key: str) -> float | None:
        who, name = key.split(":")
        if name in ("launch", "exit"):
            return res[name]
        hits = [m["t"] for m in marks if m["phase"] == name and m["pid"] == pids[who]]
        if not hits:
            return None
        return hits[-1] if name.startswith("report_") else hits[0]

    out = {}
    for label, a, b in PHASES:
        ta, tb = at(a), at(b)
        out[label] = (tb - ta) if (ta is not None and tb is not None) else float("nan")
    return out


def stage_walls(res: dict) -> dict[str, float]:
    """Per chain stage: seconds between its chain_stage_start and chain_stage_end marks."""
    starts, walls = {}, {}
    for m in res["marks"]:
        kind, _, name = m["phase"].partition(":")
        if kind == "chain_stage_start":
            starts[name] = m["t"]
        elif kind == "chain_stage_end" and name in starts:
            walls[name] = m["t"] - starts[name]
    return walls


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--chain", action="store_true", help="also the smoke chain (3 stages) on both paths")
    ap.add_argument("--only-chain", action="store_true", help="the chain only")
    ap.add_argument("--work", default=None, help="folder for runs and logs (default: a temp dir)")
    ap.add_argument("--before", default=None, metavar="TREE",
                    help="also `updetr run` with the code of another checkout (e.g. the previous commit, "
                         "`git worktree add`), interleaved with the others: before/after in the same run")
    args = ap.parse_args()
    become_subreaper()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-stage-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; load average at start {load()}; work dir {work}", flush=True)

    def overrides(tag: str, steps_key: str = "schedule.max_steps") -> list[str]:
        return [f"{steps_key}={args.steps}", f"runtime.output_dir={work}/{tag}/runs",
                f"ray.storage_path={work}/{tag}/ray", f"tracking.uri=sqlite:///{work}/{tag}/mlflow.db"]

    before = Path(args.before).resolve() if args.before else None
    paths = ["debug", "run"] + (["before"] if before else [])
    single: dict[str, list[dict]] = {p: [] for p in paths}
    chain: dict[str, list[dict]] = {"debug": [], "run": []}
    for r in range(args.repeats):
        if not args.only_chain:
            for path in paths:
                tag = f"{path}{r}"
                tree = before if path == "before" else REPO
                res = run_cli([path if path != "before" else "run", str(tree / "experiments" / "smoke.yaml"),
                               *overrides(tag)], work, work / f"{tag}.log", work / f"{tag}.phases", tree)
                single[path].append(res)
                print(f"  smoke {path:<5} rep {r + 1}: wall {res['wall']:6.1f} s, CPU {res['cpu']:6.1f} s, "
                      f"exit {res['code']}, load {res['load']}", flush=True)
        if args.chain or args.only_chain:
            for path in ("debug", "run"):
                tag = f"chain-{path}{r}"
                res = run_cli([path, str(CHAIN), *overrides(tag), "stages.finetune.schedule.eval_every=100"],
                              work, work / f"{tag}.log", work / f"{tag}.phases")
                chain[path].append(res)
                walls = stage_walls(res)
                print(f"  chain {path:<5} rep {r + 1}: wall {res['wall']:6.1f} s, CPU {res['cpu']:6.1f} s, exit "
                      f"{res['code']}, stages " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items())
                      + f", load {res['load']}", flush=True)

    if single["run"]:
        for path in paths[1:]:
            print(f"\n`updetr run` of one smoke stage ({'this code' if path == 'run' else before}), where the time "
                  f"goes (median over repeats, seconds of wall clock; each repeat in brackets):", flush=True)
            table = [phase_times(res) for res in single[path]]
            for label, _, _ in PHASES:
                vals = [t[label] for t in table]
                print(f"  {label:<48} {med(vals):6.1f}   (" + ", ".join(f"{v:.1f}" for v in vals) + ")")
        dw = med([x["wall"] for x in single["debug"]])
        rw = med([x["wall"] for x in single["run"]])
        dc = med([x["cpu"] for x in single["debug"]])
        rc = med([x["cpu"] for x in single["run"]])
        print(f"\n  updetr debug: wall {dw:.1f} s, CPU {dc:.1f} s   updetr run: wall {rw:.1f} s, CPU {rc:.1f} s")
        print(f"  run - debug: {rw - dw:+.1f} s wall ({rw / dw:.2f}x), {rc - dc:+.1f} CPU-s ({rc / dc:.2f}x); "
              f"target <= +12 s wall: {'met' if rw - dw <= 12 else 'NOT met'}")
        for i, (d, r) in enumerate(zip(single["debug"], single["run"])):
            print(f"    rep {i + 1}: run - debug {r['wall'] - d['wall']:+.1f} s wall, {r['cpu'] - d['cpu']:+.1f} CPU-s")
        print("\n  where `updetr run`'s CPU goes, by process (median over repeats, CPU-s), against `updetr debug`'s "
              f"{dc:.1f} CPU-s in one process:")
        tables = merge_titles([x["by_process"] for x in single["run"]])
        names = {n for t in tables for n in t}
        rows = sorted(((med([t.get(n, 0.0) for t in tables]), n) for n in names), reverse=True)
        for cpu, name in rows:
            if cpu >= 0.3:
                print(f"    {name:<40} {cpu:6.1f}")
        print(f"    {'(processes under 0.3 CPU-s each)':<40} {sum(c for c, _ in rows if c < 0.3):6.1f}")
        if before:
            bw, bc = med([x["wall"] for x in single["before"]]), med([x["cpu"] for x in single["before"]])
            print(f"  before ({before}): wall {bw:.1f} s, CPU {bc:.1f} s; before - debug {bw - dw:+.1f} s wall, "
                  f"{bc - dc:+.1f} CPU-s; this code saves {bw - rw:.1f} s wall, {bc - rc:.1f} CPU-s per stage")
    if chain["run"]:
        print("\nsmoke chain, per stage (median over repeats, wall seconds): debug / run / overhead", flush=True)
        dstages = [stage_walls(x) for x in chain["debug"]]
        rstages = [stage_walls(x) for x in chain["run"]]
        names = list(rstages[0]) if rstages and rstages[0] else []
        for i, name in enumerate(names):
            d = med([s.get(name, float("nan")) for s in dstages])
            r = med([s.get(name, float("nan")) for s in rstages])
            note = "" if i == 0 else f"   target <= +8 s: {'met' if r - d <= 8 else 'NOT met'}"
            print(f"  {name:<10} {d:6.1f} / {r:6.1f} / {r - d:+6.1f}{note}")
        dw, rw = med([x["wall"] for x in chain["debug"]]), med([x["wall"] for x in chain["run"]])
        dc, rc = med([x["cpu"] for x in chain["debug"]]), med([x["cpu"] for x in chain["run"]])
        print(f"  whole chain: debug {dw:.1f} s (CPU {dc:.1f} s), run {rw:.1f} s (CPU {rc:.1f} s), "
              f"run - debug {rw - dw:+.1f} s wall, {rc - dc:+.1f} CPU-s")
    print(f"\nload average at the end {load()}", flush=True)
    bad = [x for xs in (*single.values(), *chain.values()) for x in xs if x["code"] != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
