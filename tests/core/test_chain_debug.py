"""The chained smoke experiment in `updetr debug`: pre-train -> fine-tune -> eval in one process, one MLflow
parent run with a child per stage, the final COCO table; a re-run skips every finished stage."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHAIN = str(REPO / "experiments" / "smoke_chain.yaml")
# Small: 6 pre-training steps, 2 fine-tuning epochs of 8 images, 6 evaluation images.
SMALL = ["stages.pretrain.schedule.max_steps=6", "stages.finetune.data.synthetic_images=8",
         "stages.finetune.schedule.epochs=2", "stages.finetune.schedule.eval_every=2", "data.synthetic_val_images=6", "runtime.threads=2"]


def updetr(*args, cwd):
    return subprocess.run([sys.executable, "-m", "updetr", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chain_debug_runs_every_stage_tracks_parent_and_children_and_skips_on_rerun(tmp_path):
    r = updetr("debug", CHAIN, *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "stage 1/3 pretrain" in out and "stage 2/3 finetune" in out and "stage 3/3 eval" in out
    assert "init from" in out and "re-initialised 2 (class_embed)" in out
    assert "final evaluation" in out and "AP50" in out and "parent run" in out
    assert (tmp_path / "runs" / "smoke_chain-finetune" / "eval" / "detections_epoch0002.json").is_file()
    assert (tmp_path / "runs" / "smoke_chain-eval" / "detections.json").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("smoke_chain")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(runs) == 4
    assert sorted(c.info.run_name for c in children) == ["smoke_chain-eval", "smoke_chain-finetune",
                                                        "smoke_chain-pretrain"]
    parent = parents[0].data
    assert "eval/AP" in parent.metrics and "eval/AR100" in parent.metrics
    ft = next(c for c in children if c.info.run_name == "smoke_chain-finetune").data
    assert "eval/AP" in ft.metrics and "updetr.best_AP" in ft.tags and "loss" in ft.metrics
    ft_id = next(c for c in children if c.info.run_name == "smoke_chain-finetune").info.run_id
    history = client.get_metric_history(ft_id, "eval/AP")
    assert [h.step for h in history] == [2]  # eval_every 2 over 2 epochs: once, at epoch 2
    assert parent.metrics["eval/AP"] == pytest.approx(ft.metrics["eval/AP"])  # same weights, same split

    r = updetr("debug", CHAIN, *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished earlier, skipped") == 3 and "step 1/" not in r.stdout
    assert len(client.search_runs([exp.experiment_id])) == 4  # the same parent and children, no new runs
