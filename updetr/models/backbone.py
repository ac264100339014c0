"""ResNet backbone with frozen BatchNorm, optional local weights, and the Joiner that adds position encodings."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from updetr.models.position_encoding import build_position_encoding
from updetr.util.nested_tensor import NestedTensor, to_nested_tensor

log = logging.getLogger(__name__)

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers (no gradients).

    Buffers: weight, bias, running_mean, running_var (no num_batches_tracked: it is dropped on load, as in
    DETR, so torchvision / SwAV state dicts load cleanly). eps = 1e-5.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        # Reshapes up front and scale/bias folded in DETR's order (keeps fp32 parity with the official code).
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@dataclass
class WeightLoadReport:
    """What `load_backbone_weights` did: file, keys loaded, and the keys that did not match."""

    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"backbone weights {self.path}: {self.loaded} tensors loaded, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.dropped)} dropped (fc.*)")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled non-tensor objects (e.g. argparse.Namespace in training checkpoints)
        log.warning("weights_only load of %s failed (%s); retrying with weights_only=False (trusted local file)",
                    path, type(e).__name__)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    # Unwrap the usual containers: {'state_dict': ...} (SwAV / Lightning) or {'model': ...} (DETR-style).
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"backbone weights {path}: expected a state_dict (mapping), got {type(obj).__name__}")
    return obj


def load_backbone_weights(resnet: nn.Module, path: Union[str, Path]) -> WeightLoadReport:
    """Load a local torchvision / SwAV / DETR state_dict into a torchvision ResNet (strict=False).

    Strips `module.`, `_orig_mod.` and `backbone.0.body.` prefixes, drops `fc.*`, and raises when the file is
    missing or when not a single tensor matched (a wrong file would otherwise leave random weights silently).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights: no such file: {path}")
    raw = _read_state_dict(path)
    sd: dict[str, Tensor] = {}
    dropped = []
    for k, v in raw.items():
        for prefix in ("module.", "_orig_mod.", "backbone.0.body."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("fc."):
            dropped.append(k)
            continue
        sd[k] = v
    own = resnet.state_dict()
    shape_bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if shape_bad:
        raise ValueError(f"backbone weights {path}: shape mismatch for {len(shape_bad)} tensors, e.g. "
                         f"{shape_bad[0]}: file {tuple(sd[shape_bad[0]].shape)} vs model "
                         f"{tuple(own[shape_bad[0]].shape)} (wrong ResNet depth?)")
    result = resnet.load_state_dict(sd, strict=False)
    loaded = len([k for k in sd if k in own])
    # fc is not part of the body (IntermediateLayerGetter stops at layer4), so it is never "missing".
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    report = WeightLoadReport(str(path), loaded, missing, list(result.unexpected_keys), dropped)
    if loaded == 0:
        raise ValueError(f"backbone weights {path}: no tensor matched the ResNet's names "
                         f"(first keys in file: {list(raw)[:5]})")
    log.info(report.summary())
    if report.missing:
        log.warning("backbone weights: missing keys (kept random init): %s", report.missing[:20])
    if report.unexpected:
        log.warning("backbone weights: unexpected keys (ignored): %s", report.unexpected[:20])
    return report


class Backbone(nn.Module):
    """torchvision ResNet body (layer4 only, via IntermediateLayerGetter as `body`) with FrozenBatchNorm2d.

    `train_backbone=False` freezes every parameter; otherwise DETR's rule: only layer2-4 train. When no body
    parameter requires grad the forward runs under `torch.no_grad()` so it records no autograd graph.
    """

    def __init__(self, name: str, train_backbone: bool, dilation: bool = False,
                 weights: Optional[Union[str, Path]] = None):
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unknown backbone '{name}' (expected one of {sorted(RESNET_CHANNELS)})")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), not {name}")
        # weights=None: random init; nothing is ever downloaded.
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d)
        self.load_report: Optional[WeightLoadReport] = None
        if weights is not None:
            self.load_report = load_backbone_weights(resnet, weights)
        for pname, p in resnet.named_parameters():
            if not train_backbone or ("layer2" not in pname and "layer3" not in pname and "layer4" not in pname):
                p.requires_grad_(False)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        self.num_channels = RESNET_CHANNELS[name]

    def freeze(self) -> None:
        """Freeze every parameter (forward then runs without autograd)."""
        for p in self.body.parameters():
            p.requires_grad_(False)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.body.parameters())

    def forward(self, x: Union[NestedTensor, Tensor]) -> Union[dict[str, NestedTensor], dict[str, Tensor]]:
        """NestedTensor -> {'0': NestedTensor([B, Cb, H/32, W/32], mask)}; Tensor `[B,3,H,W]` -> {'0': map}."""
        tensors = x.tensors if isinstance(x, NestedTensor) else x
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            xs = self.body(tensors)
        if not isinstance(x, NestedTensor):
            return xs
        out: dict[str, NestedTensor] = {}
        for name, feat in xs.items():
            m = x.mask
            assert m is not None
            mask = F.interpolate(m[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(feat, mask)
        return out


class Joiner(nn.Sequential):
    """`Sequential(backbone, position_embedding)`, so CNN keys are `backbone.0.body.*` as in DETR.

    NestedTensor in -> (list of NestedTensor feature maps, list of position encodings `[B, C, h, w]`).
    Plain Tensor in (query patches) -> list of feature maps only: no mask, no position encoding.
    """

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, samples):  # type: ignore[override]
        if isinstance(samples, Tensor):
            return list(self[0](samples).values())
        samples = to_nested_tensor(samples)
        xs = self[0](samples)
        out: list[NestedTensor] = []
        pos: list[Tensor] = []
        for _, x in xs.items():
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos


def build_backbone(name: str, hidden_dim: int, position_embedding: str = "sine", train_backbone: bool = False,
                   dilation: bool = False, weights: Optional[Union[str, Path]] = None) -> Joiner:
    """Backbone + position encoding joined; `.num_channels` is 512 (r18/34) or 2048 (r50/101)."""
    body = Backbone(name, train_backbone, dilation, weights)
    return Joiner(body, build_position_encoding(position_embedding, hidden_dim))
