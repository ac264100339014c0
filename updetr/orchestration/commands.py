"""Subcommands of the Ray / MLflow layer: `run`, `submit`, `jobs`, `mlflow-server`, `local-cluster`.

`register(subparsers)` is called by `updetr/cli.py`; every parser sets `func(args) -> exit code`.
Exit codes: 0 ok, 1 the work failed (training, job), 2 bad input or an unusable environment (config,
address, token, storage, tracking) — always one `updetr: error: ...` line on stderr, no traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from updetr.config import ConfigError, load_config


def _fail(message: str, code: int = 2) -> int:
    print(f"updetr: error: {message}", file=sys.stderr, flush=True)
    return code


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment YAML (see experiments/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. schedule.max_steps=10")


# ------------------------------------------------------------------------------------------ run
def cmd_run(args: argparse.Namespace) -> int:
    from updetr.command_line import user_errors
    from updetr.config import load_experiment
    from updetr.orchestration.launch import RunInterrupted, run, summary
    from updetr.orchestration.run_plan import LaunchError

    try:
        exp = load_experiment(args.experiment, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    cfg = exp.stages[0].cfg
    address = args.address or cfg.ray.address
    try:
        if exp.chained:
            from updetr.orchestration.stages import RayDriver
            from updetr.pipeline import chain_summary, run_chain

            text = chain_summary(run_chain(exp, RayDriver(address)))
        else:
            text = summary(run(cfg, address=address))
    except RunInterrupted as e:
        _shutdown_ray()
        return _fail(str(e), 130)
    except LaunchError as e:
        text = str(e)
        _shutdown_ray()
        return _fail(text, 1 if text.startswith(("training failed", "evaluation failed")) else 2)
    except user_errors() as e:
        _shutdown_ray()
        return _fail(str(e))
    except KeyboardInterrupt:
        _shutdown_ray()
        return _fail("interrupted before training started; nothing to keep", 130)
    _shutdown_ray()  # flushes the workers' last log lines, so the summary below comes last
    print(text, flush=True)
    return 0


def _shutdown_ray() -> None:
    try:
        import ray

        ray.shutdown()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


# --------------------------------------------------------------------------------------- submit
def cmd_submit(args: argparse.Namespace) -> int:
    from updetr.config import config_to_yaml
    from updetr.orchestration import jobs
    from updetr.orchestration.run_plan import is_uri, run_name_for
    # Points up on purpose: `submit` also takes a sweep file, and sweeps are built on this layer.
    from updetr.sweep.spec import SweepError, is_sweep_file, load_sweep, source_files

    sweep = None
    try:
        if is_sweep_file(args.experiment):
            sweep = load_sweep(args.experiment, args.overrides, name=args.name)    # every cell, before submitting
            cfg = sweep.cells[0].experiment.stages[0].cfg
        else:
            if args.name:
                return _fail("--name applies to a sweep; name a run with name=NAME")
            cfg = load_config(args.experiment, args.overrides)
    except (ConfigError, SweepError) as e:
        return _fail(str(e))
    env = {}
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return _fail(f"--env {item}: expected KEY=VALUE")
        env[key] = value
    warnings = []
    if sweep is not None and not os.path.isabs(cfg.runtime.output_dir):
        warnings.append("runtime.output_dir is relative: the sweep's run folders and Tune state land in the job's "
                        "working dir on the head node; set runtime.output_dir=/mnt/shared/... so a resubmit resumes")
    if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")) and cfg.tracking.enabled:
        warnings.append("tracking.uri is not set: the job tracks into a SQLite file in its working dir on the head "
                        "node; set tracking.uri=http://MLFLOW:5000 (see cluster/README.md)")
    storage = cfg.ray.storage_path
    if not storage or (not is_uri(storage) and not os.path.isabs(storage)):
        warnings.append("ray.storage_path is not an absolute shared path or URI: checkpoints land in the job's "
                        "working dir on the head node; set ray.storage_path=s3://... or /mnt/shared/...")
    try:
        if sweep is not None:
            job_id = jobs.submit_sweep(args.address, source_files(sweep), args.overrides, name=args.name,
                                       job_id=args.job_id, env=env, entrypoint_num_cpus=args.entrypoint_num_cpus)
        else:
            job_id = jobs.submit(args.address, config_to_yaml(cfg), job_id=args.job_id, env=env,
                                 entrypoint_num_cpus=args.entrypoint_num_cpus)
    except jobs.JobsError as e:
        return _fail(str(e))
    address = jobs.normalize_address(args.address)
    cli = _cli()
    what = f"sweep {sweep.name}, {len(sweep.cells)} trials" if sweep is not None else f"run {run_name_for(cfg)}"
    print(f"submitted job {job_id} ({what}) to {address}", flush=True)
    print(f"  its MLflow run{'s' if sweep is not None else ''}: "
          f"{_job_tracking_hint(cfg, sweep.name if sweep is not None else None)}", flush=True)
    if sweep is not None and cfg.tracking.enabled:
        uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        print(f"  its table, once done: {cli} compare {sweep.name}" + (f" --tracking-uri {uri}" if uri else ""),
              flush=True)
    for text in warnings:
        print(f"updetr: warning: {text}", file=sys.stderr, flush=True)
    if not args.follow:
        print(f"  follow it: {cli} jobs logs {job_id} --follow --address {address}", flush=True)
        print(job_id, flush=True)
        return 0
    try:
        state = jobs.follow(args.address, job_id)
    except jobs.JobsError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail(f"stopped following; job {job_id} keeps running ({cli} jobs stop {job_id} "
                     f"--address {address})", 130)
    print(f"job {job_id}: {state}", flush=True)
    return 0 if state == "SUCCEEDED" else 1


def _cli() -> str:
    from updetr.command_line import cli_command

    return cli_command()


def _job_tracking_hint(cfg, experiment: Optional[str] = None) -> str:
    """Where a submitted job's MLflow run can be looked at, from here."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    experiment = experiment or cfg.tracking.experiment or cfg.name
    if not cfg.tracking.enabled:
        return "tracking is off (tracking.enabled=false)"
    if uri and uri.startswith(("http://", "https://")):
        return f"open {uri} (experiment '{experiment}')"
    if uri and (uri.startswith(("sqlite:////", "file:///")) or os.path.isabs(uri)):
        return f"in {uri} on the head node (experiment '{experiment}')"
    return ("in a SQLite file in the job's working dir on the head node, not reachable from here; "
            "set tracking.uri=http://MLFLOW:5000 to see it")


# ----------------------------------------------------------------------------------------- jobs
def cmd_jobs(args: argparse.Namespace) -> int:
    from updetr.orchestration import jobs

    try:
        if args.jobs_command == "list":
            found = jobs.list_jobs(args.address)
            if not found:
                print(f"no jobs on {jobs.normalize_address(args.address)}")
            for j in found:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["start_time"] / 1000)) \
                    if j["start_time"] else "-"
                print(f"{j['job_id']:<32} {j['status']:<10} started {started}")
            return 0
        if args.jobs_command == "status":
            info = jobs.status(args.address, args.job_id)
            print(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
            return 0
        if args.jobs_command == "logs":
            if args.follow:
                state = jobs.follow(args.address, args.job_id)
                print(f"job {args.job_id}: {state}", flush=True)
                return 0 if state == "SUCCEEDED" else 1
            sys.stdout.write(jobs.logs(args.address, args.job_id))
            return 0
        stopped = jobs.stop(args.address, args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
        return 0
    except jobs.JobsError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


# -------------------------------------------------------------------------------- mlflow-server
def cmd_mlflow_server(args: argparse.Namespace) -> int:
    from updetr.tracking_server import server_command, wait_for_server

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"updetr: warning: binding {args.host}: MLflow's security middleware then needs "
              f"--allowed-hosts; put it behind authentication on a shared network", file=sys.stderr)
    argv, env = server_command(args.host, args.port, args.backend_store_uri, args.artifacts_destination,
                               args.workers)
    argv += [a for a in (args.extra or []) if a != "--"]
    backend = argv[argv.index("--backend-store-uri") + 1]
    artifacts = argv[argv.index("--artifacts-destination") + 1]
    try:
        proc = subprocess.Popen(argv, env=env)
    except OSError as e:
        return _fail(f"cannot start mlflow server: {e}")

    def _forward(signum, _frame):
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    url = f"http://{args.host}:{args.port}"
    try:
        if wait_for_server(url, timeout_s=120, proc=proc):
            print(f"MLflow tracking server: {url}   (backend {backend}, artifacts {artifacts}; Ctrl-C stops it)",
                  flush=True)
            print(f"  point runs at it: updetr run EXP.yaml tracking.uri={url}", flush=True)
        return _server_exit(proc.wait(), args.port)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0


def _server_exit(code: int, port: int) -> int:
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        return _fail(f"mlflow server exited with {code} (is port {port} already in use?)", 1)
    return 0


# ------------------------------------------------------------------------------- local-cluster
def cmd_local_cluster(args: argparse.Namespace) -> int:
    from updetr.orchestration.local_cluster import run_command

    return run_command(args)


# ------------------------------------------------------------------------------------- register
def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="train with Ray Train (local Ray, or join a cluster with --address)",
                              description="Run the experiment with Ray Train. Without --address a local Ray "
                                          "sized to this machine is started. The run name is deterministic, so "
                                          "the same command after a crash resumes from the last checkpoint.")
    _experiment_args(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: HOST:6379 (GCS) or auto; default: a new local Ray "
                        "(or $RAY_ADDRESS when set, e.g. inside a Ray Job)")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("submit", help="submit the experiment (or a sweep) as a Ray Job to a cluster",
                              description="Submit `updetr run` of the resolved experiment as a Ray Job. The job's "
                                          "working dir holds the updetr package and the experiment. A sweep YAML "
                                          "(experiments/sweeps/) is validated here and submitted as `updetr sweep` "
                                          "with the files it reads.")
    _experiment_args(p)
    p.add_argument("--name", default=None, help="a sweep's name instead of the file's (see `updetr sweep --name`)")
    p.add_argument("--address", default=None, help="Ray dashboard / Jobs API, e.g. http://HEAD:8265 "
                                                   "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends (exit 1 unless it succeeded)")
    p.add_argument("--job-id", default=None, help="submission id (default: generated by Ray)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra env var for the job (repeatable)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the job driver (default 0)")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", help="list | status | logs | stop of Ray Jobs")
    jsub = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    q = jsub.add_parser("list", help="list the cluster's jobs, newest first")
    q.add_argument("--address", default=None, help="Ray dashboard / Jobs API, e.g. http://HEAD:8265")
    q.set_defaults(func=cmd_jobs)
    for action, text in (("status", "print the job's status"), ("logs", "print (or --follow) the job's logs"),
                         ("stop", "stop the job")):
        q = jsub.add_parser(action, help=text)
        q.add_argument("job_id")
        q.add_argument("--address", default=None, help="Ray dashboard / Jobs API, e.g. http://HEAD:8265")
        if action == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
        q.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("mlflow-server", help="start a lean local MLflow tracking server (127.0.0.1)",
                              description="mlflow server with a SQLite backend and a served artifact root, lean "
                                          "for a laptop: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, --workers 1. "
                                          "The default backend is the embedded store ./mlflow.db, so the UI shows "
                                          "the runs of `updetr run`.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None, help="default: sqlite:///<cwd>/mlflow.db")
    p.add_argument("--artifacts-destination", default=None, help="default: <cwd>/mlartifacts")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further `mlflow server` flags, after --")
    p.set_defaults(func=cmd_mlflow_server)

    from updetr.orchestration.local_cluster import add_arguments

    p = subparsers.add_parser("local-cluster", help="a two-node Ray cluster on this machine, for trying submit")
    add_arguments(p)
    p.set_defaults(func=cmd_local_cluster)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m updetr.orchestration ...`: these subcommands alone (the Ray Job entrypoint uses it)."""
    parser = argparse.ArgumentParser(prog="updetr")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
