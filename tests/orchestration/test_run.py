"""`updetr run` end to end on a local Ray: the smoke recipe with 2 workers, tracked in a real MLflow server.

Each Ray Train fit costs ~40-60 s on 2 cores, so assertions are grouped: one uninterrupted baseline run
(module fixture) serves the smoke checks and the step-count reference of the fault-tolerance test.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from updetr.checkpoint import load_checkpoint
from updetr.tracking import TAG_RUN_NAME, TAG_STORAGE

from .conftest import SMOKE, MlflowServer, cli_env, reap, short_tmpdir, stop_session, updetr, updetr_bg, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# 3 epochs x 8 steps per worker (32 images / 2 workers / batch 2), a checkpoint every 4 steps (so resumes
# also land mid-epoch). Few epochs: every epoch restarts the Ray Data pass (~2-3 s here).
STEPS, PER_EPOCH = 24, 8
RECIPE = ["data.synthetic_images=32", f"schedule.max_steps={STEPS}", "schedule.checkpoint_every=4",
          "schedule.log_every=2"]


def run_args(tmp: Path, server: MlflowServer, *extra: str) -> list[str]:
    return ["run", SMOKE, *RECIPE, f"tracking.uri={server.uri}", f"ray.storage_path={tmp}/ckpt",
            f"runtime.output_dir={tmp}/runs", *extra]


def mlflow_runs(server: MlflowServer, storage_prefix: str) -> list:
    """MLflow runs of the smoke experiment whose storage tag lies under `storage_prefix`."""
    return [r for r in server.runs("smoke") if r.data.tags.get(TAG_STORAGE, "").startswith(storage_prefix)]


def registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoint dirs the Train controller has registered (its snapshot), i.e. safe to resume from."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        data = json.loads(snap.read_text())
    except (OSError, ValueError):
        return []
    return [c["checkpoint_dir_name"] for c in data.get("checkpoint_results", [])]


def assert_metrics_once(server: MlflowServer, run_id: str) -> None:
    """Each step's (and epoch's) metrics are in MLflow exactly once, as in an uninterrupted run."""
    client = server.client()
    loss_steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert loss_steps == [1] + list(range(2, STEPS + 1, 2)), loss_steps
    lr_steps = sorted(m.step for m in client.get_metric_history(run_id, "lr"))
    assert lr_steps == loss_steps
    epochs = sorted(m.step for m in client.get_metric_history(run_id, "epoch/loss"))
    assert epochs == list(range(STEPS // PER_EPOCH)), epochs  # the last epoch too, once


def run_dir_of(tmp: Path) -> Path:
    dirs = [d for d in (tmp / "ckpt").glob("smoke-*") if d.is_dir()] if (tmp / "ckpt").exists() else []
    return dirs[0] if dirs else tmp / "ckpt" / "none"


def wait_registered(tmp: Path, proc, timeout: float = 240) -> list[str]:
    def ready():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        return registered_checkpoints(run_dir_of(tmp))
    return wait_for(ready, timeout, what="a registered checkpoint")


@pytest.fixture(scope="module")
def baseline(mlflow_server, tmp_path_factory):
    """One uninterrupted 2-worker run of the smoke recipe."""
    tmp = tmp_path_factory.mktemp("baseline")
    ray_tmp = short_tmpdir("urb")
    t0 = time.monotonic()
    try:
        r = updetr(*run_args(tmp, mlflow_server), cwd=tmp, env=cli_env(ray_tmp), timeout=400)
    finally:
        reap(ray_tmp)
    return tmp, r, time.monotonic() - t0


@pytest.mark.timeout(500)
def test_run_smoke_two_workers_checkpoints_and_mlflow(baseline, mlflow_server):
    tmp, r, seconds = baseline
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "2 worker(s)" in out and "Traceback" not in out
    # the closing lines say where to look
    assert f"finished at step {STEPS}" in out
    assert "  checkpoint: " in out and "  mlflow:     run " in out and "  look:       " in out
    # checkpoints: num_to_keep=2 of the every-4-steps checkpoints, our schema inside, loadable safely
    run_dir = run_dir_of(tmp)
    kept = sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert kept == [f"checkpoint_{STEPS - 4:08d}", f"checkpoint_{STEPS:08d}"], kept
    ckpt = load_checkpoint(run_dir / kept[-1] / "checkpoint.pt")
    assert ckpt["step"] == STEPS and ckpt["config"]["ray"]["num_workers"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # MLflow: one run holding params, the resolved config, per-step and per-epoch metrics, checkpoint tags
    runs = mlflow_runs(mlflow_server, str(tmp))
    assert len(runs) == 1
    run = runs[0]
    client = mlflow_server.client()
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.backbone"] == "resnet18" and p["ray.num_workers"] == "2" and p["schedule.max_steps"] == str(STEPS)
    assert run.data.tags[TAG_RUN_NAME] == run_dir.name
    assert run.data.tags["updetr.last_checkpoint"].endswith(f"checkpoint_{STEPS:08d}")
    assert run.data.tags["updetr.env.worker.torch"] == torch.__version__ and run.data.tags["updetr.git_sha"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert "config/resolved.yaml" in arts
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss_steps == [1] + list(range(2, STEPS + 1, 2))
    for key in ("lr", "images_per_s", "images_per_s_all_workers", "data/skipped_total"):
        assert len(client.get_metric_history(run.info.run_id, key)) == len(loss_steps), key
    # per-epoch metrics for every epoch, the last one included (max_steps ends the run on its last step)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss")] == list(range(STEPS // PER_EPOCH))
    assert [out.count(f"epoch {e} done") for e in range(STEPS // PER_EPOCH)] == [1] * (STEPS // PER_EPOCH)
    assert not client.get_metric_history(run.info.run_id, "resume/from_step")


@pytest.mark.timeout(600)
def test_worker_sigkill_resumes_from_checkpoint(baseline, mlflow_server, tmp_path):
    base_tmp, base, _ = baseline
    assert base.returncode == 0
    ray_tmp = short_tmpdir("urk")
    pids = tmp_path / "pids"
    # Two failures: rank 1 killed from outside after the first registered checkpoint, and rank 0 killing
    # itself right after reporting step 16's checkpoint (written to storage, maybe not yet registered).
    env = cli_env(ray_tmp, UPDETR_WORKER_PID_DIR=str(pids), UPDETR_DRILL_KILL="after_report:0:16")
    proc = updetr_bg(*run_args(tmp_path, mlflow_server), cwd=tmp_path, env=env, log=tmp_path / "run.log")
    try:
        wait_registered(tmp_path, proc)
        victim = int((pids / "rank1.pid").read_text())
        os.kill(victim, signal.SIGKILL)  # a real training worker process, by pid
        proc.wait(timeout=420)
    finally:
        stop_session(proc)
        reap(ray_tmp)
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "[FailurePolicy] RETRY" in out
    assert int((pids / "rank1.pid").read_text()) != victim  # a new worker took rank 1
    # same final step as the uninterrupted run, and training resumed from a checkpoint, not step 0
    assert f"finished at step {STEPS}" in out and f"finished at step {STEPS}" in base.stdout
    final = load_checkpoint(run_dir_of(tmp_path) / f"checkpoint_{STEPS:08d}" / "checkpoint.pt")
    assert final["step"] == STEPS
    runs = mlflow_runs(mlflow_server, str(tmp_path))
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one MLflow run, not two
    assert (pids / "drill-after_report-0-16.done").exists()
    history = mlflow_server.client().get_metric_history(runs[0].info.run_id, "resume/from_step")
    assert len(history) == 2 and min(m.value for m in history) >= 4, history
    assert max(m.value for m in history) >= 12, history
    assert runs[0].info.status == "FINISHED"
    assert_metrics_once(mlflow_server, runs[0].info.run_id)


@pytest.mark.timeout(600)
def test_driver_crash_then_same_command_resumes_into_same_mlflow_run(mlflow_server, tmp_path):
    args = run_args(tmp_path, mlflow_server)
    first_tmp = short_tmpdir("urd")
    proc = updetr_bg(*args, cwd=tmp_path, env=cli_env(first_tmp), log=tmp_path / "first.log")
    try:
        done = wait_registered(tmp_path, proc)
        os.kill(proc.pid, signal.SIGKILL)  # the `updetr run` driver process itself
        proc.wait(timeout=30)
    finally:
        stop_session(proc)
        time.sleep(2)
        reap(first_tmp)  # what the crash left of that local Ray
    assert proc.returncode == -signal.SIGKILL
    crashed_at = int(done[-1].removeprefix("checkpoint_"))
    second_tmp = short_tmpdir("urd")
    try:
        r = updetr(*args, cwd=tmp_path, env=cli_env(second_tmp), timeout=420)
    finally:
        reap(second_tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from checkpoint step" in r.stdout
    assert f"finished at step {STEPS}" in r.stdout and "resumed from step" in r.stdout
    runs = mlflow_runs(mlflow_server, str(tmp_path))
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["updetr.attempt"] == "2"
    history = mlflow_server.client().get_metric_history(run.info.run_id, "resume/from_step")
    assert history and history[-1].value >= crashed_at
    assert_metrics_once(mlflow_server, run.info.run_id)


@pytest.mark.timeout(500)
def test_tracking_server_lost_mid_run_nothing_is_lost(tmp_path):
    """Store and forward on Ray Train (2 workers): the server dies mid-run and stays away to the end; the
    run finishes, says what is pending and how to deliver it; `updetr tracking sync` then delivers every
    step's row, epoch summary and tag exactly once."""
    server = MlflowServer(tmp_path).start()
    ray_tmp = short_tmpdir("uro")
    args = ["run", SMOKE, "data.synthetic_images=32", "schedule.max_steps=16", "schedule.checkpoint_every=4",
            "schedule.log_every=1", f"tracking.uri={server.uri}", f"ray.storage_path={tmp_path}/ckpt",
            f"runtime.output_dir={tmp_path}/runs"]
    env = cli_env(ray_tmp, UPDETR_TRACKING_RETRY_S="2")
    proc = updetr_bg(*args, cwd=tmp_path, env=env, log=tmp_path / "run.log")
    try:
        wait_registered(tmp_path, proc)
        server.stop(signal.SIGKILL)  # the tracking server dies mid-run (by pid)
        proc.wait(timeout=300)
    finally:
        stop_session(proc)
        server.stop()
        reap(ray_tmp)
    out = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "finished at step 16" in out
    # once per process that tracks: the driver, rank 0 and the Train controller (it commits the metrics)
    assert 1 <= out.count("training continues, metrics, params and tags are kept") <= 3
    pending = [ln for ln in out.splitlines() if "not delivered yet" in ln]
    assert pending, out[-4000:]
    folders = sorted({ln.rsplit("tracking sync ", 1)[1].split()[0] for ln in pending})

    server.start()                                 # the same port and SQLite store
    for folder in folders:
        r = updetr("tracking", "sync", folder, cwd=tmp_path, env=cli_env())
        assert r.returncode == 0 and "delivered" in r.stdout, r.stdout + r.stderr
    try:
        (run,) = mlflow_runs(server, str(tmp_path))
        client = server.client()
        loss = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert loss == list(range(1, 17)), loss                                   # every step, once
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss")) == [0, 1]
        assert run.data.tags["updetr.last_checkpoint"].endswith("checkpoint_00000016")
        assert run.info.status == "FINISHED"
    finally:
        server.stop()
