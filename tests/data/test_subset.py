"""Low-data fine-tuning: `data.fraction` / `data.subset_size` cut the TRAIN split to a seeded subset (written
down as JSON), the evaluation split stays whole, and the same config always draws the same images."""
import json

import pytest

from updetr.config import ConfigError, load_experiment
from updetr.data.subset import SUBSET_FILE, choose_subset
from updetr.tasks import get_task

CHAIN = "experiments/smoke_chain.yaml"


def finetune_cfg(tmp_path, *overrides):
    exp = load_experiment(CHAIN, [f"runtime.output_dir={tmp_path}", "tracking.enabled=false",
                                  "stages.finetune.data.synthetic_images=20", "data.synthetic_val_images=6",
                                  *overrides])
    return next(s.cfg for s in exp.stages if s.name == "finetune")


def test_the_draw_is_seeded_sorted_and_sized():
    ids = list(range(100, 140))
    a = choose_subset(ids, fraction=0.25, seed=3)
    assert a == choose_subset(list(reversed(ids)), fraction=0.25, seed=3)       # input order does not matter
    assert len(a) == 10 and a == sorted(a) and set(a) <= set(ids)
    assert choose_subset(ids, fraction=0.25, seed=4) != a                         # another seed, other images
    assert len(choose_subset(ids, size=7, seed=3)) == 7
    assert choose_subset(ids, size=500, seed=3) == ids                            # at most all
    assert len(choose_subset(ids, fraction=0.001, seed=3)) == 1                   # at least one
    assert choose_subset(ids, fraction=1.0, seed=3) == ids


def test_detect_trains_on_the_subset_and_evaluates_on_the_whole_split(tmp_path):
    cfg = finetune_cfg(tmp_path, "stages.finetune.data.fraction=0.25")
    task = get_task(cfg)
    cfg = task.prepare()
    train, val = task.dataset("train"), task.dataset("val")
    assert len(train) == 5 and len(val) == 6 == len(val.coco.imgs)               # eval split whole
    n_batches = sum(1 for _ in task.eval_batches())
    assert n_batches == 6                                                         # one image per eval batch
    seen = {int(t["image_id"]) for b in task.train_batches(0) for t in b["targets"]}
    assert seen <= set(train.ids) and len(seen) == 4                              # batch 2, last short one dropped
    record = json.loads((tmp_path / cfg.name / SUBSET_FILE).read_text())
    assert record["image_ids"] == train.ids and record["total_images"] == 20 and record["subset_seed"] == cfg.seed
    # the same config draws the same images; the run seed (the default subset seed) or subset_seed moves them
    again = get_task(finetune_cfg(tmp_path, "stages.finetune.data.fraction=0.25"))
    again.prepare()
    assert again.dataset("train").ids == train.ids
    other = get_task(finetune_cfg(tmp_path, "stages.finetune.data.fraction=0.25", "stages.finetune.data.subset_seed=7",
                                  "stages.finetune.data.path=" + str(cfg.data.path)))
    other.prepare()
    assert other.dataset("train").ids != train.ids and len(other.dataset("train")) == 5
    assert other.dataset("val").ids == val.ids


def test_no_subset_file_without_a_subset_and_bad_settings_are_refused(tmp_path):
    cfg = finetune_cfg(tmp_path)
    task = get_task(cfg)
    task.prepare()
    assert len(task.dataset("train")) == 20 and not (tmp_path / cfg.name / SUBSET_FILE).exists()
    with pytest.raises(ConfigError, match="data.fraction"):
        finetune_cfg(tmp_path, "stages.finetune.data.fraction=0")
    with pytest.raises(ConfigError, match="give one"):
        finetune_cfg(tmp_path, "stages.finetune.data.fraction=0.5", "stages.finetune.data.subset_size=3")
    with pytest.raises(ConfigError, match="stages.finetune.data.fraction"):
        load_experiment(CHAIN, ["data.fraction=0.5"])                            # pre-training has no subset


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_debug_run_logs_its_subset_to_mlflow_and_evaluates_the_whole_split(tmp_path):
    from mlflow.tracking import MlflowClient

    from updetr.local import run_debug

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = finetune_cfg(tmp_path, "stages.finetune.data.subset_size=3", "stages.finetune.init.checkpoint=null",
                       "stages.finetune.schedule.max_steps=1", "tracking.enabled=true", f"tracking.uri={uri}",
                       "stages.finetune.data.batch_size=1")
    out = run_debug(cfg)
    assert out.eval_metrics["images"] == 6                                        # every evaluation image
    client = MlflowClient(tracking_uri=uri)
    local = tmp_path / cfg.name / SUBSET_FILE
    logged = client.download_artifacts(out.tracker.run_id, f"data/{SUBSET_FILE}", str(tmp_path / "dl"))
    record = json.loads(open(logged).read())
    assert record == json.loads(local.read_text()) and len(record["image_ids"]) == 3
