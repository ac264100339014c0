"""Deformable DETR's structure and pieces: official keys and head layout per variant, the initial biases,
post-processing over (query, class) pairs, the focal loss, and a training step through the engine."""
from __future__ import annotations

import math

import pytest
import torch

from tests.models.conftest import make_targets
from tests.models.deformable.conftest import tiny_deformable_cfg
from updetr.engine import train_step
from updetr.engine_setup import build_optimizer
from updetr.models.deformable import DeformableDETR, DeformablePostProcess
from updetr.tasks import build_model
from updetr.util.nested_tensor import nested_tensor_from_tensor_list

VARIANT = {"plain": [], "box_refine": ["model.with_box_refine=true"],
           "two_stage": ["model.with_box_refine=true", "model.two_stage=true"]}


@pytest.mark.parametrize("variant", list(VARIANT))
def test_keys_heads_and_initial_biases(variant):
    model = build_model(tiny_deformable_cfg(*VARIANT[variant]))[0]
    assert isinstance(model, DeformableDETR)
    sd = model.state_dict()
    assert ("query_embed.weight" in sd) == (variant != "two_stage")
    if variant != "two_stage":
        assert sd["query_embed.weight"].shape == (12, 64)          # [Q, 2C]: position half, content half
        assert abs(float(sd["query_embed.weight"].std()) - 1.0) < 0.2
    assert sd["transformer.level_embed"].shape == (4, 32)
    assert [sd[f"input_proj.{i}.0.weight"].shape[1:] for i in range(4)] == \
        [(128, 1, 1), (256, 1, 1), (512, 1, 1), (512, 3, 3)]    # ResNet-18's C3-C5, then the stride-64 level
    heads = 3 if variant == "two_stage" else 2
    assert len(model.class_embed) == len(model.bbox_embed) == heads
    shared = variant == "plain"
    assert (model.bbox_embed[0] is model.bbox_embed[1]) == shared
    assert any(k.startswith("transformer.decoder.bbox_embed.") for k in sd) == (not shared)
    assert any(k.startswith("transformer.decoder.class_embed.") for k in sd) == (variant == "two_stage")
    for head in model.class_embed:
        assert torch.allclose(head.bias, torch.full_like(head.bias, -math.log(99)))
    size_bias = [head.layers[-1].bias[2:].tolist() for head in model.bbox_embed]
    expected = {"plain": [[-2, -2]] * 2, "box_refine": [[-2, -2], [0, 0]], "two_stage": [[0, 0]] * 3}[variant]
    assert size_bias == expected


def test_postprocess_ranks_query_class_pairs():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 1, 2], logits[0, 1, 0], logits[0, 2, 3] = 3.0, 2.0, 1.0     # query 1 twice, with two classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    out = DeformablePostProcess(num_select=3)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert out[0]["labels"].tolist() == [2, 0, 3]
    assert torch.allclose(out[0]["scores"], torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    assert out[0]["boxes"].tolist() == [[0.0, 25.0, 100.0, 75.0]] * 2 + [[0.0, 0.0, 200.0, 100.0]]


def test_focal_loss_counts_every_query_and_class():
    """loss_ce = sum over queries and classes of the focal term / num_boxes, unmatched queries against 0."""
    model, criterion, _ = build_model(tiny_deformable_cfg())
    torch.manual_seed(0)
    logits = torch.randn(1, 12, 5)
    boxes = torch.rand(1, 12, 4) * 0.3 + 0.3
    targets = [{"labels": torch.tensor([2, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.4, 0.35, 0.3]])}]
    out = {"pred_logits": logits, "pred_boxes": boxes}
    losses = criterion(out, targets)
    (q, t), = criterion.matcher(out, targets)
    y = torch.zeros_like(logits)
    y[0, q, targets[0]["labels"][t]] = 1
    p = logits.sigmoid()
    pt = p * y + (1 - p) * (1 - y)
    alpha = 0.25 * y + 0.75 * (1 - y)
    manual = (alpha * (1 - pt) ** 2 * -pt.log()).sum() / 2
    assert torch.allclose(losses["loss_ce"], manual, rtol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_training_step_through_the_engine(variant):
    """One optimizer step on a padded batch: finite losses, the ×0.1 group moves its parameters."""
    cfg = tiny_deformable_cfg(*VARIANT[variant])
    model, criterion, _ = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    imgs = [torch.randn(3, 96, 128), torch.randn(3, 112, 72)]
    nt = nested_tensor_from_tensor_list(imgs)
    batch = {"images": nt.tensors, "mask": nt.mask, "targets": make_targets(2, 3)}
    before = model.transformer.encoder.layers[0].self_attn.sampling_offsets.weight.clone()
    metrics = train_step(model, criterion, batch, optimizer, device=torch.device("cpu"), clip_max_norm=0.1)
    assert all(math.isfinite(v) for v in metrics.values())
    assert not torch.equal(before, model.transformer.encoder.layers[0].self_attn.sampling_offsets.weight)
