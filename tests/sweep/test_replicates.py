"""Replicates: every cell of a sweep over seeds, the seed reaching every stage, names that carry it, and a
re-run that adds seeds running only the new trials (settings of the old ones unchanged)."""
import json

import pytest

from tests.sweep.test_spec import write_sweep
from updetr.sweep.spec import SweepError, load_sweep
from updetr.sweep.tune import SETTINGS_FILE, cell_settings, check_same_settings

VARIANTS = [{"name": "updetr-init"}, {"name": "random-init", "stages": ["finetune", "eval"]}]


def test_every_cell_runs_once_per_seed_and_every_stage_gets_the_seed(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "replicates": 3}))
    names = [c.name for c in sweep.cells]
    # seed-major: two trials at a time finish a seed of every cell before the next seed
    assert names == ["updetr-init_seed-0", "random-init_seed-0", "updetr-init_seed-1", "random-init_seed-1",
                     "updetr-init_seed-2", "random-init_seed-2"]
    for cell in sweep.cells:
        assert cell.cell == cell.name.rsplit("_seed-", 1)[0] and cell.params["seed"] == cell.seed
        assert {s.cfg.seed for s in cell.experiment.stages} == {cell.seed}          # data, init, augmentation
        trial = sweep.trial(cell)
        assert trial.name == f"sw-{cell.name}" and all(str(cell.seed) in s.cfg.name for s in trial.stages)
    same = load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "options": {"seeds": [0, 1, 2]}}, "b.yaml"))
    assert [c.name for c in same.cells] == names
    plain = load_sweep(write_sweep(tmp_path, {"variants": VARIANTS}, "c.yaml"))
    assert [c.name for c in plain.cells] == ["updetr-init", "random-init"] and plain.cells[0].seed is None


def test_seed_settings_that_contradict_the_replicates_are_refused(tmp_path):
    with pytest.raises(SweepError, match="disagree"):
        load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "replicates": 2, "options": {"seeds": [0, 1, 2]}}))
    with pytest.raises(SweepError, match="seed: the seed comes from replicates"):
        load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "replicates": 2, "overrides": {"seed": 5}}))
    with pytest.raises(SweepError, match="listed twice"):
        load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "options": {"seeds": [1, 1]}}))
    with pytest.raises(SweepError, match="seeds come from replicates"):
        load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "replicates": 2}), ["seed=3"])


def test_adding_a_seed_keeps_the_finished_trials_and_changing_one_is_refused(tmp_path):
    folder = tmp_path / "sweeps" / "sw"
    folder.mkdir(parents=True)
    two = load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "options": {"seeds": [0, 1]}}))
    (folder / SETTINGS_FILE).write_text(json.dumps(cell_settings(two)))
    assert check_same_settings(two, folder) == []
    three = load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "options": {"seeds": [0, 1, 2]}}))
    assert check_same_settings(three, folder) == ["updetr-init_seed-2", "random-init_seed-2"]
    fewer_epochs = load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "options": {"seeds": [0, 1, 2]}}),
                              ["stages.finetune.schedule.epochs=3"])
    with pytest.raises(SweepError, match="started with other settings"):
        check_same_settings(fewer_epochs, folder)
    with pytest.raises(SweepError, match=r"cells changed: random-init_seed-1, updetr-init_seed-1"):
        check_same_settings(load_sweep(write_sweep(tmp_path, {"variants": VARIANTS, "options": {"seeds": [0]}})),
                            folder)                                            # a seed dropped: not this study
