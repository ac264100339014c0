"""The official Deformable DETR (../shared/reference/deformable-detr), built at test time on CPU.

The official code has no CPU path and needs a compiled CUDA extension, so it is imported with the shims of
deformable-notes §2.4: a dummy `MultiScaleDeformableAttention` module; the global `MSDeformAttnFunction` of
`models.ops.modules.ms_deform_attn` rebound to the official pure-PyTorch core `ms_deform_attn_core_pytorch`
(autograd through grid_sample); `torchvision.__version__` raised while `util.misc` is imported (its
version check reads "0.29" as 0.2 and imports a removed op); `models.backbone.is_main_process` returning False
(no weight download); and `tqdm` stubbed when absent (only the official dataset cache uses it). Everything else
is the official code as released.
"""
from __future__ import annotations

import argparse
import sys
import types
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
import torchvision

from tests.official_files import randomise_frozen_bn
from tests.reference_modules import REFERENCE, official

ROOT = REFERENCE / "deformable-detr"
_STUBS = ("MultiScaleDeformableAttention", "tqdm")


@contextmanager
def official_deformable() -> Iterator[types.SimpleNamespace]:
    """`with official_deformable() as dd:` -> `dd.models`, `dd.main`, `dd.misc`, `dd.core`, `dd.args(...)`;
    skips when the reference code is absent."""
    if not ROOT.is_dir():
        pytest.skip(f"official Deformable DETR not found at {ROOT}")
    stubbed = []
    for name in _STUBS:
        if name == "tqdm":
            try:
                import tqdm  # noqa: F401
                continue
            except ImportError:
                pass
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    try:
        with official("deformable-detr") as load:
            version = torchvision.__version__
            torchvision.__version__ = "0.99"
            try:
                misc = load("util.misc")
            finally:
                torchvision.__version__ = version
            func = load("models.ops.functions.ms_deform_attn_func")
            attn = load("models.ops.modules.ms_deform_attn")

            class _PyTorchCore:
                @staticmethod
                def apply(value, shapes, level_start_index, locations, weights, im2col_step):
                    return func.ms_deform_attn_core_pytorch(value, shapes, locations, weights)

            attn.MSDeformAttnFunction = _PyTorchCore
            backbone = load("models.backbone")
            backbone.is_main_process = lambda: False
            models = load("models")
            main = load("main")

            def args(*argv: str) -> argparse.Namespace:
                return main.get_args_parser().parse_args(list(argv) + ["--device", "cpu"])

            yield types.SimpleNamespace(models=models, main=main, misc=misc, core=func.ms_deform_attn_core_pytorch,
                                        deformable=load("models.deformable_detr"), args=args)
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)


def randomise(model: torch.nn.Module, seed: int = 7, scale: float = 0.05) -> None:
    """Move every parameter and FrozenBN statistic away from its initial value: fresh heads start at zero
    (box head, sampling-offset weights, attention weights) and FrozenBN at identity, which would hide a
    wrong formula behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a module shared by several layers is visited once
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    randomise_frozen_bn(model, g)


def official_param_groups(model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """dd:main.py L188-203's optimizer groups, chosen by parameter name: the rest at `lr`, the CNN
    (`lr_backbone_names`) at `lr_backbone`, `lr_linear_proj_names` at `lr * lr_linear_proj_mult`."""
    def match(name, keys):
        return any(k in name for k in keys)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not match(n, args.lr_backbone_names)
                        and not match(n, args.lr_linear_proj_names)], "lr": args.lr},
            {"params": [p for n, p in named if match(n, args.lr_backbone_names)], "lr": args.lr_backbone},
            {"params": [p for n, p in named if match(n, args.lr_linear_proj_names)],
             "lr": args.lr * args.lr_linear_proj_mult}]
