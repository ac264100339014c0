"""Replicates end to end on real local Ray and a real local MLflow store (sqlite): a sweep of two cells over
seed 0, then the same sweep with seed 1 added (only the two new trials train), then `updetr compare`
aggregating the four trials the product itself logged into one row per cell with its statistics."""
from __future__ import annotations

import csv
import io
import re

import pytest
import yaml
from scipy import stats as sps

from tests.orchestration.conftest import cli_env, reap, short_tmpdir, updetr
from updetr.tracking_query import TAG_CELL, TAG_PARENT, TAG_SEED, TAG_SWEEP

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# One detection stage (fine-tuning with its evaluation at the end) on the built-in shapes: 4 steps, 4 eval images.
TINY_DETECT = {
    "name": "tiny", "task": "detect",
    "model": {"backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
              "dim_feedforward": 64, "dropout": 0.0, "num_queries": 5},
    "data": {"source": "synthetic_coco", "synthetic_images": 8, "synthetic_size": [64, 80],
             "synthetic_val_images": 4, "batch_size": 2, "num_workers": 0},
    "detection": {"scales": [64, 80], "max_size": 96, "crop_resize": [64, 80], "crop_min": 48, "crop_max": 64,
                  "eval_size": 64},
    "optim": {"lr": 1.0e-3, "lr_backbone": 1.0e-4},
    "schedule": {"epochs": 1, "lr_drop": 100, "checkpoint_every": 10, "log_every": 1},
    "ray": {"num_workers": 1, "cpus_per_worker": 0.5},
}


def write(tmp_path, seeds):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY_DETECT, sort_keys=False))
    path = tmp_path / "rep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "rep", "experiment": "tiny.yaml",
        "variants": [{"name": "base"}, {"name": "hot", "overrides": {"optim.lr": 3.0e-3}}],
        "options": {"seeds": seeds, "max_concurrent": 2, "metric": "eval/AP50"}}, sort_keys=False))
    return path


@pytest.mark.timeout(2700)
def test_adding_a_seed_runs_only_the_new_trials_and_compare_aggregates_the_cells(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"tracking.uri={uri}", f"runtime.output_dir={tmp_path}/runs"]
    ray_tmp = short_tmpdir("urp")
    try:
        first = updetr("sweep", str(write(tmp_path, [0])), *common, cwd=tmp_path, env=cli_env(ray_tmp),
                       timeout=1200)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "sweep rep: 2 trials" in first.stdout
        second = updetr("sweep", str(write(tmp_path, [0, 1])), *common, cwd=tmp_path, env=cli_env(ray_tmp),
                        timeout=1200)
    finally:
        reap(ray_tmp)
    out = second.stdout
    assert second.returncode == 0, out[-3000:] + second.stderr[-3000:]
    assert "2 new trial(s) (base_seed-1, hot_seed-1)" in out
    for trial in ("base_seed-0", "hot_seed-0"):       # reported, not trained again
        assert f"[rep-{trial}] stage 1/1 detect: finished earlier, skipped" in out
    for trial in ("base_seed-1", "hot_seed-1"):
        assert f"[rep-{trial}] stage 1/1 detect: train detect" in out
    assert not re.search(r"\[rep-(base|hot)_seed-0\] stage 1/1 detect: train", out)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("rep").experiment_id])
    parent = next(r for r in runs if r.data.tags.get(TAG_SWEEP) == "rep")
    trials = [r for r in runs if r.data.tags.get(TAG_PARENT) == parent.info.run_id]
    assert sorted(r.info.run_name for r in trials) == sorted(f"rep-{c}_seed-{s}" for c in ("base", "hot")
                                                             for s in range(2))          # one run per trial
    ap50 = {c: [] for c in ("base", "hot")}
    for r in sorted(trials, key=lambda r: int(r.data.tags[TAG_SEED])):
        assert r.data.tags[TAG_CELL] in ap50 and r.data.params["seed"] == r.data.tags[TAG_SEED]
        ap50[r.data.tags[TAG_CELL]].append(r.data.metrics["eval/AP50"])

    res = updetr("compare", "rep", "--baseline", "run=base", "--metric", "eval/AP50", "--tracking-uri", uri,
                 "--out", str(tmp_path / "cmp"), cwd=tmp_path, env=cli_env(), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:2] == ["run", "n"] and "eval/AP50 mean ± sd [95% CI]" in lines[0]
    rows = {ln.split()[0]: ln for ln in lines[2:4]}
    assert set(rows) == {"rep-base", "rep-hot"} and "rep-base *" in rows["rep-base"]
    assert rows["rep-hot"].split()[1] == "2" == rows["rep-base"].split()[2]
    mean_hot = 100 * sum(ap50["hot"]) / 2
    assert rows["rep-hot"].split()[2] == f"{mean_hot:.1f}"
    assert any(ln.startswith("method: mean ± sd over n seeds") and "Welch" in ln for ln in lines)

    # the CSV carries the numbers: checked against scipy on the values MLflow holds
    res = updetr("compare", "rep", "--baseline", "run=base", "--metric", "eval/AP50", "--format", "csv",
                 "--no-plots", "--tracking-uri", uri, cwd=tmp_path, env=cli_env(), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rec = {r["run"]: r for r in csv.DictReader(io.StringIO(res.stdout))}
    hot = rec["rep-hot"]
    assert float(hot["eval/AP50 mean"]) == pytest.approx(sum(ap50["hot"]) / 2)
    assert float(hot["eval/AP50 sd"]) == pytest.approx(sps.tstd(ap50["hot"]), abs=1e-12)
    if len(set(ap50["hot"] + ap50["base"])) > 2:      # with some spread the Welch interval is defined
        ci = sps.ttest_ind(ap50["hot"], ap50["base"], equal_var=False).confidence_interval(0.95)
        assert float(hot["eval/AP50 delta_ci_low"]) == pytest.approx(ci.low)
        assert float(hot["eval/AP50 delta_ci_high"]) == pytest.approx(ci.high)
