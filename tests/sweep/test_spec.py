"""Sweep YAML: expansion into cells, deterministic trial names, every cell validated before any trial."""
import json
from pathlib import Path

import pytest
import yaml

from updetr.config import load_config
from updetr.sweep.spec import SweepError, load_sweep, short_keys, to_override_value

SMOKE_CHAIN = Path(__file__).resolve().parents[2] / "experiments" / "smoke_chain.yaml"


def write_sweep(tmp_path: Path, body: dict, name: str = "sw.yaml") -> Path:
    body = {"experiment": str(SMOKE_CHAIN), **body}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_grid_times_zip_gives_every_cell_with_its_settings(tmp_path):
    path = write_sweep(tmp_path, {
        "grid": {"stages.pretrain.model.freeze_backbone": [True, False]},
        "zip": {"stages.pretrain.model.num_queries": [10, 12], "stages.pretrain.pretext.num_patches": [2, 3]},
    })
    sweep = load_sweep(path)
    assert sweep.name == "sw"
    assert len(sweep.cells) == 4
    seen = set()
    for cell in sweep.cells:
        pre = {s.name: s.cfg for s in cell.experiment.stages}["pretrain"]
        assert pre.model.freeze_backbone == cell.params["stages.pretrain.model.freeze_backbone"]
        assert pre.model.num_queries == cell.params["stages.pretrain.model.num_queries"]
        assert pre.pretext.num_patches == cell.params["stages.pretrain.pretext.num_patches"]
        seen.add((pre.model.freeze_backbone, pre.model.num_queries, pre.pretext.num_patches))
        # a stage-scoped key stays in its stage: fine-tuning keeps training the backbone
        assert {s.name: s.cfg for s in cell.experiment.stages}["finetune"].model.freeze_backbone is False
    assert seen == {(True, 10, 2), (True, 12, 3), (False, 10, 2), (False, 12, 3)}
    assert sweep.varying_keys == ["stages.pretrain.model.freeze_backbone", "stages.pretrain.model.num_queries",
                                  "stages.pretrain.pretext.num_patches"]


def test_trial_names_come_from_parameters_and_are_stable(tmp_path):
    body = {"grid": {"stages.pretrain.pretext.attention_mask": [True, False],
                     "optim.lr": [1.0e-5, 2.0e-4]}}
    names = [c.name for c in load_sweep(write_sweep(tmp_path, body)).cells]
    assert names == ["attention_mask-true_lr-1e-05", "attention_mask-true_lr-0.0002",
                     "attention_mask-false_lr-1e-05", "attention_mask-false_lr-0.0002"]
    # a re-read (another process, another day) finds the same trials, whatever the sweep file is called
    assert [c.name for c in load_sweep(write_sweep(tmp_path, body, "other.yaml")).cells] == names
    # the float override parses back as a float (PyYAML reads a bare 1e-05 as a string)
    cell = load_sweep(write_sweep(tmp_path, body)).cells[0]
    assert all(s.cfg.optim.lr == 1.0e-5 for s in cell.experiment.stages)


def test_variants_and_fixed_and_cli_overrides(tmp_path):
    path = write_sweep(tmp_path, {
        "name": "study",
        "overrides": {"stages.pretrain.schedule.epochs": 1},
        "grid": {"stages.pretrain.pretext.feature_recon": [True, False]},
        "variants": [{"name": "scratch lr", "overrides": {"stages.finetune.optim.lr": 0.002}}],
        "options": {"workers_per_trial": 1, "max_concurrent": 2},
    })
    sweep = load_sweep(path, ["stages.finetune.schedule.epochs=2"], name="renamed")
    assert sweep.name == "renamed"
    assert [c.name for c in sweep.cells] == ["feature_recon-true", "feature_recon-false", "scratch_lr"]
    for cell in sweep.cells:
        st = {s.name: s.cfg for s in cell.experiment.stages}
        assert st["pretrain"].schedule.epochs == 1 and st["finetune"].schedule.epochs == 2
        assert all(s.cfg.ray.num_workers == 1 for s in cell.experiment.stages)
    assert {s.name: s.cfg for s in sweep.cells[2].experiment.stages}["finetune"].optim.lr == 0.002


def test_stage_keys_fit_a_single_stage_variant(tmp_path):
    single = tmp_path / "detect.yaml"
    single.write_text(yaml.safe_dump({"name": "d", "task": "detect", "data": {"source": "synthetic_coco"},
                                      "model": {"num_classes": 3}}))
    path = write_sweep(tmp_path, {
        "overrides": {"stages.pretrain.schedule.epochs": 1, "stages.detect.schedule.epochs": 7},
        "grid": {"seed": [1, 2]},
        "variants": [{"name": "single", "experiment": str(single)}]})
    cell = load_sweep(path).cells[-1]
    assert not cell.experiment.chained
    assert cell.experiment.stages[0].cfg.schedule.epochs == 7      # stages.detect.* -> its only stage


@pytest.mark.parametrize("body, needle", [
    ({"grid": {"stages.pretrain.model.freez_backbone": [True]}},
     "cell freez_backbone-true: "),
    ({"grid": {"stages.pretrain.model.num_queries": ["ten"]}}, "model.num_queries"),
    ({"grid": {"stages.pretrain.pretext.num_patches": [2, 3]}},
     "cell num_patches-3: "),
    ({"grid": {"stages.pretrian.seed": [1]}}, "no stage named 'pretrian'"),
    ({"zip": {"seed": [1, 2], "optim.lr": [0.1]}}, "same number of values"),
    ({"grid": {"seed": []}}, "at least one value"),
    ({"grid": {"name": ["a", "b"]}}, "names come from the sweep"),
    ({"grid": {"seed": [1]}, "bogus": 1}, "bogus"),
    ({}, "no cells"),
    ({"overrides": {"stages.pretrian.seed": 3}, "grid": {"seed": [1]}}, "no cell has a stage named 'pretrian'"),
    ({"grid": {"seed": [1]}, "variants": [{"name": "x", "experiment": "missing.yaml"}]}, "no such file"),
])
def test_bad_cells_are_rejected_naming_cell_and_field(tmp_path, body, needle):
    with pytest.raises(SweepError) as err:
        load_sweep(write_sweep(tmp_path, body))
    msg = str(err.value)
    assert needle in msg
    assert str(tmp_path / "sw.yaml") in msg


def test_invalid_combination_names_the_cell_and_both_fields(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"stages.pretrain.pretext.num_patches": [2, 3]}})
    with pytest.raises(SweepError, match=r"cell num_patches-3: .*stage pretrain.*model.num_queries \(10\) must be "
                                         r"divisible by pretext.num_patches \(3\)"):
        load_sweep(path)


def test_cli_shows_one_line_error(tmp_path, capsys):
    from updetr.cli import main

    path = write_sweep(tmp_path, {"grid": {"stages.pretrain.model.freez_backbone": [True]}})
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "freez_backbone" in err and "Traceback" not in err
    ok = write_sweep(tmp_path, {"grid": {"seed": [1, 2]}}, "ok.yaml")
    assert main(["sweep", str(ok), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cells" in out and "seed-1" in out and "seed-2" in out


def test_helpers():
    assert to_override_value(1e-5) == "1.0e-05"
    assert yaml.safe_load(to_override_value(1e-5)) == 1e-5
    assert yaml.safe_load(to_override_value(["a b", True, None, 3, {"k": 0.5}])) == ["a b", True, None, 3, {"k": 0.5}]
    assert short_keys(["a.model.x", "b.model.x", "c.y"]) == {"a.model.x": "a.model.x", "b.model.x": "b.model.x",
                                                             "c.y": "y"}


def test_eos_coef_m_over_n_follows_the_patches():
    assert load_config(None, ["loss.eos_coef=M/N", "pretext.num_patches=1"]).loss.eos_coef == pytest.approx(0.01)
    assert load_config(None, ["loss.eos_coef=M/N"]).loss.eos_coef == pytest.approx(0.1)
    assert load_config(None, ["loss.eos_coef=M/N", "model.num_queries=20",
                              "pretext.num_patches=5"]).loss.eos_coef == pytest.approx(0.25)
    assert load_config(None).loss.eos_coef == 0.1            # the official default is unchanged
    with pytest.raises(Exception, match="loss.eos_coef"):
        load_config(None, ["loss.eos_coef=N/M"])


def test_trials_share_no_run_names_and_no_epoch_clock(tmp_path):
    """Two trials that differ only in model.freeze_backbone: distinct run names, chain state and Ray Data
    epoch clock (the clock is named from the config's name, seed, data and pretext, not from the model)."""
    from updetr.data.ray_pipeline import clock_name
    from updetr.orchestration.run_plan import run_name_for
    from updetr.pipeline import state_path

    sweep = load_sweep(write_sweep(tmp_path, {"name": "fb", "grid": {"stages.pretrain.model.freeze_backbone":
                                                                      [True, False]}}))
    trials = [sweep.trial(c) for c in sweep.cells]
    assert [t.name for t in trials] == ["fb-freeze_backbone-true", "fb-freeze_backbone-false"]
    pre = [{s.name: s.cfg for s in t.stages}["pretrain"] for t in trials]
    assert pre[0].name == "fb-freeze_backbone-true-pretrain"
    assert clock_name(pre[0]) != clock_name(pre[1])
    assert run_name_for(pre[0]) != run_name_for(pre[1])
    assert state_path(trials[0], "ray") != state_path(trials[1], "ray")
    assert all(s.cfg.tracking.experiment == "fb" for t in trials for s in t.stages)
    # the untouched cells would collide: same names everywhere but the model
    raw = [{s.name: s.cfg for s in c.experiment.stages}["pretrain"] for c in sweep.cells]
    assert clock_name(raw[0]) == clock_name(raw[1])


def test_every_bad_cell_is_named_up_to_a_limit(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"stages.pretrain.pretext.num_patches": [1, 3, 4, 6, 7, 9]}})
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert "cell num_patches-3:" in msg and "cell num_patches-4:" in msg and "cell num_patches-6:" in msg
    assert "num_patches-1:" not in msg and "... and 2 more cells fail" in msg


def test_concurrency_fits_the_cluster_and_a_trial_too_big_is_refused(tmp_path):
    from updetr.sweep.tune import plan_concurrency, trial_cpus

    body = {"grid": {"seed": [1, 2, 3, 4]}, "overrides": {"ray.num_workers": 1, "ray.cpus_per_worker": 0.5,
                                                         "data.preprocess_cpus": 0.5}}
    sweep = load_sweep(write_sweep(tmp_path, body))
    assert trial_cpus(sweep) == pytest.approx(1.01)      # 0.5 Train worker + 0.5 Ray Data actor + driver
    assert plan_concurrency(sweep, 2.0) == 1 and plan_concurrency(sweep, 8.0) == 7
    capped = load_sweep(write_sweep(tmp_path, {**body, "options": {"max_concurrent": 2}}))
    assert plan_concurrency(capped, 8.0) == 2
    big = load_sweep(write_sweep(tmp_path, {"grid": {"seed": [1]}, "overrides": {"ray.num_workers": 4}}))
    with pytest.raises(SweepError, match="one trial needs 3.01 CPUs .* the cluster has 2"):
        plan_concurrency(big, 2.0)


def test_a_failed_trial_is_reported_by_its_exception_line():
    from updetr.sweep.tune import trial_error

    wrapped = RuntimeError("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, repr=_trial)\n  File \"x.py\", line 3\n"
                           "    raise DatasetError(...)\nupdetr.tasks.detect.DatasetError: data (train split): /no: "
                           "no annotations\n")
    assert trial_error(wrapped) == "updetr.tasks.detect.DatasetError: data (train split): /no: no annotations"


def test_a_variant_runs_the_chain_without_its_first_stages(tmp_path):
    """`variants: [{stages: [finetune, eval]}]`: the same fine-tuning from random init, no pre-training."""
    path = write_sweep(tmp_path, {"variants": [{"name": "pre"}, {"name": "scratch", "stages": ["finetune", "eval"]}],
                                  "overrides": {"stages.pretrain.schedule.epochs": 1}})
    pre, scratch = load_sweep(path).cells
    assert [s.name for s in pre.experiment.stages] == ["pretrain", "finetune", "eval"]
    assert [s.name for s in scratch.experiment.stages] == ["finetune", "eval"]
    ft_pre, ft_scratch = pre.experiment.stages[1].cfg, scratch.experiment.stages[0].cfg
    assert ft_pre.init.checkpoint == "previous" and ft_scratch.init.checkpoint is None
    assert ft_scratch == ft_pre.model_copy(update={"init": ft_pre.init.model_copy(update={"checkpoint": None})})
    assert scratch.experiment.stages[1].cfg.init.checkpoint == "previous"      # eval scores the fine-tuned model


@pytest.mark.parametrize("keep, needle", [
    (["pretrain", "finetune"], "must be the last stages of the chain"),
    (["eval", "finetune"], "must be the last stages of the chain"),
    (["eval"], "is an eval stage"),
])
def test_a_variant_stage_list_must_be_a_runnable_tail(tmp_path, keep, needle):
    path = write_sweep(tmp_path, {"variants": [{"name": "part", "stages": keep}]})
    with pytest.raises(SweepError, match=f"cell part: stages: .*{needle}"):
        load_sweep(path)


def test_a_sweep_is_shipped_with_the_files_it_reads(tmp_path):
    """`updetr submit SWEEP.yaml`: the job's working dir holds the sweep and its experiment and base files, laid
    out so that the sweep loads there to the same cells."""
    from updetr.orchestration.jobs import stage_sweep_dir
    from updetr.sweep.spec import is_sweep_file, source_files

    repo = SMOKE_CHAIN.parents[1]
    table5 = repo / "experiments" / "sweeps" / "table5_frozen-cnn_feature-recon_smoke.yaml"
    assert is_sweep_file(table5) and not is_sweep_file(SMOKE_CHAIN)
    sweep = load_sweep(table5)
    files = source_files(sweep)
    assert files[0] == table5 and len(files) == 3         # the sweep, the UP-DETR chain, the DETR chain
    workdir, inside = stage_sweep_dir(files, tmp_path / "job")
    assert inside[0] == "sweep/sweeps/table5_frozen-cnn_feature-recon_smoke.yaml"
    assert (workdir / "updetr" / "cli.py").is_file()
    staged = load_sweep(workdir / inside[0])
    assert [(c.name, c.experiment) for c in staged.cells] == [(c.name, c.experiment) for c in sweep.cells]


def test_submit_of_a_bad_sweep_fails_here_naming_the_cell(tmp_path, capsys):
    from updetr.cli import main

    path = write_sweep(tmp_path, {"grid": {"stages.pretrain.model.freez_backbone": [True]}})
    # the address is never contacted: the cells are validated before any job is submitted
    assert main(["submit", str(path), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cell freez_backbone-true" in err and "cannot reach" not in err


def test_early_stopping_watches_one_stage_per_cell_and_reads_stopped_trials(tmp_path):
    from updetr.sweep.early_stop import FINISHED_KEY, max_epochs, stopped_at, watched_stage

    detr = Path(__file__).resolve().parents[2] / "experiments" / "detect_detr-r50-scratch_voc_8xb2-150e.yaml"
    path = write_sweep(tmp_path, {"grid": {"stages.finetune.schedule.epochs": [4, 6]},
                                  "variants": [{"name": "detr", "experiment": str(detr)}],
                                  "options": {"early_stopping": {"metric": "eval/AP", "grace_period": 2}}})
    sweep = load_sweep(path)
    es = sweep.spec.options.early_stopping
    # eval/AP: the fine-tuning stage of the chain; the single-stage detection variant's own stage
    assert [watched_stage(c.experiment, es) for c in sweep.cells] == ["finetune", "finetune", "detect"]
    assert max_epochs(sweep, es) == 150                     # the longest watched stage (the VOC variant)
    loss = es.model_copy(update={"metric": "epoch/loss", "mode": "min", "max_t": 3})
    assert watched_stage(sweep.cells[0].experiment, loss) == "pretrain" and max_epochs(sweep, loss) == 3
    # a trial's last Tune result: finished, stopped by ASHA on a relayed epoch, or cut off before any
    assert stopped_at({FINISHED_KEY: 1, "eval/AP": 0.3, "epoch": 6}, es) is None
    assert stopped_at({"eval/AP": 0.125, "epoch": 2, "stage": "finetune"}, es) == \
        "ASHA at epoch 2 of stage finetune (eval/AP 0.125)"
    assert stopped_at({"time_total_s": 3.0}, es) is None and stopped_at({"eval/AP": 0.1, "epoch": 2}, None) is None

    bad = write_sweep(tmp_path, {"grid": {"optim.lr": [1e-4, 2e-4]},
                                 "options": {"early_stopping": {"stage": "eval"}}}, name="bad.yaml")
    with pytest.raises(SweepError, match="early_stopping.stage: no cell has a training stage named 'eval'"):
        load_sweep(bad)


def test_a_rerun_with_changed_settings_is_refused_instead_of_resuming_the_old_trials(tmp_path):
    """Tune restores a saved sweep with the settings it started with; a re-run whose cells now resolve to other
    settings must say so (and how to start a new study), not quietly print the old results."""
    from updetr.sweep.tune import SETTINGS_FILE, cell_settings, check_same_settings

    path = write_sweep(tmp_path, {"grid": {"stages.pretrain.model.freeze_backbone": [True, False]}})
    folder = tmp_path / "sweeps" / "sw"
    folder.mkdir(parents=True)
    (folder / SETTINGS_FILE).write_text(json.dumps(cell_settings(load_sweep(path))))
    check_same_settings(load_sweep(path), folder)                       # same settings: resumes
    check_same_settings(load_sweep(path, ["stages.pretrain.ray.num_workers=1"]), folder)  # not arithmetic
    with pytest.raises(SweepError, match=r"started with other settings \(cells changed: freeze_backbone-false, "
                                         r"freeze_backbone-true\).*--name NEW"):
        check_same_settings(load_sweep(path, ["stages.finetune.schedule.epochs=3"]), folder)
