"""updetr's Deformable DETR against the official model (../shared/reference/deformable-detr, built at test time
on CPU with the shims of `official.py`), for the three variants: plain, iterative box refinement, and box
refinement + two-stage.

Both models share one set of weights (the official state dict, every parameter and FrozenBN statistic moved
off its initial value, loaded *strictly* into ours) and see the same two images of different sizes, so the
batch is padded (bottom / right) and the level maps are not square. Compared, each in float64 and float32:
every output (last layer, each auxiliary layer, the two-stage encoder outputs), the matcher's indices for each
of those, every loss term (same keys, same values), every parameter gradient of the weighted loss, and the
post-processed detections.

Tolerances (max |ours - official| / max(1, max |official|) per tensor): float64 1e-12, float32 1e-5. Both
sides run the same operations in the same order, so the differences measured are 0 in float64 and 0 in
float32 on this machine; the bounds leave room for other BLAS builds. updetr runs its reference path (every
run-time speed-up off); the default path rounds differently (tests/models/test_fast_path.py). Dropout is 0.

A tiny architecture keeps it fast: ResNet-50 (the official backbone hard-codes its channels) on images of
under 100 pixels, width 256 (the official two-stage embedding hard-codes 128 features per coordinate), one
encoder and two decoder layers, FFN 64, 20 queries, 4 levels, 4 encoder / 2 decoder sampling points.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.models.deformable.official import official_deformable, randomise
from tests.models.test_fast_path import REFERENCE
from updetr.config import load_config
from updetr.tasks import build_model

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
ARCH = ["--backbone", "resnet50", "--hidden_dim", "256", "--nheads", "8", "--enc_layers", "1", "--dec_layers", "2",
        "--dim_feedforward", "64", "--num_queries", "20", "--enc_n_points", "4", "--dec_n_points", "2",
        "--dropout", "0.0", "--dataset_file", "coco"]
OURS = ["task=detect", "data.source=coco", "data.path=/nonexistent", "model.num_classes=91",
        "model.detector=deformable_detr", "model.backbone=resnet50", "model.hidden_dim=256", "model.nheads=8",
        "model.enc_layers=1", "model.dec_layers=2", "model.dim_feedforward=64", "model.num_queries=20",
        "model.enc_n_points=4", "model.dec_n_points=2", "model.dropout=0.0", "tracking.enabled=false", *REFERENCE]
# The plain variant also trains the CNN's layers 2-4 (their gradients are compared); the others freeze it, as
# the CNN is the same in every variant and its float64 backward is the slowest part.
VARIANTS = {"plain": (["--lr_backbone", "1e-5"], ["optim.lr_backbone=1e-5"]),
            "box_refine": (["--lr_backbone", "0", "--with_box_refine"],
                           ["optim.lr_backbone=0", "model.with_box_refine=true"]),
            "two_stage": (["--lr_backbone", "0", "--with_box_refine", "--two_stage"],
                          ["optim.lr_backbone=0", "model.with_box_refine=true", "model.two_stage=true"])}


def ours_cfg(*overrides: str):
    return load_config(None, OURS + list(overrides))


def inputs(dtype: torch.dtype):
    """Two images (64x96 and 80x56: the batch pads to 80x96, levels 10x12, 5x6, 3x3, 2x2) and their targets
    (COCO ids, cxcywh)."""
    g = torch.Generator().manual_seed(11)
    images = [torch.randn(3, 64, 96, generator=g).to(dtype), torch.randn(3, 80, 56, generator=g).to(dtype)]
    targets = [{"labels": torch.tensor([1, 17, 90]), "boxes": torch.tensor(
                    [[0.5, 0.5, 0.4, 0.3], [0.25, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5]], dtype=dtype)},
               {"labels": torch.tensor([3, 17]), "boxes": torch.tensor(
                    [[0.4, 0.45, 0.5, 0.6], [0.8, 0.2, 0.2, 0.1]], dtype=dtype)}]
    return images, targets


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|) (infinities must agree exactly)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    inf = torch.isinf(b)
    assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], b[inf])
    a, b = a[~inf], b[~inf]
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def step(model, criterion, postprocessors, images, targets) -> dict:
    """One forward + loss + backward; everything that the comparison reads."""
    model.zero_grad(set_to_none=True)
    out = model(images)
    losses = criterion(out, targets)
    weights = criterion.weight_dict
    sum(losses[k] * weights[k] for k in losses if k in weights).backward()
    heads = {"last": {k: v for k, v in out.items() if k in ("pred_logits", "pred_boxes")}}
    heads.update({f"aux_{i}": aux for i, aux in enumerate(out.get("aux_outputs", []))})
    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    indices = {name: criterion.matcher(o, targets) for name, o in heads.items()}
    if "enc_outputs" in out:
        heads["enc"] = out["enc_outputs"]
        indices["enc"] = criterion.matcher(out["enc_outputs"], binary)
    sizes = torch.tensor([[64, 96], [80, 56]])
    return {"heads": heads, "indices": indices, "losses": losses,
            "grads": {n: p.grad for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None},
            "detections": postprocessors["bbox"](heads["last"], sizes)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    """(variant, official (model, criterion, postprocessors), ours) sharing the official weights."""
    official_flags, our_flags = VARIANTS[request.param]
    with official_deformable() as dd:
        torch.manual_seed(0)
        theirs = dd.models.build_model(dd.args(*ARCH, *official_flags))
    randomise(theirs[0])
    ours = build_model(ours_cfg(*our_flags))
    ours[0].load_state_dict(theirs[0].state_dict(), strict=True)
    return request.param, theirs, ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_outputs_matching_losses_gradients_detections(pair, dtype):
    variant, theirs, ours = pair
    tol = TOL[dtype]
    images, targets = inputs(dtype)
    a = step(*[copy.deepcopy(x).to(dtype) if i < 2 else x for i, x in enumerate(ours)], images, targets)
    b = step(*[copy.deepcopy(x).to(dtype) if i < 2 else x for i, x in enumerate(theirs)], images, targets)
    worst = {}

    assert a["heads"].keys() == b["heads"].keys()
    expected = {"plain": 2, "box_refine": 2, "two_stage": 3}[variant]   # last + 1 aux (+ enc)
    assert len(b["heads"]) == expected
    for name in b["heads"]:
        for key in ("pred_logits", "pred_boxes"):
            worst[f"{name}.{key}"] = diff(a["heads"][name][key], b["heads"][name][key])
        for (qa, ta), (qb, tb) in zip(a["indices"][name], b["indices"][name]):
            assert torch.equal(qa, qb) and torch.equal(ta, tb), name

    assert a["losses"].keys() == b["losses"].keys()
    assert len(b["losses"]) == {"plain": 9, "box_refine": 9, "two_stage": 13}[variant]
    for k in b["losses"]:
        worst[k] = diff(a["losses"][k], b["losses"][k])

    assert a["grads"].keys() == b["grads"].keys()
    # the plain variant's gradients include the CNN's layers 2-4 (and never the stem or layer1)
    cnn = [k for k in b["grads"] if k.startswith("backbone.")]
    assert bool(cnn) == (variant == "plain") and not any(".layer1." in k or ".conv1." in k.split("layer")[0]
                                                        for k in cnn)
    for k in b["grads"]:
        worst[f"grad {k}"] = diff(a["grads"][k], b["grads"][k])

    for da, db in zip(a["detections"], b["detections"]):
        assert torch.equal(da["labels"], db["labels"])
        for key in ("scores", "boxes"):
            worst[f"detections.{key}"] = diff(da[key], db[key])

    largest = max(worst, key=worst.get)
    print(f"{variant} {dtype}: largest difference {worst[largest]:.3g} ({largest})")
    assert worst[largest] <= tol, (largest, worst[largest])
