"""How Deformable DETR plugs in: `model.detector`, its official defaults, the refusals, the optimizer groups,
and the official defaults of DETR left exactly as they were."""
from __future__ import annotations

import pytest

from tests.models.deformable.conftest import tiny_deformable_cfg
from updetr.config import ConfigError, load_config
from updetr.engine_setup import build_optimizer
from updetr.tasks import build_model

DETECT = ["task=detect", "data.source=coco", "data.path=/nonexistent", "tracking.enabled=false"]


def settings(cfg) -> dict:
    return {"num_queries": cfg.model.num_queries, "dim_feedforward": cfg.model.dim_feedforward,
            "pre_norm": cfg.model.pre_norm, "ce": cfg.loss.ce, "set_cost_class": cfg.loss.set_cost_class,
            "lr": cfg.optim.lr, "lr_backbone": cfg.optim.lr_backbone, "epochs": cfg.schedule.epochs,
            "lr_drop": cfg.schedule.lr_drop}


def test_deformable_takes_the_official_defaults():
    cfg = load_config(None, DETECT + ["model.detector=deformable_detr"])
    assert settings(cfg) == {"num_queries": 300, "dim_feedforward": 1024, "pre_norm": False, "ce": 2.0,
                             "set_cost_class": 2.0, "lr": 2e-4, "lr_backbone": 2e-5, "epochs": 50, "lr_drop": 40}
    m = cfg.model
    assert (m.num_feature_levels, m.enc_n_points, m.dec_n_points, m.with_box_refine, m.two_stage) == \
        (4, 4, 4, False, False)
    assert (cfg.loss.focal_alpha, cfg.optim.lr_linear_proj_mult, m.hidden_dim, m.nheads, m.dropout) == \
        (0.25, 0.1, 256, 8, 0.1)
    # from pre-trained weights too: the task's UP-DETR recipe (pre_norm, lr_backbone 5e-5) is DETR's
    cfg = load_config(None, DETECT + ["model.detector=deformable_detr", "init.checkpoint=/x.pt"])
    assert (cfg.model.pre_norm, cfg.optim.lr_backbone) == (False, 2e-5)


def test_pretraining_takes_its_own_rate_and_refuses_two_stage():
    cfg = load_config(None, ["model.detector=deformable_detr", "tracking.enabled=false"])
    assert (cfg.task, cfg.optim.lr, cfg.model.pre_norm, cfg.model.freeze_backbone) == ("pretrain", 1e-4, False, True)
    with pytest.raises(ConfigError, match="model.two_stage: pre-training feeds query patches"):
        load_config(None, ["model.detector=deformable_detr", "model.two_stage=true", "tracking.enabled=false"])


def test_explicit_values_win():
    cfg = load_config(None, DETECT + ["model.detector=deformable_detr", "model.num_queries=100", "optim.lr=1e-4",
                                      "loss.ce=1", "schedule.epochs=12"])
    assert (cfg.model.num_queries, cfg.optim.lr, cfg.loss.ce, cfg.schedule.epochs) == (100, 1e-4, 1.0, 12)


def test_detr_defaults_are_unchanged():
    assert settings(load_config(None, DETECT)) == {
        "num_queries": 100, "dim_feedforward": 2048, "pre_norm": False, "ce": 1.0, "set_cost_class": 1.0,
        "lr": 1e-4, "lr_backbone": 1e-5, "epochs": 60, "lr_drop": 40}
    assert settings(load_config(None, ["tracking.enabled=false"]))["pre_norm"] is True  # pretrain: UP-DETR's
    assert load_config(None, DETECT).model.detector == "detr"


@pytest.mark.parametrize("task", [["task=oneshot", "data.source=synthetic_voc"],
                                  ["task=panoptic", "data.source=synthetic_panoptic"]])
def test_tasks_without_deformable_refuse_it_in_one_line(task):
    with pytest.raises(ConfigError, match="model.detector 'deformable_detr': task \\w+ builds detr only") as e:
        load_config(None, task + ["model.detector=deformable_detr", "tracking.enabled=false"])
    assert "model.detector" in str(e.value).splitlines()[-1]


@pytest.mark.parametrize("override,message", [
    ("model.with_box_refine=true", "model.with_box_refine applies to model.detector deformable_detr only"),
    ("model.num_feature_levels=1", "model.num_feature_levels applies"),
    ("loss.focal_alpha=0.5", "loss.focal_alpha applies"),
    ("optim.lr_linear_proj_mult=1", "optim.lr_linear_proj_mult applies")])
def test_deformable_fields_are_refused_for_detr(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, DETECT + [override])


@pytest.mark.parametrize("override,message", [("model.pre_norm=true", "post-norm only"),
                                              ("model.num_feature_levels=2", "1 .C5. or >= 3"),
                                              ("model.hidden_dim=48", "divisible by 32")])
def test_deformable_refuses_what_it_cannot_build(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, DETECT + ["model.detector=deformable_detr", "model.nheads=4", override])


@pytest.mark.parametrize("levels,variant", [(4, []), (1, ["model.two_stage=true"])])
def test_optimizer_groups_follow_the_official_code(levels, variant):
    """Three groups: the rest at lr, CNN layers 2-4 at lr_backbone, sampling_offsets / reference_points at
    lr x 0.1 (one sampling_offsets weight + bias per deformable attention, and reference_points' in the
    one-stage model)."""
    cfg = tiny_deformable_cfg(f"model.num_feature_levels={levels}", *variant)
    model = build_model(cfg)[0]
    groups = build_optimizer(model, cfg.optim).param_groups
    assert [g["lr"] for g in groups] == [2e-4, 2e-5, pytest.approx(2e-5)]
    by_id = {id(p): n for n, p in model.named_parameters()}
    slow = sorted(by_id[id(p)] for p in groups[2]["params"])
    attentions = cfg.model.enc_layers + cfg.model.dec_layers
    assert len(slow) == 2 * attentions + (0 if variant else 2)
    assert all("sampling_offsets" in n or n.startswith("transformer.reference_points.") for n in slow)
    assert all(by_id[id(p)].startswith("backbone.0.body.layer") for p in groups[1]["params"])


def test_detr_keeps_two_groups():
    cfg = load_config(None, DETECT + ["model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=2",
                                      "model.enc_layers=1", "model.dec_layers=1", "model.num_classes=3"])
    assert len(build_optimizer(build_model(cfg)[0], cfg.optim).param_groups) == 2
