"""`updetr sweep` on real local Ray and a real MLflow server: a 2x2 grid over the smoke chain plus a cell
with a bad data path runs through Ray Tune; the bad trial is reported with its error while the four others
finish, MLflow holds one sweep parent with a child per trial (its params and eval/AP), Ray's CPUs are free
again afterwards, and `compare` reads the table back. (A re-run after a crash: test_sweep_faults.py.)
~5 min on 2 cores."""
from __future__ import annotations

import pytest
import yaml

from updetr.tracking_query import TAG_PARENT, TAG_SWEEP

from .conftest import REPO, cli_env, reap, short_tmpdir, updetr

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SMALL = ["ray.num_workers=1", "data.preprocess_cpus=0.5", "schedule.max_steps=4", "data.synthetic_val_images=6",
         "stages.finetune.data.synthetic_images=8", "schedule.log_every=2"]


@pytest.mark.timeout(900)
def test_sweep_runs_every_trial_with_one_parent_and_a_child_each(mlflow_server, tmp_path):
    sweep_file = tmp_path / "sw.yaml"
    name = f"sw{tmp_path.name[-6:]}".replace("_", "")
    sweep_file.write_text(yaml.safe_dump({"name": name, "experiment": str(REPO / "experiments" / "smoke_chain.yaml"),
                                          "grid": {"stages.pretrain.pretext.feature_recon": [True, False],
                                                   "stages.finetune.optim.lr_backbone": [1.0e-4, 1.0e-5]},
                                          "variants": [{"name": "bad-data", "overrides": {
                                              "stages.pretrain.data.source": "folder",
                                              "stages.pretrain.data.path": str(tmp_path / "missing")}}]},
                                         sort_keys=False))
    args = ["sweep", str(sweep_file), *SMALL, f"tracking.uri={mlflow_server.uri}",
            f"runtime.output_dir={tmp_path}/runs"]
    ray_tmp = short_tmpdir("usw")
    try:
        first = updetr(*args, cwd=tmp_path, env=cli_env(ray_tmp), timeout=800)
    finally:
        reap(ray_tmp)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]     # one trial failed
    out = first.stdout
    assert f"sweep {name}: 5 trials" in out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].split()[0] == "bad-data" and str(tmp_path / "missing") in failed[0]
    free = out.split("Ray CPUs free: ")[1].split()
    assert float(free[0]) == float(free[2].rstrip(",")) > 0      # "<before> before, <after> after"

    client = mlflow_server.client()
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(TAG_SWEEP) == name]
    assert len(parents) == 1
    trials = [r for r in runs if r.data.tags.get(TAG_PARENT) == parents[0].info.run_id
              and not r.info.run_name.endswith("bad-data")]
    assert sorted(r.info.run_name for r in trials) == sorted(f"{name}-feature_recon-{fr}_lr_backbone-{lr}"
                                                             for fr in ("true", "false") for lr in ("0.0001", "1e-05"))
    assert {(t.data.params["stages.pretrain.pretext.feature_recon"], t.data.params["stages.finetune.optim.lr_backbone"])
            for t in trials} == {(fr, lr) for fr in ("True", "False") for lr in ("0.0001", "1e-05")}
    for t in trials:
        assert "eval/AP" in t.data.metrics
        stages = [r for r in runs if r.data.tags.get(TAG_PARENT) == t.info.run_id]
        assert len(stages) == 3                                       # pretrain, finetune, eval
    cmp = updetr("compare", name, "--baseline", "run=feature_recon-false_lr_backbone-0.0001", "--tracking-uri",
                 mlflow_server.uri, "--out", str(tmp_path / "cmp"), cwd=tmp_path, timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    header = cmp.stdout.splitlines()[0]
    assert "feature_recon" in header and "lr_backbone" in header
    assert (tmp_path / "cmp" / "pretrain_loss.png").stat().st_size > 10_000
