"""A sweep of chains (pre-train -> fine-tune -> eval per trial) on real local Ray and a real MLflow server,
its driver SIGKILLed while a trial is fine-tuning: the same command re-run skips the trial's finished
pre-training, resumes its fine-tuning from the checkpoint, evaluates, and logs every step once; run a
third time, the finished sweep trains nothing."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from updetr.metric_ledger import TAG_COMMITTED
from updetr.tracking import TAG_RUN_NAME

from .conftest import REPO, cli_env, reap, short_tmpdir, stop_session, updetr, updetr_bg, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# pre-training: 4 steps; fine-tuning: 3 epochs x 4 steps (8 images, 1 worker, batch 2), a checkpoint every
# 2 steps; 4 evaluation images. One Train worker and one preprocessing actor.
SMALL = ["ray.num_workers=1", "data.preprocess_cpus=0.5", "stages.pretrain.schedule.max_steps=4",
         "stages.finetune.data.synthetic_images=8", "stages.finetune.schedule.epochs=3",
         "stages.finetune.schedule.checkpoint_every=2", "stages.finetune.schedule.eval_every=100",
         "data.synthetic_val_images=4", "schedule.log_every=1"]


def stage_runs(server, sweep: str, trial: str, stage: str) -> list:
    return [r for r in server.runs(sweep)
            if r.data.tags.get(TAG_RUN_NAME, "").startswith(f"{sweep}-{trial}-{stage}-")]


@pytest.mark.timeout(1200)
def test_sweep_of_chains_killed_mid_chain_resumes_and_a_finished_sweep_trains_nothing(mlflow_server, tmp_path):
    name = f"swc{tmp_path.name[-6:]}".replace("_", "")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "experiment": str(REPO / "experiments" / "smoke_chain.yaml"),
                                    "variants": [{"name": "a"}], "options": {"max_concurrent": 1}}))
    args = ["sweep", str(path), *SMALL, f"tracking.uri={mlflow_server.uri}", f"runtime.output_dir={tmp_path}/runs"]
    trial = f"{name}-a"
    first_tmp = short_tmpdir("usc")
    log = tmp_path / "first.log"
    proc = updetr_bg(*args, cwd=tmp_path, env=cli_env(first_tmp), log=log)
    try:
        def finetune_checkpointed():
            assert proc.poll() is None, log.read_text()[-4000:]
            runs = stage_runs(mlflow_server, name, "a", "finetune")
            return runs and runs[0].data.tags.get(TAG_COMMITTED)     # a checkpoint whose metrics are committed

        wait_for(finetune_checkpointed, timeout=900, interval=0.3, what="a fine-tuning checkpoint in the sweep")
        os.killpg(proc.pid, signal.SIGKILL)            # the whole `updetr sweep` process group, as a crash would
        proc.wait(timeout=30)
    finally:
        stop_session(proc)
        time.sleep(2)
        reap(first_tmp)
    first = log.read_text()
    assert f"[{trial}] stage 2/3 finetune" in first and f"[{trial}] stage 3/3" not in first, first[-4000:]

    second_tmp = short_tmpdir("usc")
    try:
        second = updetr(*args, cwd=tmp_path, env=cli_env(second_tmp), timeout=900)
        third = updetr(*args, cwd=tmp_path, env=cli_env(second_tmp), timeout=600)
    finally:
        reap(second_tmp)
    out = second.stdout
    assert second.returncode == 0, out[-4000:] + second.stderr[-3000:]
    assert f"[{trial}] stage 1/3 pretrain: finished earlier, skipped" in out, out[-4000:]
    assert f"[{trial}-pretrain] rank 0" not in out                          # pre-training did not run again
    resumed = [ln for ln in out.splitlines() if f"[{trial}-finetune] rank 0/1 on cpu: training resumed from step" in ln]
    assert resumed and int(resumed[0].split()[-1]) >= 2, out[-4000:]       # from its checkpoint, not from 0
    assert f"[{trial}] stage 3/3 eval" in out and "FAILED" not in out

    for stage, n in (("pretrain", 4), ("finetune", 12)):
        runs = stage_runs(mlflow_server, name, "a", stage)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info.run_name for r in runs]
        history = mlflow_server.client().get_metric_history(runs[0].info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, n + 1))     # each step exactly once
    evals = stage_runs(mlflow_server, name, "a", "eval")
    assert len(evals) == 1 and "eval/AP" in evals[0].data.metrics

    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-3000:]
    assert "rank 0/" not in third.stdout and "FAILED" not in third.stdout, third.stdout[-4000:]   # nothing trained
    for stage in ("pretrain", "finetune", "eval"):                          # no new run for any stage
        assert len(stage_runs(mlflow_server, name, "a", stage)) == 1
