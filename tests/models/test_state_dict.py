"""State-dict keys and shapes identical to the official releases (reference-notes §4), strict loading."""
import pytest
import torch

from updetr.config import load_config
from updetr.checkpoint import pretrain_to_finetune, strip_prefixes
from updetr.tasks import build_model

from .conftest import tiny_cfg, tiny_finetune_cfg

BN = ("weight", "bias", "running_mean", "running_var")


def official_resnet_keys(depth: int) -> dict[str, tuple]:
    """`backbone.0.body.*` names/shapes of torchvision's ResNet-`depth` (no fc, FrozenBN: 4 buffers)."""
    bottleneck = depth >= 50
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    expansion = 4 if bottleneck else 1
    p = "backbone.0.body."
    keys = {p + "conv1.weight": (64, 3, 7, 7), **{p + f"bn1.{b}": (64,) for b in BN}}
    inplanes = 64
    for li, (planes, n) in enumerate(zip([64, 128, 256, 512], blocks), start=1):
        for j in range(n):
            pre = f"{p}layer{li}.{j}."
            cin = inplanes if j == 0 else planes * expansion
            if bottleneck:
                convs = [(planes, cin, 1, 1), (planes, planes, 3, 3), (planes * expansion, planes, 1, 1)]
            else:
                convs = [(planes, cin, 3, 3), (planes, planes, 3, 3)]
            for ci, shape in enumerate(convs, start=1):
                keys[f"{pre}conv{ci}.weight"] = shape
                keys.update({f"{pre}bn{ci}.{b}": (shape[0],) for b in BN})
            if j == 0 and (li > 1 or bottleneck):  # stride-2 stage or channel change
                keys[f"{pre}downsample.0.weight"] = (planes * expansion, cin, 1, 1)
                keys.update({f"{pre}downsample.1.{b}": (planes * expansion,) for b in BN})
        inplanes = planes * expansion
    return keys


def official_detr_keys(depth=50, d=256, ff=2048, enc=6, dec=6, nq=100, num_classes=91, pre_norm=True,
                       updetr=False, feature_recon=True) -> dict[str, tuple]:
    """Keys/shapes of an official DETR (or UP-DETR pre-training) checkpoint, built from §4's description."""
    keys = official_resnet_keys(depth)
    cb = 2048 if depth >= 50 else 512
    attn = {"in_proj_weight": (3 * d, d), "in_proj_bias": (3 * d,), "out_proj.weight": (d, d), "out_proj.bias": (d,)}
    ffn = {"linear1.weight": (ff, d), "linear1.bias": (ff,), "linear2.weight": (d, ff), "linear2.bias": (d,)}
    ln = {"weight": (d,), "bias": (d,)}
    for i in range(enc):
        pre = f"transformer.encoder.layers.{i}."
        keys.update({pre + "self_attn." + k: v for k, v in attn.items()})
        keys.update({pre + k: v for k, v in ffn.items()})
        for n in (1, 2):
            keys.update({f"{pre}norm{n}.{k}": v for k, v in ln.items()})
    if pre_norm:
        keys.update({f"transformer.encoder.norm.{k}": v for k, v in ln.items()})
    for i in range(dec):
        pre = f"transformer.decoder.layers.{i}."
        for a in ("self_attn", "multihead_attn"):
            keys.update({f"{pre}{a}.{k}": v for k, v in attn.items()})
        keys.update({pre + k: v for k, v in ffn.items()})
        for n in (1, 2, 3):
            keys.update({f"{pre}norm{n}.{k}": v for k, v in ln.items()})
    keys.update({f"transformer.decoder.norm.{k}": v for k, v in ln.items()})
    k1 = (2 if updetr else num_classes) + 1
    keys.update({"class_embed.weight": (k1, d), "class_embed.bias": (k1,),
                 "bbox_embed.layers.0.weight": (d, d), "bbox_embed.layers.0.bias": (d,),
                 "bbox_embed.layers.1.weight": (d, d), "bbox_embed.layers.1.bias": (d,),
                 "bbox_embed.layers.2.weight": (4, d), "bbox_embed.layers.2.bias": (4,),
                 "query_embed.weight": (nq, d), "input_proj.weight": (d, cb, 1, 1), "input_proj.bias": (d,)})
    if updetr:
        keys.update({"patch2query.weight": (d, cb), "patch2query.bias": (d,)})
        if feature_recon:
            keys.update({"feature_align.layers.0.weight": (d, d), "feature_align.layers.0.bias": (d,),
                         "feature_align.layers.1.weight": (cb, d), "feature_align.layers.1.bias": (cb,)})
    return keys


def _fake_state_dict(table):
    return {k: torch.randn(shape) for k, shape in table.items()}


def _assert_strict_load(model, table):
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == table, {"missing": sorted(set(table) - set(ours))[:5], "extra": sorted(set(ours) - set(table))[:5]}
    sd = _fake_state_dict(table)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.state_dict()["transformer.decoder.layers.0.multihead_attn.in_proj_weight"],
                       sd["transformer.decoder.layers.0.multihead_attn.in_proj_weight"])


def test_reference_key_counts():
    assert len(official_resnet_keys(50)) == 265
    assert len(official_detr_keys(updetr=True)) == 466
    assert len(official_detr_keys(num_classes=91)) == 460
    assert len(official_detr_keys(pre_norm=False)) == 458


def test_updetr_r50_pre_norm_loads_official_466_keys():
    model, _, _ = build_model(load_config(None, ["tracking.enabled=false"]))  # defaults = official recipe
    _assert_strict_load(model, official_detr_keys(updetr=True))


@pytest.mark.parametrize("pre_norm", [True, False])
def test_detr_r50_loads_official_keys(pre_norm):
    cfg = load_config(None, ["stage=finetune", "data.source=coco", "data.path=/x", "model.num_classes=91",
                             f"model.pre_norm={str(pre_norm).lower()}", "tracking.enabled=false"])
    model, _, _ = build_model(cfg)
    table = official_detr_keys(num_classes=91, pre_norm=pre_norm)
    assert len(table) == (460 if pre_norm else 458)
    _assert_strict_load(model, table)


def test_tiny_resnet18_tables_and_no_feature_recon():
    model, _, _ = build_model(tiny_cfg("pretext.feature_recon=false"))
    table = official_detr_keys(depth=18, d=32, ff=64, enc=1, dec=2, nq=20, updetr=True, feature_recon=False)
    _assert_strict_load(model, table)
    model, _, _ = build_model(tiny_finetune_cfg("model.pre_norm=false"))
    _assert_strict_load(model, official_detr_keys(depth=18, d=32, ff=64, enc=1, dec=2, nq=20, num_classes=5,
                                                  pre_norm=False))


def test_pretrain_to_finetune():
    pre, _, _ = build_model(tiny_cfg())
    sd = {"module." + k: v for k, v in pre.state_dict().items()}
    ft_sd = pretrain_to_finetune(sd)
    dropped = set(pre.state_dict()) - set(ft_sd)
    assert dropped == {"class_embed.weight", "class_embed.bias", "patch2query.weight", "patch2query.bias",
                       "feature_align.layers.0.weight", "feature_align.layers.0.bias",
                       "feature_align.layers.1.weight", "feature_align.layers.1.bias"}
    detr, _, _ = build_model(tiny_finetune_cfg("model.pre_norm=true"))  # UP-DETR fine-tuning is pre-norm
    result = detr.load_state_dict(ft_sd, strict=False)
    assert sorted(result.missing_keys) == ["class_embed.bias", "class_embed.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(detr.query_embed.weight, pre.query_embed.weight)
    assert torch.equal(detr.bbox_embed.layers[2].weight, pre.bbox_embed.layers[2].weight)


def test_strip_prefixes():
    t = torch.zeros(1)
    sd = {"module._orig_mod.a.b": t, "_orig_mod.c": t, "d.module.e": t}
    assert list(strip_prefixes(sd)) == ["a.b", "c", "d.module.e"]
    assert list(strip_prefixes({"x.y": t}, prefixes=("x.",))) == ["y"]
