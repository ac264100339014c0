"""Every paper sweep YAML validates in every cell and resolves to the settings the paper states."""
from pathlib import Path

import pytest

from updetr.sweep.spec import load_sweep

SWEEPS = Path(__file__).resolve().parents[2] / "experiments" / "sweeps"


def stages(cell) -> dict:
    return {s.name: s.cfg for s in cell.experiment.stages}


def test_every_sweep_file_validates_every_cell():
    files = sorted(SWEEPS.glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        sweep = load_sweep(f)
        assert sweep.cells, f
        assert "reports" in f.read_text() or "Paper" in f.read_text(), f"{f}: says what the paper reports"


def check_ablation_pretrain(cfg, epochs=15, lr_drop=10):
    """The paper's pre-training: ResNet-50, N=100, lambda = M/N, ImageNet; ablations 15 epochs / drop at 10."""
    assert cfg.task == "pretrain" and cfg.model.backbone == "resnet50" and cfg.model.num_queries == 100
    assert cfg.schedule.epochs == epochs and cfg.schedule.lr_drop == lr_drop
    assert cfg.loss.eos_coef == pytest.approx(cfg.pretext.num_patches / cfg.model.num_queries)
    assert cfg.optim.lr == 1e-4


def check_voc_finetune(cfg, epochs=150, lr_drop=100, pretrained=True):
    assert cfg.task == "detect" and cfg.data.source == "voc" and not cfg.model.freeze_backbone
    assert cfg.schedule.epochs == epochs and cfg.schedule.lr_drop == lr_drop
    assert cfg.optim.lr == 1e-4
    assert cfg.optim.lr_backbone == (5e-5 if pretrained else 1e-5)
    assert cfg.model.pre_norm is pretrained            # UP-DETR pre-norm, DETR post-norm
    assert (cfg.init.checkpoint == "previous") is pretrained


def test_table5_frozen_cnn_by_feature_reconstruction():
    sweep = load_sweep(SWEEPS / "table5_frozen-cnn_feature-recon_voc-150e.yaml")
    combos = set()
    for cell in sweep.cells[:4]:
        st = stages(cell)
        assert list(st) == ["pretrain", "finetune", "eval"]
        check_ablation_pretrain(st["pretrain"])
        assert st["pretrain"].pretext.num_patches == 10
        check_voc_finetune(st["finetune"])
        combos.add((st["pretrain"].model.freeze_backbone, st["pretrain"].pretext.feature_recon))
    assert combos == {(False, False), (True, False), (False, True), (True, True)}   # cases (a)-(d)
    detr = sweep.cells[4]
    assert detr.name == "detr-scratch" and list(stages(detr)) == ["finetune", "eval"]
    check_voc_finetune(stages(detr)["finetune"], pretrained=False)


def test_table6_single_vs_multi_query_with_lambda_m_over_n():
    sweep = load_sweep(SWEEPS / "table6_single-vs-multi-query_voc-150e.yaml")
    got = {}
    for cell in sweep.cells[:2]:
        pre = stages(cell)["pretrain"]
        check_ablation_pretrain(pre)
        check_voc_finetune(stages(cell)["finetune"])
        got[pre.pretext.num_patches] = pre.loss.eos_coef
    assert got == {1: pytest.approx(0.01), 10: pytest.approx(0.1)}
    check_voc_finetune(stages(sweep.cells[2])["finetune"], pretrained=False)


def test_fig6_attention_mask_pretraining_only():
    sweep = load_sweep(SWEEPS / "fig6_attention-mask_pretrain-loss.yaml")
    masks = set()
    for cell in sweep.cells:
        (cfg,) = stages(cell).values()
        check_ablation_pretrain(cfg, epochs=60, lr_drop=40)
        assert cfg.pretext.num_patches == 10 and cfg.model.freeze_backbone and cfg.pretext.feature_recon
        masks.add(cfg.pretext.attention_mask)
    assert masks == {True, False}
    assert sweep.spec.options.metric == "epoch/loss" and sweep.spec.options.mode == "min"


def test_fig1_updetr_vs_detr_short_and_long():
    sweep = load_sweep(SWEEPS / "fig1_updetr-vs-detr_voc-150e-300e.yaml")
    seen = set()
    for cell in sweep.cells:
        st = stages(cell)
        pretrained = "pretrain" in st
        if pretrained:
            check_ablation_pretrain(st["pretrain"], epochs=60, lr_drop=40)   # the full pre-training
        epochs = st["finetune"].schedule.epochs
        check_voc_finetune(st["finetune"], epochs=epochs, lr_drop={150: 100, 300: 200}[epochs],
                           pretrained=pretrained)
        seen.add((pretrained, epochs))
    assert seen == {(True, 150), (True, 300), (False, 150), (False, 300)}


def test_five_factor_grid_covers_every_combination():
    sweep = load_sweep(SWEEPS / "ablation_five-factor_voc-150e.yaml")
    combos = set()
    for cell in sweep.cells:
        pre = stages(cell)["pretrain"]
        check_ablation_pretrain(pre)
        check_voc_finetune(stages(cell)["finetune"])
        combos.add((pre.model.freeze_backbone, pre.pretext.feature_recon, pre.pretext.num_patches,
                    pre.pretext.query_shuffle, pre.pretext.attention_mask))
    assert len(combos) == 32 == len({c.name for c in sweep.cells})
    assert sweep.spec.options.early_stopping is not None


def test_smoke_sized_overrides_reach_every_cell():
    """The Table 5 sweep with smoke-sized settings (as `updetr sweep ... k=v` would run it on CPU)."""
    sweep = load_sweep(SWEEPS / "table5_frozen-cnn_feature-recon_voc-150e.yaml",
                       ["stages.finetune.schedule.epochs=2", "stages.pretrain.schedule.epochs=1",
                        "ray.use_gpu=false"])
    for cell in sweep.cells:
        st = stages(cell)
        assert st["finetune"].schedule.epochs == 2 and not st["finetune"].ray.use_gpu
        assert "pretrain" not in st or st["pretrain"].schedule.epochs == 1


def test_table5_smoke_is_table5_at_smoke_size():
    """The smoke file runs Table 5's grid and DETR variant on the same chains, with the smoke chain's sizes."""
    full = load_sweep(SWEEPS / "table5_frozen-cnn_feature-recon_voc-150e.yaml")
    smoke = load_sweep(SWEEPS / "table5_frozen-cnn_feature-recon_smoke.yaml")
    assert full.spec.grid == smoke.spec.grid and full.spec.variants == smoke.spec.variants
    assert [(c.name, c.params, c.experiment_path) for c in full.cells] == \
           [(c.name, c.params, c.experiment_path) for c in smoke.cells]
    for full_cell, cell in zip(full.cells, smoke.cells):
        st = stages(cell)
        assert [s.name for s in cell.experiment.stages] == [s.name for s in full_cell.experiment.stages]
        for cfg in st.values():
            assert cfg.model.backbone == "resnet18" and cfg.model.backbone_weights is None
            assert not cfg.ray.use_gpu and cfg.ray.num_workers == 1 and cfg.runtime.precision == "fp32"
        if "pretrain" in st:
            pre = st["pretrain"]
            assert pre.data.source == "synthetic" and pre.loss.eos_coef == pytest.approx(0.2)    # M/N = 2/10
            grid = (cell.params["stages.pretrain.model.freeze_backbone"],
                    cell.params["stages.pretrain.pretext.feature_recon"])
            assert (pre.model.freeze_backbone, pre.pretext.feature_recon) == grid
        assert st["finetune"].data.source == "synthetic_coco"
        assert st["finetune"].model.pre_norm is stages(full_cell)["finetune"].model.pre_norm
