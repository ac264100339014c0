"""UP-DETR's random query patch detection on Deformable DETR: every switch changes what it should (each test
fails when its switch is ignored), image b's predictions depend only on image b's patches, and the weights
carry over to detection."""
from __future__ import annotations

import math

import pytest
import torch

from tests.models.conftest import make_targets
from tests.models.deformable.conftest import TINY_DEFORMABLE
from tests.models.test_fast_path import REFERENCE
from updetr.config import load_config
from updetr.engine import train_step
from updetr.engine_setup import build_optimizer
from updetr.models.deformable.pretext import DeformableUPDETR
from updetr.tasks import build_model, get_task
from updetr.util.nested_tensor import nested_tensor_from_tensor_list

ARCH = [o for o in TINY_DEFORMABLE if o.startswith(("model.", "tracking."))
        and not o.startswith("model.num_classes")]
PRETRAIN = ARCH + ["pretext.num_patches=2", "pretext.patch_dropout=0.0", "model.dropout=0.0", *REFERENCE]


def pretrain(*overrides: str):
    cfg = load_config(None, PRETRAIN + list(overrides))
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def inputs(m: int = 2, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 96, 128, generator=g), torch.randn(b, m, 3, 32, 32, generator=g)


def slots_changed(a: dict, b: dict, image: int) -> torch.Tensor:
    """`[N]` bool: which query slots of `image` moved (logits or boxes) between two outputs."""
    moved = (a["pred_logits"][image] - b["pred_logits"][image]).abs().amax(-1) > 1e-6
    return moved | ((a["pred_boxes"][image] - b["pred_boxes"][image]).abs().amax(-1) > 1e-6)


def test_pretraining_builds_the_deformable_model_with_official_defaults():
    cfg, (model, criterion, _) = pretrain()
    assert isinstance(model, DeformableUPDETR) and cfg.model.pre_norm is False
    assert model.patch2query.in_features == 128 + 256 + 512          # GAP of C3-C5 (ResNet-18)
    assert model.feature_align.layers[-1].out_features == 896
    assert "loss_feature" in criterion.weight_dict and "loss_feature_0" in criterion.weight_dict


def test_image_b_depends_only_on_its_own_patches():
    """A batch of two: changing image 0's patches leaves image 1's predictions exactly as they were (the
    patch queries are built per image, never broadcast from image 0)."""
    _, (model, _, _) = pretrain()
    model.eval()
    images, patches = inputs()
    with torch.no_grad():
        base = model(images, patches)
        other = patches.clone()
        other[0] += 1.0
        changed0 = model(images, other)
        other = patches.clone()
        other[1] += 1.0
        changed1 = model(images, other)
    assert not slots_changed(base, changed0, image=1).any()
    assert slots_changed(base, changed0, image=0).all()
    assert slots_changed(base, changed1, image=1).all()
    assert torch.equal(base["gt_feature"][2:], changed0["gt_feature"][2:])


@pytest.mark.parametrize("m", [2, 3])
def test_group_mask_isolates_each_patch_group(m):
    """With M patches the N queries form M groups of N/M; changing patch p moves group p only. Without the
    mask every group sees the others through the decoder's self-attention."""
    per = 12 // m
    for masked in (True, False):
        _, (model, _, _) = pretrain(f"pretext.num_patches={m}", f"pretext.attention_mask={str(masked).lower()}")
        model.eval()
        images, patches = inputs(m=m)
        other = patches.clone()
        other[0, m - 1] += 1.0                                            # the last patch of image 0
        with torch.no_grad():
            moved = slots_changed(model(images, patches), model(images, other), image=0)
        last = torch.arange(12) >= (m - 1) * per
        assert moved[last].all()
        assert moved[~last].any() != masked, (m, masked)
    assert torch.equal(model.attention_mask[:per, :per], torch.zeros(per, per))
    assert torch.isinf(model.attention_mask[:per, per:]).all()


def test_eval_uses_the_first_groups_for_fewer_patches():
    _, (model, _, _) = pretrain()
    model.eval()
    images, patches = inputs()
    with torch.no_grad():
        out = model(images, patches[:, :1])
    assert out["pred_logits"].shape[1] == 6


@pytest.mark.parametrize("shuffle", [True, False])
def test_query_shuffle_permutes_the_learned_queries_in_training(shuffle):
    _, (model, _, _) = pretrain(f"pretext.query_shuffle={str(shuffle).lower()}")
    images, patches = inputs()
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model.train()(images, patches)["pred_boxes"])
    assert torch.equal(outs[0], outs[1]) != shuffle
    with torch.no_grad():
        assert torch.equal(model.eval()(images, patches)["pred_boxes"], model(images, patches)["pred_boxes"])


@pytest.mark.parametrize("recon", [True, False])
def test_feature_reconstruction_switch(recon):
    cfg, (model, criterion, _) = pretrain(f"pretext.feature_recon={str(recon).lower()}")
    images, patches = inputs()
    out = model(images, patches)
    assert ("pred_feature" in out) == recon and ("pred_feature" in out["aux_outputs"][0]) == recon
    assert any(k.startswith("feature_align.") for k in model.state_dict()) == recon
    losses = criterion(out, make_targets(2, 2))
    assert ("loss_feature" in losses) == recon and ("loss_feature_0" in losses) == recon
    if recon:
        assert out["gt_feature"].shape == (4, 896) and out["pred_feature"].shape == (2, 12, 896)


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_backbone_switch(frozen):
    overrides = [] if frozen else ["model.freeze_backbone=false", "optim.lr_backbone=1e-4"]
    cfg, (model, criterion, _) = pretrain(*overrides)
    images, patches = inputs()
    nt = nested_tensor_from_tensor_list(list(images))
    batch = {"images": nt.tensors, "mask": nt.mask, "patches": patches, "targets": make_targets(2, 2)}
    optimizer = build_optimizer(model, cfg.optim)
    metrics = train_step(model, criterion, batch, optimizer, device=torch.device("cpu"), clip_max_norm=0.1)
    assert all(math.isfinite(v) for v in metrics.values())
    cnn = dict(model.backbone[0].body.named_parameters())
    assert any(p.grad is not None for p in cnn.values()) != frozen
    assert (cnn["layer4.0.conv1.weight"].grad is None) == frozen
    assert len(optimizer.param_groups) == (2 if frozen else 3)


def test_pretrained_weights_initialise_detection():
    """detect drops class_embed / patch2query / feature_align and keeps the rest, strictly."""
    _, (model, _, _) = pretrain("model.with_box_refine=true")
    cfg = load_config(None, TINY_DEFORMABLE + ["model.with_box_refine=true"])
    task = get_task(cfg)
    detector = task.build()[0]
    report = task.init_weights(detector, {"model": model.state_dict(), "config": {"task": "pretrain"}}, "pre.pt")
    assert torch.equal(detector.state_dict()["query_embed.weight"], model.state_dict()["query_embed.weight"])
    assert {k.split(".")[0] for k in report.reinitialised} == {"class_embed"}
    assert {k.split(".")[0] for k in report.dropped} == {"class_embed", "patch2query", "feature_align"}


@pytest.mark.parametrize("p", [0.0, 0.9])
def test_patch_dropout_cuts_a_dropped_patch_off_its_queries(p):
    """Query-patch dropout (paper mode: a whole patch at once) on Deformable DETR: with the same draws, changing
    patch 0 moves the predictions of patch 0's query group exactly when that patch was kept; the other groups
    never move (group mask). At p = 0 every group responds to its patch, at p = 0.9 most do not."""
    _, (model, _, _) = pretrain(f"pretext.patch_dropout={p}", "pretext.patch_dropout_mode=patch")
    model.train()
    per = model.num_queries // model.num_patches
    images, patches = inputs()
    changed = patches.clone()
    changed[:, 0] += 1.0
    responded = []
    for seed in range(6):
        outs = []
        for pt in (patches, changed):
            torch.manual_seed(seed)  # the same patch-dropout draws for both
            with torch.no_grad():
                outs.append(model(images, pt))
        for image in range(2):
            moved = slots_changed(outs[0], outs[1], image)
            assert not moved[per:].any()
            assert bool(moved[:per].all()) or not moved[:per].any()
            responded.append(bool(moved[:per].all()))
    if p == 0.0:
        assert all(responded)
    else:
        assert sum(responded) < len(responded) / 2


def test_softmax_classification_switch():
    """`pretext.classification: softmax` gives Deformable DETR UP-DETR's (K+1)-way softmax: one more class
    logit, DETR's criterion (cross-entropy with the no-object weight loss.eos_coef, softmax matching cost)
    with its class weights 1 / 1; the default stays Deformable DETR's sigmoid focal loss."""
    from updetr.models.criterion import SetCriterion
    from updetr.models.deformable.criterion import DeformableCriterion

    cfg, (model, criterion, _) = pretrain("pretext.classification=softmax")
    assert type(criterion) is SetCriterion and criterion.eos_coef == cfg.loss.eos_coef == 0.1
    assert (cfg.loss.ce, cfg.loss.set_cost_class) == (1.0, 1.0)
    images, patches = inputs()
    out = model(images, patches)
    assert out["pred_logits"].shape[-1] == 3                           # patch, background class, no-object
    targets = make_targets(2, 2)
    losses = criterion(out, targets)
    indices = criterion.matcher(out, targets)
    target_classes = torch.full(out["pred_logits"].shape[:2], 2)
    for b, (src, _) in enumerate(indices):
        target_classes[b, src] = 1
    want = torch.nn.functional.cross_entropy(out["pred_logits"].transpose(1, 2), target_classes,
                                             torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(losses["loss_ce"], want)
    batch = {"images": images, "mask": torch.zeros(2, 96, 128, dtype=torch.bool), "patches": patches,
             "targets": targets}
    metrics = train_step(model, criterion, batch, build_optimizer(model, cfg.optim), device=torch.device("cpu"))
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["loss_ce"])
    focal_cfg, (focal_model, focal_criterion, _) = pretrain()
    assert type(focal_criterion) is DeformableCriterion and (focal_cfg.loss.ce, focal_cfg.loss.set_cost_class) == (2.0, 2.0)
    assert focal_model(images, patches)["pred_logits"].shape[-1] == 2
    with pytest.raises(Exception, match="pretext.classification 'focal' applies to model.detector deformable_detr"):
        load_config(None, ["pretext.classification=focal"])
