"""`updetr run` with the smoke recipe's default worker count on real image data (issue 12), and the stall
watchdog. Local Ray on this machine (2 cores in CI): before the resource planner, the folder and shard
runs never reached a step (the read tasks found no free CPU) and waited in silence.

Four Ray runs in all (each ~60-100 s on 2 cores); assertions are grouped into them.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from updetr.data.synthetic import write_bad_files, write_image_folder

from .conftest import SMOKE, cli_env, reap, short_tmpdir, stop_session, updetr, updetr_bg, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

GOOD, BAD_DROPPED, BAD_CONVERTED = 27, 4, 5  # write_bad_files: 4 unusable files, 5 converted to RGB


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """27 JPEGs in ImageNet-like class folders plus one file per bad-data case (36 files)."""
    root = tmp_path_factory.mktemp("images") / "train"
    write_image_folder(root, GOOD, seed=3, size_range=(96, 160))
    cases = write_bad_files(root / "bad")
    assert len(cases) == BAD_DROPPED + BAD_CONVERTED
    return root


def mlflow_run(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, runs
    return client, runs[0]


def run_smoke(tmp: Path, *overrides: str, env_extra=None, timeout=420):
    ray_tmp = short_tmpdir("urf")
    try:
        return updetr("run", SMOKE, f"ray.storage_path={tmp}/ckpt", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                      *overrides, cwd=tmp, env=cli_env(ray_tmp, **(env_extra or {})), timeout=timeout)
    finally:
        reap(ray_tmp)


@pytest.mark.timeout(500)
def test_run_on_image_folder_with_defaults(image_folder, tmp_path):
    # 36 items / 2 workers / batch 2 = 9 steps per worker and epoch; checkpoint_every=9 puts the last periodic
    # checkpoint on the final epoch end (the engine then saves that step again; Ray used to count it twice).
    t0 = time.monotonic()
    r = run_smoke(tmp_path, "data.source=folder", f"data.path={image_folder}", "schedule.epochs=2",
                  "schedule.checkpoint_every=9", "schedule.log_every=3", "ray.num_to_keep=2")
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-3000:]
    assert time.monotonic() - t0 < 400
    assert "2 worker(s) x 0.5 CPU, 1 preprocessing actor(s) x 0.75 CPU + reads 0.25 CPU on 2 CPU(s)" in out \
        or "on 2 CPU(s)" not in out  # the plan line (exact on the 2-core CI machine)
    assert "finished at step 18 (epoch 2)" in out and "Traceback" not in out + r.stderr
    # the folder's size is known, so progress lines carry a total and an ETA
    assert re.search(r"^\[smoke\] step 3/18 ep 0 .* ETA \d+m\d\ds$", out, re.M), out[-3000:]
    # Ray's routine lines are filtered; ours come without the "(RayTrainWorker pid=...)" prefix
    for noise in ("Reporting training result", "Checkpoint successfully created", "RayDeprecationWarning",
                  "has constructor arguments"):
        assert noise not in out + r.stderr, noise
    # skipped and converted items apart, summed over both workers
    for epoch in (0, 1):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"[smoke] epoch {epoch} done"))
        assert f"skipped {BAD_DROPPED} bad (" in line and f"converted/fixed {BAD_CONVERTED} (" in line, line
    # num_to_keep=2 keeps two checkpoints: 9 and 18
    run_dir = next((tmp_path / "ckpt").glob("smoke-*"))
    kept = sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert kept == ["checkpoint_00000009", "checkpoint_00000018"], kept
    client, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"
    for key, value in (("epoch/skipped_total", BAD_DROPPED), ("epoch/converted_total", BAD_CONVERTED),
                       ("epoch/skipped_truncated", 1), ("epoch/skipped_converted_cmyk", 1)):
        assert [m.value for m in client.get_metric_history(run.info.run_id, key)] == [value, value], key


@pytest.mark.timeout(600)
def test_run_on_shards_ctrl_c_then_same_command_finishes(image_folder, tmp_path):
    r = updetr("data", "shard", str(image_folder), str(tmp_path / "shards"), "--shard-size", "10", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    args = ["run", SMOKE, "data.source=shards", f"data.path={tmp_path / 'shards'}", "schedule.max_steps=8",
            "schedule.checkpoint_every=3", "schedule.log_every=1", f"ray.storage_path={tmp_path}/ckpt",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    # Ctrl-C as a terminal sends it: SIGINT to the whole process group
    ray_tmp = short_tmpdir("urf")
    log = tmp_path / "first.log"
    proc = updetr_bg(*args, cwd=tmp_path, env=cli_env(ray_tmp), log=log)
    try:
        wait_for(lambda: proc.poll() is not None or "step 4/8" in log.read_text(), 300, what="step 4")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        stop_session(proc)
        reap(ray_tmp)
    out = log.read_text()
    assert proc.returncode == 130, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("updetr: error:")]
    assert len(errors) == 1 and "interrupted: last checkpoint" in errors[0] and "marked KILLED" in errors[0], out[-3000:]
    assert "Traceback" not in out
    _, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED"
    # the same command continues from the kept checkpoint and finishes on shards
    r = run_smoke(tmp_path, *args[2:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "resuming from checkpoint step" in r.stdout and "finished at step 8" in r.stdout
    _, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "FINISHED"


@pytest.mark.timeout(400)
def test_stalled_pipeline_is_reported_with_the_operator_then_fails(image_folder, tmp_path):
    # Drill: every preprocessing call blocks, so no batch ever reaches a worker.
    r = run_smoke(tmp_path, "data.source=folder", f"data.path={image_folder}", "ray.num_workers=1",
                  "ray.stall_warn_s=15", "ray.stall_fail_s=40", "ray.max_failures=0",
                  env_extra={"UPDETR_DRILL_STALL_PREPROCESS": "1"})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    warn = [ln for ln in r.stdout.splitlines() if "data pipeline stalled: no batch for" in ln]
    assert warn and "the first batch" in warn[0], r.stdout[-3000:]
    assert "MapBatches(_StalledPreprocessor): tasks" in warn[0] and "free CPU" in warn[0], warn[0]
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("updetr: error: training failed: "), r.stderr[-3000:]
    assert "data pipeline stalled" in errors[0] and "MapBatches(_StalledPreprocessor)" in errors[0]
    assert "Traceback" not in r.stderr
    _, run = mlflow_run(tmp_path / "mlflow.db")
    assert run.info.status == "FAILED"
    assert "MapBatches(_StalledPreprocessor)" in run.data.tags["updetr.stall"]
    assert "data pipeline stalled" in run.data.tags["updetr.error"]
