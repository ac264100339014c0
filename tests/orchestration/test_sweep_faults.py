"""`updetr sweep` under trouble, on real local Ray and a real MLflow server, with pre-training-only trials
(smoke recipe, a few steps) so each costs little more than Ray's start-up:

* ASHA early stopping stops the trial whose loss is clearly worse (loss.bbox weighted 10x) after its
  first epoch: reported EARLY-STOPPED (not failed), tagged and KILLED in MLflow, its checkpoint kept;
* the driver SIGKILLed once one trial finished (after surviving the death of its own worker) and the other
  is mid-training with a checkpoint: the same command re-run completes, trains nothing of the finished
  trial again and resumes the other from its checkpoint, each step's metrics in MLflow exactly once;
* the tracking server stopped mid-sweep: the trials go on, the sweep finishes and says tracking was lost.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from updetr.metric_ledger import TAG_COMMITTED
from updetr.orchestration.local_cluster import own_processes
from updetr.tracking import TAG_RUN_NAME, TAG_STORAGE

from .conftest import (SMOKE, MlflowServer, cli_env, reap, short_tmpdir, stop_session, updetr, updetr_bg,
                       wait_for)
from .test_run import registered_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# 4 synthetic images, batch 2: 2 steps per epoch; one Train worker and one preprocessing actor per trial.
SMALL = ["ray.num_workers=1", "data.preprocess_cpus=0.5", "data.synthetic_images=4", "schedule.checkpoint_every=2",
         "schedule.log_every=1"]


def write_sweep(tmp: Path, name: str, grid: dict, **options) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "experiment": SMOKE, "grid": grid,
                                    "options": {"max_concurrent": 1, **options}}))
    return path


def sweep_args(path: Path, tmp: Path, uri: str, *extra: str) -> list[str]:
    return ["sweep", str(path), *SMALL, *extra, f"tracking.uri={uri}", f"runtime.output_dir={tmp}/runs"]


def stage_run(server: MlflowServer, sweep: str, trial: str):
    """The one MLflow run of the trial's (single) stage."""
    runs = [r for r in server.runs(sweep) if r.data.tags.get(TAG_RUN_NAME, "").startswith(f"{sweep}-{trial}-")]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps(server: MlflowServer, run, key: str) -> list[int]:
    return sorted(m.step for m in server.client().get_metric_history(run.info.run_id, key))


def cpus_back(out: str) -> None:
    free = out.split("Ray CPUs free: ")[1].split()
    assert float(free[0]) == float(free[2].rstrip(",")) > 0, out[-2000:]  # "<before> before, <after> after"


@pytest.mark.timeout(600)
def test_asha_stops_the_worse_trial_after_its_first_epoch(mlflow_server, tmp_path):
    name = f"asha{tmp_path.name[-6:]}".replace("_", "")
    path = write_sweep(tmp_path, name, {"loss.bbox": [5.0, 50.0]},
                       early_stopping={"metric": "epoch/loss", "mode": "min", "grace_period": 1,
                                       "reduction_factor": 2})
    ray_tmp = short_tmpdir("usa")
    try:
        r = updetr(*sweep_args(path, tmp_path, mlflow_server.uri, "schedule.epochs=3"), cwd=tmp_path,
                   env=cli_env(ray_tmp), timeout=540)
    finally:
        reap(ray_tmp)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]      # early-stopped is not failed
    assert "early stopping: ASHA on epoch/loss (min) per epoch" in r.stdout
    rows = {line.split()[0]: line for line in r.stdout.split("Ray CPUs free:")[1].splitlines()[1:3]}
    assert "EARLY-STOPPED: ASHA at epoch 1 of stage pretrain (epoch/loss" in rows["bbox-50.0"]
    assert "EARLY-STOPPED" not in rows["bbox-5.0"] and "FAILED" not in r.stdout
    cpus_back(r.stdout)

    good, bad = stage_run(mlflow_server, name, "bbox-5.0"), stage_run(mlflow_server, name, "bbox-50.0")
    assert good.info.status == "FINISHED" and steps(mlflow_server, good, "epoch/loss") == [0, 1, 2]
    # stopped on its first epoch's result, whose metrics and checkpoint (step 2) were kept; the workers may
    # have gone on a little while Tune decided, never to the end
    assert bad.info.status == "KILLED" and "ASHA at epoch 1" in bad.data.tags["updetr.early_stopped"]
    assert steps(mlflow_server, bad, "epoch/loss") in ([0], [0, 1])
    assert "updetr.error" not in bad.data.tags
    trial = [x for x in mlflow_server.runs(name) if x.info.run_id == bad.data.tags["mlflow.parentRunId"]][0]
    assert trial.info.status == "KILLED" and trial.data.params["loss.bbox"] == "50.0"
    assert "ASHA at epoch 1" in trial.data.tags["updetr.early_stopped"]
    kept = registered_checkpoints(Path(bad.data.tags[TAG_STORAGE]))
    assert kept and kept[0] == "checkpoint_00000002" and "checkpoint_00000006" not in kept, kept


@pytest.mark.timeout(900)
def test_driver_killed_mid_sweep_then_same_command_resumes(mlflow_server, tmp_path):
    name = f"kill{tmp_path.name[-6:]}".replace("_", "")
    path = write_sweep(tmp_path, name, {"schedule.max_steps": [6, 16]})
    args = sweep_args(path, tmp_path, mlflow_server.uri, "schedule.epochs=100")     # max_steps ends them
    short, long = f"{name}-max_steps-6", f"{name}-max_steps-16"
    pids = tmp_path / "pids"
    first_tmp = short_tmpdir("usk")
    # The first trial's worker also dies once, right after reporting step 4's checkpoint (Ray Train restarts it).
    env = cli_env(first_tmp, UPDETR_WORKER_PID_DIR=str(pids), UPDETR_DRILL_KILL="after_report:0:4")
    log = tmp_path / "first.log"
    proc = updetr_bg(*args, cwd=tmp_path, env=env, log=log)
    try:
        def long_trial_checkpointed():
            assert proc.poll() is None, log.read_text()[-4000:]
            if "finished at step 6" not in log.read_text():     # the short trial has not finished yet
                return None
            # a registered checkpoint whose metrics are committed (a kill between MLflow's metric write and
            # the commit marker's would log that checkpoint's steps twice: see README, sweeps)
            runs = [r for r in mlflow_server.runs(name) if r.data.tags.get(TAG_RUN_NAME, "").startswith(long)]
            return runs and runs[0].data.tags.get(TAG_COMMITTED)

        wait_for(long_trial_checkpointed, timeout=600, interval=0.3, what="a finished trial and a checkpointed one")
        os.killpg(proc.pid, signal.SIGKILL)            # the whole `updetr sweep` process group, as a crash would
        proc.wait(timeout=30)
    finally:
        stop_session(proc)
        time.sleep(2)
        reap(first_tmp)                                # what the crash left of that local Ray
    assert not own_processes(first_tmp)
    first = log.read_text()
    # the short trial survived its worker's death: Ray Train restarted it from its last checkpoint
    assert (pids / "drill-after_report-0-4.done").exists()
    assert f"[{short}] rank 0/1 on cpu: training resumed from step" in first and "finished at step 6" in first
    assert "finished at step 16" not in first
    killed_at = steps(mlflow_server, stage_run(mlflow_server, name, "max_steps-16"), "loss")
    second_tmp = short_tmpdir("usk")
    try:
        r = updetr(*args, cwd=tmp_path, env=cli_env(second_tmp), timeout=540)
    finally:
        reap(second_tmp)
    (tmp_path / "second.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "resuming from" in r.stdout and "FAILED" not in r.stdout
    assert f"[{short}] rank 0" not in r.stdout                                    # nothing of it trained again
    resumed = [ln for ln in r.stdout.splitlines() if f"[{long}] rank 0/1 on cpu: training resumed from step" in ln]
    assert resumed and int(resumed[0].split()[-1]) >= 2, r.stdout[-4000:]        # from its checkpoint, not 0
    cpus_back(r.stdout)
    for trial, n in (("max_steps-6", 6), ("max_steps-16", 16)):
        run = stage_run(mlflow_server, name, trial)                               # one run per stage, re-attached
        assert run.info.status == "FINISHED"
        history = [(m.step, m.timestamp) for m in mlflow_server.client().get_metric_history(run.info.run_id, "loss")]
        assert sorted(s for s, _ in history) == list(range(1, n + 1)), sorted(history)   # each step exactly once
    assert not killed_at or killed_at[-1] < 16


@pytest.mark.timeout(600)
def test_tracking_server_lost_mid_sweep_trials_go_on(tmp_path):
    server = MlflowServer(tmp_path).start()
    name = f"lost{tmp_path.name[-6:]}".replace("_", "")
    path = write_sweep(tmp_path, name, {"loss.bbox": [5.0, 2.0]})
    ray_tmp = short_tmpdir("usl")
    log = tmp_path / "sweep.log"
    proc = updetr_bg(*sweep_args(path, tmp_path, server.uri, "schedule.max_steps=8"), cwd=tmp_path,
                     env=cli_env(ray_tmp), log=log)
    try:
        wait_for(lambda: proc.poll() is not None or f"[{name}-bbox-5.0] step 2/" in log.read_text(),
                 timeout=300, what="the first trial training")
        server.stop()                                  # the tracking server goes away mid-sweep
        proc.wait(timeout=420)
    finally:
        stop_session(proc)
        server.stop()
        reap(ray_tmp)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert out.count("finished at step 8") == 2 and "FAILED" not in out
    assert "this trial runs untracked" in out                                     # the second trial started after
    assert "tracking lost during the sweep" in out and "Traceback" not in out
    cpus_back(out)
