"""`updetr demo`: its sweep file (two cells over three seeds that differ only in their starting weights), the
answer it prints, and the whole study end to end on real local Ray with a real local MLflow store (sqlite in
the working dir), at smoke sizes."""
from __future__ import annotations

import re

import pytest

from updetr.demo import DEMO_SWEEP, conclusion
from updetr.sweep.spec import load_sweep
from updetr.sweep.tune import SweepOutcome, TrialResult
from updetr.tracking_query import TAG_CELL, TAG_PARENT, TAG_SEED, TAG_SWEEP

# Smallest chain that still draws both curves: 4 pre-training steps, 2 fine-tuning epochs of 2 steps (a quarter
# of 16 labelled images) with an evaluation after each, 4 evaluation images.
TINY = ["stages.pretrain.data.synthetic_images=8", "stages.pretrain.schedule.epochs=1",
        "stages.finetune.data.synthetic_images=16", "stages.finetune.schedule.epochs=2",
        "stages.finetune.schedule.eval_every=1", "data.synthetic_val_images=4", "schedule.log_every=1"]


def test_demo_sweep_compares_pretrained_and_random_init_with_the_same_fine_tuning_over_seeds():
    from updetr.sweep.tune import plan_concurrency

    sweep = load_sweep(DEMO_SWEEP)
    assert sweep.name == "demo" and sweep.spec.seeds == [0, 1, 2] and sweep.spec.options.metric == "eval/AP50"
    by_cell = {}
    for c in sweep.cells:
        by_cell.setdefault(c.cell, {})[c.seed] = c.experiment.stages
    assert set(by_cell) == {"updetr-init", "random-init"}
    for seed in (0, 1, 2):
        pre, scratch = by_cell["updetr-init"][seed], by_cell["random-init"][seed]
        assert [s.name for s in pre] == ["pretrain", "finetune"]
        assert [s.name for s in scratch] == ["finetune"]
        pre_ft, scratch_ft = pre[1].cfg, scratch[0].cfg
        assert pre_ft.init.checkpoint == "previous" and scratch_ft.init.checkpoint is None
        assert scratch_ft == pre_ft.model_copy(update={"init": scratch_ft.init})     # only the start differs
        assert pre_ft.seed == seed and pre[0].cfg.seed == seed
        assert pre_ft.data.source == "synthetic_coco" and pre[0].cfg.data.source == "synthetic"  # not eval images
        assert pre_ft.data.fraction < 1 and pre[0].cfg.model.freeze_backbone is False
    assert plan_concurrency(sweep, 2.0) == 2                  # two trials at once on 2 cores
    assert "updetr demo" in DEMO_SWEEP.read_text()


def test_the_demo_states_the_answer_its_interval_supports():
    sweep = load_sweep(DEMO_SWEEP)

    def answer(values):
        trials = [TrialResult(c.name, {"eval/AP50": values[c.cell][c.seed]}, None) for c in sweep.cells]
        return conclusion(SweepOutcome(sweep, trials, None, None, 2, 1.0))

    clear = answer({"updetr-init": [0.10, 0.12, 0.11], "random-init": [0.05, 0.06, 0.04]})
    assert clear == "UP-DETR init +6.0 AP50 [CI +3.7, +8.3] over 3 seeds: pre-training helps at this scale"
    noisy = answer({"updetr-init": [0.10, 0.02, 0.11], "random-init": [0.05, 0.06, 0.04]})
    assert noisy.endswith("over 3 seeds: no difference detectable at this scale") and "[CI -" in noisy
    worse = answer({"updetr-init": [0.05, 0.06, 0.04], "random-init": [0.10, 0.12, 0.11]})
    assert worse.startswith("UP-DETR init -6.0 AP50") and worse.endswith("pre-training hurts at this scale")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_demo_end_to_end_prints_the_table_and_writes_plots_and_runs(tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from tests.orchestration.conftest import cli_env, reap, short_tmpdir, updetr

    ray_tmp = short_tmpdir("udm")
    try:
        res = updetr("demo", *TINY, cwd=tmp_path, env=cli_env(ray_tmp), timeout=1440)
    finally:
        reap(ray_tmp)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    # progress while it ran: trial, stage, steps/s and ETA on one line
    assert re.search(r"^\[demo-updetr-init_seed-0-finetune\] step \d+/4 .* step/s .* ETA", out, re.M)
    assert "[demo-random-init_seed-0] stage 1/1 finetune" in out and "[demo-updetr-init_seed-2] stage 2/2 finetune" in out
    assert "sweep demo: 6 trials" in out and "FAILED" not in out
    # the compare table: one row per cell over its 3 seeds, random init as the baseline (differences with
    # their Welch intervals on the other row), the method in the footer
    table = out.split("UP-DETR init vs random init")[1]
    header = table.splitlines()[1]
    assert header.split()[:2] == ["run", "n"] and "eval/AP50 mean ± sd [95% CI]" in header
    assert "Δ eval/AP50 [95% CI]" in header
    rows = {ln.split()[0]: ln for ln in table.splitlines()[3:5]}
    assert set(rows) == {"demo-updetr-init", "demo-random-init"}
    assert "demo-random-init *" in rows["demo-random-init"]
    assert rows["demo-updetr-init"].split()[1] == "3" and rows["demo-random-init"].split()[2] == "3"
    assert "Welch" in table
    # the answer, in words, last
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(r"UP-DETR init [+-]\d+\.\d AP50 (\[CI [+-]\d+\.\d, [+-]\d+\.\d\] )?over 3 seeds.*: "
                        r"(pre-training helps|pre-training hurts|no difference detectable) at this scale", last), last
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
    assert sorted(r.info.run_name for r in children) == sorted(
        f"demo-{c}_seed-{s}" for c in ("random-init", "updetr-init") for s in range(3))
    assert all("eval/AP50" in r.data.metrics for r in children)
    assert {(r.data.tags[TAG_CELL], r.data.tags[TAG_SEED]) for r in children} == {
        (c, str(s)) for c in ("random-init", "updetr-init") for s in range(3)}
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "compare")}
    assert {"compare/pretrain_loss.png", "compare/eval_ap_vs_epoch.png"} <= logged
