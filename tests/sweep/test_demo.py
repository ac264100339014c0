"""`updetr demo`: its sweep file (two trials that differ only in their starting weights) and the whole study
end to end on real local Ray with a real local MLflow store (sqlite in the working dir), at smoke sizes."""
from __future__ import annotations

import re

import pytest

from updetr.demo import DEMO_SWEEP
from updetr.sweep.spec import load_sweep
from updetr.tracking_query import TAG_PARENT, TAG_SWEEP

# Smallest chain that still draws both curves: 4 pre-training steps, 2 fine-tuning epochs of 4 steps with an
# evaluation after each, 4 evaluation images.
TINY = ["stages.pretrain.data.synthetic_images=8", "stages.pretrain.schedule.epochs=1",
        "stages.finetune.data.synthetic_images=8", "stages.finetune.schedule.epochs=2",
        "stages.finetune.schedule.eval_every=1", "data.synthetic_val_images=4", "schedule.log_every=1"]


def test_demo_sweep_compares_pretrained_and_random_init_with_the_same_fine_tuning():
    from updetr.sweep.tune import plan_concurrency

    sweep = load_sweep(DEMO_SWEEP)
    assert sweep.name == "demo"
    cells = {c.name: [s for s in c.experiment.stages] for c in sweep.cells}
    assert {n: [s.name for s in st] for n, st in cells.items()} == {
        "updetr-init": ["pretrain", "finetune", "eval"], "random-init": ["finetune", "eval"]}
    pre_ft, scratch_ft = cells["updetr-init"][1].cfg, cells["random-init"][0].cfg
    assert pre_ft.init.checkpoint == "previous" and scratch_ft.init.checkpoint is None
    assert scratch_ft == pre_ft.model_copy(update={"init": scratch_ft.init})     # only the start differs
    assert pre_ft.data.source == "synthetic_coco" and cells["updetr-init"][0].cfg.data.source == "synthetic"
    assert plan_concurrency(sweep, 2.0) == 2                  # both trials at once on 2 cores
    assert "updetr demo" in DEMO_SWEEP.read_text()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_demo_end_to_end_prints_the_table_and_writes_plots_and_runs(tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from tests.orchestration.conftest import cli_env, reap, short_tmpdir, updetr

    ray_tmp = short_tmpdir("udm")
    try:
        res = updetr("demo", *TINY, cwd=tmp_path, env=cli_env(ray_tmp), timeout=540)
    finally:
        reap(ray_tmp)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    # progress while it ran: trial, stage, steps/s and ETA on one line
    assert re.search(r"^\[demo-updetr-init-finetune\] step \d+/8 .* step/s .* ETA", out, re.M)
    assert "[demo-random-init] stage 1/2 finetune" in out and "[demo-updetr-init] stage 3/3 eval" in out
    assert "sweep demo: 2 trials" in out and "FAILED" not in out
    # the compare table: both rows, AP columns, random init as the baseline (deltas on the other row)
    table = out.split("UP-DETR init vs random init")[1]
    header = table.splitlines()[1].split()
    assert header == ["run", "eval/AP", "eval/AP50", "eval/AP75"]
    rows = {ln.split()[0]: ln for ln in table.splitlines()[3:5]}
    assert set(rows) == {"demo-updetr-init", "demo-random-init"}
    assert "demo-random-init *" in rows["demo-random-init"]
    assert re.search(r"\d+\.\d \([+-]\d+\.\d\)", rows["demo-updetr-init"])
    # the plots, as PNG images of real size, and where they are
    for name in ("pretrain_loss.png", "eval_ap_vs_epoch.png"):
        png = tmp_path / "runs" / "compare" / "demo" / name
        assert f"plot:  {png}" in out
        assert png.stat().st_size > 10_000
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300
    # the MLflow store in the working dir: the sweep's parent run and one child per trial with eval/AP
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in out
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    parents = [r for r in runs if r.data.tags.get(TAG_SWEEP) == "demo"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get(TAG_PARENT) == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["demo-random-init", "demo-updetr-init"]
    assert all("eval/AP" in r.data.metrics for r in children)
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "compare")}
    assert {"compare/pretrain_loss.png", "compare/eval_ap_vs_epoch.png"} <= logged
