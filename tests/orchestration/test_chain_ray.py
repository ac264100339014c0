"""The chained smoke experiment on Ray (`updetr run`), with the driver killed during fine-tuning: the re-run
skips pre-training, resumes fine-tuning from its checkpoint, evaluates, and MLflow holds one parent run
with one child run per stage. One test: each Ray Train fit costs ~40-60 s on 2 cores."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from updetr.checkpoint import load_checkpoint

from .conftest import REPO, cli_env, reap, short_tmpdir, stop_session, updetr, updetr_bg, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CHAIN = str(REPO / "experiments" / "smoke_chain.yaml")
# pre-training: 4 steps; fine-tuning: 2 epochs x 4 steps per worker (16 images / 2 workers / batch 2),
# a checkpoint every 2 steps; 6 evaluation images shared by the 2 workers.
SMALL = ["stages.pretrain.schedule.max_steps=4", "stages.finetune.data.synthetic_images=16",
         "stages.finetune.schedule.epochs=2", "stages.finetune.schedule.checkpoint_every=2",
         "data.synthetic_val_images=6", "schedule.log_every=2"]


def finetune_checkpoints(tmp: Path) -> list[str]:
    dirs = [d for d in (tmp / "ckpt").glob("smoke_chain-finetune-*") if d.is_dir()] if (tmp / "ckpt").exists() else []
    if not dirs:
        return []
    try:
        data = json.loads((dirs[0] / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [c["checkpoint_dir_name"] for c in data.get("checkpoint_results", [])]


@pytest.mark.timeout(900)
def test_chain_on_ray_driver_killed_in_finetune_resumes_without_pretraining_again(mlflow_server, tmp_path):
    args = ["run", CHAIN, *SMALL, f"tracking.uri={mlflow_server.uri}", f"ray.storage_path={tmp_path}/ckpt",
            f"runtime.output_dir={tmp_path}/runs"]
    first_tmp = short_tmpdir("urc")
    proc = updetr_bg(*args, cwd=tmp_path, env=cli_env(first_tmp), log=tmp_path / "first.log")
    try:
        def finetune_checkpointed():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            return finetune_checkpoints(tmp_path)
        wait_for(finetune_checkpointed, 600, what="a fine-tuning checkpoint")
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid fine-tuning
        proc.wait(timeout=30)
    finally:
        stop_session(proc)
        time.sleep(2)
        reap(first_tmp)
    first = (tmp_path / "first.log").read_text()
    assert "stage 1/3 pretrain" in first and "stage 2/3 finetune" in first and "stage 3/3" not in first
    second_tmp = short_tmpdir("urc")
    try:
        r = updetr(*args, cwd=tmp_path, env=cli_env(second_tmp), timeout=600)
    finally:
        reap(second_tmp)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-3000:]
    assert "stage 1/3 pretrain: finished earlier, skipped" in out
    assert "resuming from checkpoint step" in out and "stage 3/3 eval" in out
    assert "final evaluation" in out and "AR100" in out and "parent run" in out
    final = load_checkpoint(next((tmp_path / "ckpt").glob("smoke_chain-finetune-*/checkpoint_00000008"))
                            / "checkpoint.pt")
    assert final["step"] == 8  # 2 epochs x 4 steps per worker; the fine-tuning resumed, not restarted

    client = mlflow_server.client()
    exp = client.get_experiment_by_name("smoke_chain")
    runs = [x for x in client.search_runs([exp.experiment_id])
            if str(tmp_path) in x.data.tags.get("updetr.chain_state", "") + x.data.tags.get("updetr.storage", "")]
    parents = [x for x in runs if "updetr.chain_state" in x.data.tags]
    assert len(parents) == 1, [x.info.run_name for x in runs]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = sorted(c.info.run_name for c in children)
    assert len(children) == 3 and len(runs) == 4, names
    for stage, name in zip(("eval", "finetune", "pretrain"), names):
        assert name.startswith(f"smoke_chain-{stage}-"), names
    assert all(c.info.status == "FINISHED" for c in children) and parents[0].info.status == "FINISHED"
    assert "eval/AP" in parents[0].data.metrics and "eval/AR100" in parents[0].data.metrics
