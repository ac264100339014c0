"""Experiment configs: defaults, base files, overrides, and errors that name the file and field."""
from pathlib import Path

import pytest

from updetr.cli import main
from updetr.config import ConfigError, ExperimentConfig, config_to_dict, flatten, load_config, load_experiment

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_field_has_a_description():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, ExperimentConfig.__mro__[1]):
                walk(ann, f"{prefix}{name}.")
    walk(ExperimentConfig)


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_validate(path):
    exp = load_experiment(path)
    assert exp.stages and all(s.cfg.name.startswith(exp.name) for s in exp.stages)


def test_base_file_and_overrides_merge(tmp_path):
    write(tmp_path, "base.yaml", "name: b\nmodel:\n  backbone: resnet18\n  num_queries: 20\npretext:\n  num_patches: 4\n")
    exp = write(tmp_path, "exp.yaml", "base: base.yaml\nname: e\nmodel:\n  hidden_dim: 64\n")
    cfg = load_config(exp, ["pretext.num_patches=5", "optim.lr=3e-4", "pretext.scales=[100, 120]"])
    assert cfg.name == "e"
    assert cfg.model.backbone == "resnet18" and cfg.model.hidden_dim == 64 and cfg.model.num_queries == 20
    assert cfg.pretext.num_patches == 5 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.pretext.scales == [100, 120]
    assert cfg.model.nheads == 8  # untouched default


def test_unknown_field_names_file_and_path(tmp_path):
    exp = write(tmp_path, "bad.yaml", "model:\n  backbone: resnet18\n  num_querys: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(exp)
    msg = str(e.value)
    assert str(exp) in msg and "model.num_querys" in msg and "Extra inputs" in msg


def test_wrong_type_and_range_name_the_field(tmp_path):
    exp = write(tmp_path, "bad.yaml", "optim:\n  lr: fast\npretext:\n  patch_dropout: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(exp)
    msg = str(e.value)
    assert "optim.lr" in msg and "pretext.patch_dropout" in msg


def test_cross_field_n_divisible_by_m(tmp_path):
    exp = write(tmp_path, "bad.yaml", "model:\n  num_queries: 100\npretext:\n  num_patches: 30\n")
    with pytest.raises(ConfigError, match=r"num_queries \(100\) must be divisible by pretext.num_patches \(30\)"):
        load_config(exp)


def test_source_needs_path_and_matches_stage():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=folder"])
    with pytest.raises(ConfigError, match="detection reads coco"):
        load_config(None, ["stage=finetune"])  # the old field name still reads as task=detect
    with pytest.raises(ConfigError, match="detection reads coco"):
        load_config(None, ["task=detect"])


def test_malformed_override_and_nested_base(tmp_path):
    with pytest.raises(ConfigError, match="expected dotted key=value"):
        load_config(None, ["schedule.epochs"])
    write(tmp_path, "a.yaml", "name: a\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    exp = write(tmp_path, "c.yaml", "base: b.yaml\n")
    with pytest.raises(ConfigError, match="one level only"):
        load_config(exp)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    exp = write(tmp_path, "bad.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(exp)


def test_config_is_frozen_and_flattens():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.model.num_queries = 3
    flat = flatten(cfg.model_dump(mode="json"))
    assert flat["model.num_queries"] == 100 and flat["pretext.patch_dropout_mode"] == "slot"


def test_cli_validate_and_show(tmp_path, capsys):
    good = REPO / "experiments" / "smoke.yaml"
    assert main(["config", "validate", str(good)]) == 0
    assert main(["config", "show", str(good), "schedule.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "backbone: resnet18" in out
    bad = write(tmp_path, "bad.yaml", "schedule:\n  epochs: -1\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "schedule.epochs" in err and str(bad) in err


def test_chained_stages_merge_shared_settings_and_scope_overrides(tmp_path):
    exp = write(tmp_path, "chain.yaml", "name: c\nmodel:\n  hidden_dim: 64\n  nheads: 4\nschedule:\n  epochs: 3\n"
                "stages:\n  - {name: pre, task: pretrain}\n"
                "  - {name: ft, task: detect, data: {source: synthetic_coco}, schedule: {epochs: 5}}\n"
                "  - {name: ev, action: eval}\n")
    e = load_experiment(exp, ["stages.pre.schedule.max_steps=6", "model.hidden_dim=32"])
    pre, ft, ev = e.stages
    assert [s.cfg.name for s in e.stages] == ["c-pre", "c-ft", "c-ev"] and e.chained
    assert pre.cfg.schedule.max_steps == 6 and ft.cfg.schedule.max_steps is None  # scoped to one stage
    assert {s.cfg.model.hidden_dim for s in e.stages} == {32}                       # applied to every stage
    assert (pre.cfg.init.checkpoint, ft.cfg.init.checkpoint, ev.cfg.init.checkpoint) == (None, "previous", "previous")
    assert ev.action == "eval" and ev.cfg.task == "detect" and ev.cfg.schedule.epochs == 5  # over the previous stage
    assert {s.cfg.tracking.experiment for s in e.stages} == {"c"}
    with pytest.raises(ConfigError, match="no stage named 'x'"):
        load_experiment(exp, ["stages.x.seed=1"])
    with pytest.raises(ConfigError, match=r"stage ft.*data.source"):
        load_experiment(exp, ["stages.ft.data.source=folder"])
def test_name_override_renames_a_chain_not_each_stage(tmp_path):
    # `name=X` on a chain used to give every stage the name X, so stage 2 tried to resume stage 1's run
    exp = write(tmp_path, "chain.yaml", "name: c\nmodel:\n  hidden_dim: 64\n  nheads: 4\n"
                "stages:\n  - {name: pre, task: pretrain}\n"
                "  - {name: ft, task: detect, data: {source: synthetic_coco}}\n")
    e = load_experiment(exp, ["name=mine"])
    assert e.name == "mine" and [s.cfg.name for s in e.stages] == ["mine-pre", "mine-ft"]
    assert {s.cfg.tracking.experiment for s in e.stages} == {"mine"}


def test_defaults_and_paper_recipe_follow_the_reference():
    cfg = load_config(None)
    assert cfg.data.decode == "full" and cfg.data.drop_last and cfg.runtime.precision == "fp32"
    assert load_config(None, ["data.decode=reduced"]).data.decode == "reduced"  # kept as an option
    for path in sorted((REPO / "experiments").glob("pretrain_*.yaml")):
        paper = load_config(path)
        assert paper.runtime.precision == "fp32", path.name  # the official code trains in fp32
        assert paper.data.decode == "full" and paper.data.drop_last, path.name
    assert load_config(path, ["runtime.precision=bf16"]).runtime.precision == "bf16"  # documented override


def test_pretraining_needs_two_classes():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.num_classes=1"])
    assert "model.num_classes (1) must be >= 2 for pre-training" in str(e.value)
    assert load_config(None, ["model.num_classes=2"]).num_classes == 2


def test_run_identity_covers_the_arithmetic_not_worker_counts(tmp_path):
    """A change that alters the numbers is a new run (Ray: a new run name; debug: --resume refused);
    a change of worker count or logging resumes, and the global batch size change is stated."""
    from updetr.checkpoint import CheckpointError
    from updetr.local import check_compatible
    from updetr.orchestration.run_plan import config_hash

    smoke = REPO / "experiments" / "smoke.yaml"
    base = load_config(smoke)
    for change in ("runtime.precision=bf16", "data.decode=reduced", "data.drop_last=false", "loss.feature=0.5",
                   "seed=1", "ray.use_gpu=true"):
        assert config_hash(load_config(smoke, [change])) != config_hash(base), change
    for change in ("ray.num_workers=4", "data.num_workers=3", "schedule.log_every=1", "ray.max_failures=5",
                   "runtime.output_dir=elsewhere", "tracking.enabled=false"):
        assert config_hash(load_config(smoke, [change])) == config_hash(base), change
    ckpt = {"config": config_to_dict(base)}
    with pytest.raises(CheckpointError) as e:
        check_compatible(load_config(smoke, ["runtime.precision=bf16"]), ckpt, tmp_path / "last.pt")
    assert "runtime.precision: checkpoint 'fp32' vs config 'bf16'" in str(e.value)
    check_compatible(load_config(smoke, ["schedule.max_steps=99", "ray.num_workers=4"]), ckpt, tmp_path / "x")
    from updetr.config import resume_note

    note = resume_note(config_to_dict(base), base, 4)
    assert "global batch size changes from 4 to 8" in note and resume_note(config_to_dict(base), base, 2) is None
    # an elastic run (ray.min_workers) that saved with 1 of its 2 workers: the note follows the real count
    assert "from 2 to 4" in resume_note(config_to_dict(base), base, 2, saved_world_size=1)
    assert resume_note(config_to_dict(base), base, 1, saved_world_size=1) is None


def test_min_workers_makes_training_elastic_within_num_workers():
    smoke = REPO / "experiments" / "smoke.yaml"
    from updetr.orchestration.launch import scaling_config

    assert scaling_config(load_config(smoke, [])).num_workers == 2
    assert scaling_config(load_config(smoke, ["ray.min_workers=1"])).num_workers == (1, 2)
    assert scaling_config(load_config(smoke, ["ray.min_workers=2"])).num_workers == 2
    with pytest.raises(ConfigError, match=r"ray.min_workers \(3\) is more than ray.num_workers \(2\)"):
        load_config(smoke, ["ray.min_workers=3"])
