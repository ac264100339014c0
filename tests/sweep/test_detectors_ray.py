"""Deformable DETR on the Ray paths, on real local Ray and a real local MLflow store (sqlite):

* the shipped smoke grid detector x init (experiments/sweeps/detectors_updetr-vs-scratch_smoke.yaml, cut to a
  few steps) runs as one sweep: UP-DETR's pretext on each detector, then its fine-tuning, next to fine-tuning
  from random init; `updetr compare` shows the four cells;
* UP-DETR's pretext on Deformable DETR trains on 2 Ray Train workers (`updetr run`).
"""
from __future__ import annotations

import re

import pytest

from tests.orchestration.conftest import REPO, SMOKE, cli_env, reap, short_tmpdir, updetr

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SWEEP = str(REPO / "experiments" / "sweeps" / "detectors_updetr-vs-scratch_smoke.yaml")
# pre-training 4 steps; fine-tuning 1 epoch of 8 images (4 steps) evaluated on 4 images
SMALL = ["stages.pretrain.schedule.max_steps=4", "stages.finetune.schedule.epochs=1",
         "stages.finetune.schedule.eval_every=1", "stages.finetune.data.synthetic_images=8",
         "data.synthetic_val_images=4"]
CELLS = ("detr-updetr", "detr-scratch", "deformable-updetr", "deformable-scratch")


@pytest.mark.timeout(1500)
def test_detector_by_init_smoke_grid_runs_as_one_sweep_and_compare_shows_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray_tmp = short_tmpdir("udg")
    try:
        r = updetr("sweep", SWEEP, *SMALL, f"tracking.uri={uri}", f"runtime.output_dir={tmp_path}/runs",
                   cwd=tmp_path, env=cli_env(ray_tmp), timeout=1400)
    finally:
        reap(ray_tmp)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-3000:]
    assert "sweep detectors_smoke: 4 trials" in out and "FAILED" not in out
    for cell in ("detr-updetr", "deformable-updetr"):
        assert f"[detectors_smoke-{cell}] stage 1/3 pretrain: train pretrain" in out
        assert f"[detectors_smoke-{cell}-finetune] init from " in out          # fine-tuned from its pre-training
    for cell in ("detr-scratch", "deformable-scratch"):
        assert f"[detectors_smoke-{cell}] stage 1/2 finetune: train detect" in out
        assert f"[detectors_smoke-{cell}-finetune] init from " not in out       # random init
    # each pre-training trained its own detector's heads: focal (sigmoid) classes have no no-object column
    assert re.search(r"\[detectors_smoke-deformable-updetr-pretrain\] step 1/4 .*feature", out)

    res = updetr("compare", "detectors_smoke", "--baseline", "run=detr-scratch", "--metric", "eval/AP50",
                 "--tracking-uri", uri, "--no-plots", cwd=tmp_path, env=cli_env(), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for cell in CELLS:                                                  # one row per cell
        assert len(re.findall(rf"^detectors_smoke-{cell}\b(?!_)", res.stdout, re.M)) == 1, res.stdout


@pytest.mark.timeout(600)
def test_deformable_pretext_trains_on_two_ray_workers(tmp_path):
    ray_tmp = short_tmpdir("udp")
    try:
        r = updetr("run", SMOKE, "model.detector=deformable_detr", "model.enc_n_points=2", "model.dec_n_points=2",
                   "ray.num_workers=2", "schedule.max_steps=4", "schedule.log_every=1", "tracking.enabled=false",
                   f"ray.storage_path={tmp_path}/ckpt", f"runtime.output_dir={tmp_path}/runs",
                   cwd=tmp_path, env=cli_env(ray_tmp), timeout=540)
    finally:
        reap(ray_tmp)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "rank 0/2 on cpu: training from step 0" in r.stdout
    losses = [float(x) for x in re.findall(r"step \d/4 .*?\| loss (\d+\.\d+) \(.*feature", r.stdout)]
    assert len(losses) == 4 and all(x == x and x > 0 for x in losses), r.stdout[-3000:]
    assert "finished at step 4" in r.stdout
