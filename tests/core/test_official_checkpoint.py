"""The promise "an official UP-DETR / DETR checkpoint goes through `updetr checkpoint convert`, loads strictly
into updetr's model and gives the same outputs", checked end to end against the official code.

A tiny official model (ResNet-18, d=32, 2 heads, 1 encoder / 2 decoder layers, FFN 64, N=20, M=4) is built at
test time by the official `models.build_model` from the official `main.py` / `detr_main.py` argument parsers,
saved exactly as the official training loops save it (`model, optimizer, lr_scheduler, epoch, args`), converted
by the real CLI, loaded with `load_checkpoint` + `load_state_dict(strict=True)` into updetr's model, and both
run in eval mode on the same padded batch. updetr's reference path (every speed-up off) gives bit-identical
outputs; its default path (folded FrozenBN, oneDNN linears, ...) rounds differently, so it is held to 1e-5 of
each output's scale. Nothing is downloaded: the official backbone builds the torchvision ResNet with
`pretrained=False` and fetches SwAV weights only for resnet50.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from tests.models.conftest import TINY, tiny_cfg
from tests.models.test_fast_path import REFERENCE
from tests.official_files import randomise_frozen_bn, save_like_official
from tests.reference_modules import official
from updetr.checkpoint import load_checkpoint
from updetr.cli import main
from updetr.config import load_config
from updetr.tasks import build_model

TOL = 1e-5  # of max(1, max |official output|): the default path's rounding, measured ~1e-6
# The same tiny architecture in the official command-line spelling (tests/models/conftest.TINY).
TINY_ARGS = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1",
             "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "20", "--device", "cpu"]
PRETRAIN_KEYS = ("pred_logits", "pred_boxes", "pred_feature", "gt_feature")
DETECT_KEYS = ("pred_logits", "pred_boxes")


def _randomise_frozen_bn(model: torch.nn.Module, seed: int = 3) -> None:
    randomise_frozen_bn(model, torch.Generator().manual_seed(seed))


def _save_like_official(model: torch.nn.Module, args: argparse.Namespace, path, epoch: int) -> None:
    """The official training loops' optimizer (AdamW, backbone param group) and StepLR, saved as they save."""
    groups = [
        {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": args.lr_backbone},
    ]
    save_like_official(model, groups, args, path, epoch)


@pytest.fixture(scope="module")
def official_pretrain(tmp_path_factory):
    """(official UP-DETR in eval mode, its checkpoint file) as `up:main.py` builds and saves it for the
    README command (--pre_norm --feature_recon --fre_cnn), with M=4."""
    torch.manual_seed(0)
    with official("up-detr") as load:
        args = load("main").get_args_parser().parse_args(
            TINY_ARGS + ["--num_patches", "4", "--pre_norm", "--feature_recon", "--fre_cnn"])
        # What up:main.py main() sets before building (its L109-112).
        args.dataset_file, args.masks = "ImageNet", None
        args.lr_backbone = 0 if args.fre_cnn else args.lr
        model = load("models").build_model(args)[0]
    _randomise_frozen_bn(model)
    src = tmp_path_factory.mktemp("official") / "checkpoint0039.pth"
    _save_like_official(model, args, src, epoch=39)
    return model.eval(), src


def _convert(tmp_path, src, capsys) -> tuple[dict, str]:
    """`updetr checkpoint convert SRC OUT` through the CLI -> (OUT loaded by `load_checkpoint`, what it printed)."""
    dst = tmp_path / "converted.pt"
    assert main(["checkpoint", "convert", str(src), str(dst)]) == 0
    printed = capsys.readouterr().out
    ckpt = load_checkpoint(dst)  # weights_only=True and the schema check
    # lossless: every tensor of the official model, bit for bit, nothing else (SRC is this test's own file)
    official_sd = torch.load(src, map_location="cpu", weights_only=False)["model"]
    assert ckpt["model"].keys() == official_sd.keys()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in official_sd.items())
    return ckpt, printed


def _strict(cfg, ckpt) -> torch.nn.Module:
    model = build_model(cfg)[0]
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval()


def _images(seed: int = 1) -> list[torch.Tensor]:
    """Two images of different sizes: the batch is padded and the masks matter."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 96, 128, generator=g), torch.randn(3, 112, 100, generator=g)]


def _patches(num: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.randn(2, num, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _layers(out: dict) -> list[dict]:
    return [out] + out["aux_outputs"]  # last decoder layer + the aux (intermediate) one


def _assert_same(got: dict, want: dict, keys, exact: bool = False) -> float:
    """Every `keys` tensor of every decoder layer equal (exact) or within TOL of its scale; -> max |diff|."""
    assert len(got["aux_outputs"]) == len(want["aux_outputs"]) == 1
    worst = 0.0
    for g, w in zip(_layers(got), _layers(want)):
        for k in keys:
            assert g[k].shape == w[k].shape, k
            if exact:
                assert torch.equal(g[k], w[k]), k
            diff = (g[k] - w[k]).abs().max().item()
            assert diff <= TOL * max(1.0, w[k].abs().max().item()), (k, diff)
            worst = max(worst, diff)
    return worst


def test_official_updetr_pretraining_checkpoint_converts_loads_and_matches(official_pretrain, tmp_path, capsys):
    ref, src = official_pretrain
    ckpt, printed = _convert(tmp_path, src, capsys)
    assert "169 tensors, UP-DETR pre-training model, pre-norm transformer" in printed
    assert ckpt["source"] == "official" and ckpt["epoch"] == 40  # the next epoch, as official --resume
    assert ckpt["official_args"]["num_patches"] == 4 and ckpt["official_args"]["pre_norm"] is True

    # official args -> config: --pre_norm -> model.pre_norm, --num_patches -> pretext.num_patches,
    # --feature_recon -> pretext.feature_recon (default on); group mask on and query shuffle off by default
    fast = _strict(tiny_cfg("model.pre_norm=true"), ckpt)
    reference = _strict(tiny_cfg("model.pre_norm=true", *REFERENCE), ckpt)
    with torch.no_grad():
        want = ref(_images(), _patches())
        # eval with fewer patches than M: the first 3*N/M queries and the matching block of the group mask
        want3 = ref(_images(), _patches(3))
        assert want["pred_logits"].shape == (2, 20, 3) and want["pred_feature"].shape == (2, 20, 512)
        assert want3["pred_boxes"].shape == (2, 15, 4)
        _assert_same(reference(_images(), _patches()), want, PRETRAIN_KEYS, exact=True)
        _assert_same(fast(_images(), _patches()), want, PRETRAIN_KEYS)
        _assert_same(fast(_images(), _patches(3)), want3, PRETRAIN_KEYS)


def test_official_updetr_args_alone_rebuild_the_model(official_pretrain, tmp_path, capsys):
    """A converted file carries no updetr config; its `official_args` rebuild the model (what `updetr
    visualize` does with it): strict load, same outputs."""
    from updetr.visualize import load_pretrain_model

    ref, src = official_pretrain
    _convert(tmp_path, src, capsys)
    ours = load_pretrain_model(tmp_path / "converted.pt")[0]  # strict load inside; eval mode
    assert (ours.num_patches, ours.num_queries, ours.feature_recon) == (4, 20, True)
    with torch.no_grad():
        _assert_same(ours(_images(), _patches()), ref(_images(), _patches()), PRETRAIN_KEYS)


def test_official_detr_detection_checkpoint_converts_loads_and_matches(tmp_path, capsys):
    """A DETR checkpoint as `up:detr_main.py` trains it by default: COCO (91 classes), post-norm."""
    torch.manual_seed(0)
    with official("up-detr") as load:
        args = load("detr_main").get_args_parser().parse_args(TINY_ARGS)
        assert args.dataset_file == "coco" and not args.pre_norm and args.lr_backbone > 0
        ref = load("models").build_model(args)[0]
    _randomise_frozen_bn(ref)
    src = tmp_path / "checkpoint.pth"
    _save_like_official(ref, args, src, epoch=149)
    ref.eval()

    ckpt, printed = _convert(tmp_path, src, capsys)
    assert "DETR / fine-tuned model, post-norm transformer" in printed
    finetune = TINY + ["stage=finetune", "data.source=coco", "data.path=/nonexistent", "model.num_classes=91",
                       "model.pre_norm=false"]
    fast = _strict(load_config(None, finetune), ckpt)
    reference = _strict(load_config(None, finetune + REFERENCE), ckpt)
    with torch.no_grad():
        want = ref(_images())
        assert want["pred_logits"].shape == (2, 20, 92)
        _assert_same(reference(_images()), want, DETECT_KEYS, exact=True)
        _assert_same(fast(_images()), want, DETECT_KEYS)
