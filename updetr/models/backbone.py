"""ResNet backbone with frozen BatchNorm, optional local weights, and the Joiner that adds position encodings."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck

from updetr.models import mask_prefetch
from updetr.models.position_encoding import build_position_encoding
from updetr.util.nested_tensor import NestedTensor, to_nested_tensor
from updetr.util.safe_load import safe_torch_load

log = logging.getLogger(__name__)

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _out_channels(layer: nn.Sequential) -> int:
    """Output channels of a torchvision ResNet layer: its last block's last convolution."""
    block = layer[-1]
    return (block.conv3 if isinstance(block, Bottleneck) else block.conv2).out_channels


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


def _oneDNN(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _fold_key(conv: nn.Conv2d, bn: FrozenBatchNorm2d, channels_last: bool) -> tuple:
    """What the folded weights of (conv, bn) depend on: any in-place change of a weight or BN statistic
    (load_state_dict, an optimizer step) bumps a version counter, a move to another device a data pointer."""
    ts = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    ts += [conv.bias] if conv.bias is not None else []
    return (channels_last,) + tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in ts)


def fold_conv_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d, channels_last: bool,
                 cache: bool = False) -> tuple[Tensor, Tensor]:
    """(weight `[O, I, k, k]`, bias `[O]`) of the convolution equal to `bn(conv(x))`.

    bn(y) = y * s + (b - m * s) with s = w / sqrt(v + eps) (the same `scale` FrozenBatchNorm2d computes), so
    conv(x, W) * s + t = conv(x, W * s) + t. The weight comes channels-last when `channels_last`.
    `cache`: keep the result on the conv module (not a parameter or buffer: the state dict keeps the official
    keys) and reuse it while no weight or statistic has changed (`_fold_key`). Only for a frozen CNN: it
    saves the fold (a pass over all weights, twice per pre-training step) and costs one folded copy of the
    CNN's weights (~94 MB for ResNet-50). Without it the folded weights are built per call, and under
    autograd the gradient reaches `conv.weight` through the product, so trainable convs fold too.
    """
    key = _fold_key(conv, bn, channels_last) if cache else None
    hit = conv.__dict__.get("_updetr_folded")
    if cache and hit is not None and hit[0] == key:
        return hit[1], hit[2]
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    if cache:
        conv.__dict__["_updetr_folded"] = (key, weight, shift)
    elif hit is not None:
        del conv.__dict__["_updetr_folded"]  # the CNN trains now: a stale copy would only hold memory
    return weight, shift


def folded_conv_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d, relu: bool = False,
                   residual: Optional[Tensor] = None, cache: bool = False, fuse: bool = False) -> Tensor:
    """`bn(conv(x))`, then `+ residual` and ReLU when given (ReLU alone when `relu`), as one convolution.

    fp32 results differ from conv-then-BN by rounding only (~1e-6 relative). On CPU every conv runs on
    oneDNN: F.conv2d's heuristic sends 1x1 convs of batches < 16 to PyTorch's native kernel when running on
    one thread (the image branch's 33 1x1 convs in ResNet-50), which is ~2x slower and, on channels-last
    input, copies it to NCHW first. With `fuse` (no autograd and a finite input; `folded_resnet_forward`
    decides) the ReLU and the residual sum are oneDNN post-ops of the convolution (no extra passes over the
    activations; the sum is written into `residual`); otherwise the differentiable `mkldnn_convolution`,
    then the sum and ReLU as separate ops.
    """
    weight, shift = fold_conv_bn(conv, bn, x.is_contiguous(memory_format=torch.channels_last), cache)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if fuse:
        if residual is not None:
            torch.ops.mkldnn._convolution_pointwise_(residual, x, weight, shift, *args, "add", 1.0, "relu", [], "")
            return residual
        return torch.ops.mkldnn._convolution_pointwise(x, weight, shift, *args, "relu" if relu else "none", [], "")
    if _oneDNN(x):
        y = torch.ops.aten.mkldnn_convolution(x, weight, shift, *args)
    else:
        y = F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        y += residual
        relu = True
    return F.relu(y, inplace=True) if relu else y


def _folded_block(block: nn.Module, x: Tensor, cache: bool, fuse: bool) -> Tensor:
    """torchvision's BasicBlock / Bottleneck forward with every conv+FrozenBN pair folded.
    The sum may be written into x itself (no downsample): x is then the previous block's output, used by
    nothing else (a layer's collected output always enters a block with a downsample, which makes a copy)."""
    out = folded_conv_bn(x, block.conv1, block.bn1, relu=True, cache=cache, fuse=fuse)
    last_conv, last_bn = block.conv2, block.bn2
    if isinstance(block, Bottleneck):
        out = folded_conv_bn(out, block.conv2, block.bn2, relu=True, cache=cache, fuse=fuse)
        last_conv, last_bn = block.conv3, block.bn3
    identity = x if block.downsample is None else folded_conv_bn(x, block.downsample[0], block.downsample[1],
                                                                 cache=cache, fuse=fuse)
    return folded_conv_bn(out, last_conv, last_bn, residual=identity, cache=cache, fuse=fuse)


def folded_resnet_forward(body: nn.Module, x: Tensor, all_layers: bool = False, cache: bool = False):
    """`body(x)['0']` (ResNet stem + layer1-4) with FrozenBatchNorm folded into the convolutions.

    `x [B, 3, H, W]` -> `[B, Cb, H/32, W/32]`; keeps x's memory format (channels-last in, channels-last out).
    `all_layers`: the list of layer1..layer4 outputs (strides 4, 8, 16, 32) instead. `cache`: keep the
    folded weights between calls (`fold_conv_bn`; frozen CNN only).
    """
    # oneDNN post-ops need no autograd, and a finite input: their ReLU maps NaN to 0 where PyTorch's keeps
    # it, and a NaN image must reach the outputs (the engine stops on non-finite predictions).
    fuse = _oneDNN(x) and not torch.is_grad_enabled() and bool(torch.isfinite(x).all())
    x = folded_conv_bn(x, body.conv1, body.bn1, relu=True, cache=cache, fuse=fuse)
    x = body.maxpool(x)
    outs = []
    for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
        for block in layer:
            mask_prefetch.poll()  # all threads back once a step's dropout masks are drawn
            x = _folded_block(block, x, cache, fuse)
        outs.append(x)
    return outs if all_layers else x


def _foldable(body: nn.Module) -> bool:
    """True when the body is the torchvision ResNet layout `folded_resnet_forward` walks, FrozenBN throughout."""
    names = [n for n, _ in body.named_children()]
    if names != ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]:
        return False
    blocks = [b for layer in (body.layer1, body.layer2, body.layer3, body.layer4) for b in layer]
    norms = [m for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    return (all(isinstance(b, (BasicBlock, Bottleneck)) for b in blocks)
            and all(isinstance(m, FrozenBatchNorm2d) for m in norms))


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
    # Data only (no pickle code runs); refusals raise UnsafeWeightsError naming the field, file and global.
    obj = safe_torch_load(path, map_location="cpu", what="model.backbone_weights")
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

    Speed-ups (run time only; parameters, buffers and state-dict keys are the official ones):
    `fold_bn` folds each FrozenBatchNorm2d into the convolution before it (`folded_conv_bn`), and
    `channels_last` runs the CNN in NHWC, the layout oneDNN / cuDNN convolutions prefer. The output map is
    returned contiguous (NCHW) either way, so everything after the CNN sees the same layout. Both off = the
    official arithmetic (conv, then `x * scale + bias`).
    """

    # A run-time switch (`updetr.models.set_switches`): `compile_model` turns it off, because the folded
    # path's weight cache, oneDNN post-ops and finite-input check are eager-only (graph breaks, guards on
    # data pointers and Python flags, a recompile per layer shape); inductor fuses the BN itself.
    fold_bn = False

    def __init__(self, name: str, train_backbone: bool, dilation: bool = False,
                 weights: Optional[Union[str, Path]] = None, fold_bn: bool = False,
                 channels_last: bool = False, return_interm_layers: bool = False,
                 layers: Optional[Sequence[str]] = None):
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
        # DETR's masks path also returns layer1-3 (keys "0".."3", strides 4..32) for the mask head's FPN;
        # Deformable DETR's levels are `layers` = layer2-4 (keys "0".."2", strides 8..32). The state-dict keys
        # are the same either way.
        if layers is None:
            layers = ("layer1", "layer2", "layer3", "layer4") if return_interm_layers else ("layer4",)
        unknown = [n for n in layers if n not in RESNET_LAYERS]
        if unknown or list(layers) != sorted(set(layers)):
            raise ValueError(f"backbone layers must be distinct, ordered names out of {RESNET_LAYERS}, got {layers}")
        self.layers = tuple(layers)
        self.body = IntermediateLayerGetter(resnet, return_layers={n: str(i) for i, n in enumerate(self.layers)})
        self.return_interm_layers = return_interm_layers
        self.num_channels = RESNET_CHANNELS[name]
        # channels of each returned map (the last block's output width of its layer)
        self.layer_channels = [_out_channels(getattr(resnet, n)) for n in self.layers]
        self.fold_bn = fold_bn
        self.channels_last = channels_last
        if fold_bn and not _foldable(self.body):
            raise ValueError(f"fold_bn: backbone '{name}' is not a plain torchvision ResNet with FrozenBatchNorm2d")

    def freeze(self) -> None:
        """Freeze every parameter (forward then runs without autograd)."""
        for p in self.body.parameters():
            p.requires_grad_(False)

    def feature_size(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) of the last feature map for an `[B, 3, h, w]` input: every convolution and the max-pool
        of the main path, in order (strides, padding, dilation included)."""
        body = self.body
        ops = [body.conv1, body.maxpool]
        for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
            for block in layer:
                ops += [m for m in (getattr(block, f"conv{i}", None) for i in (1, 2, 3)) if m is not None]
        size = (h, w)
        for m in ops:  # a max-pool holds ints, a conv pairs: _pair reads both
            k, s, p, d = (_pair(getattr(m, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
            size = tuple((n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate(size))
        return size

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.body.parameters())

    def _body(self, x: Tensor) -> dict[str, Tensor]:
        if not (self.fold_bn or self.channels_last):
            return self.body(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.fold_bn:
            # A frozen CNN keeps its folded weights between calls (images and patches, every step).
            outs = folded_resnet_forward(self.body, x, all_layers=True, cache=self.frozen)
            outs = [outs[RESNET_LAYERS.index(n)] for n in self.layers]
            return {str(i): o.contiguous() for i, o in enumerate(outs)}
        # Weights follow the input's layout per call; the module's own tensors stay as loaded.
        return {k: o.contiguous() for k, o in self.body(x).items()}

    def forward(self, x: Union[NestedTensor, Tensor]) -> Union[dict[str, NestedTensor], dict[str, Tensor]]:
        """NestedTensor -> {'0': NestedTensor([B, Cb, H/32, W/32], mask)}; Tensor `[B,3,H,W]` -> {'0': map}."""
        tensors = x.tensors if isinstance(x, NestedTensor) else x
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            xs = self._body(tensors)
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
                   dilation: bool = False, weights: Optional[Union[str, Path]] = None, fold_bn: bool = False,
                   channels_last: bool = False, return_interm_layers: bool = False) -> Joiner:
    """Backbone + position encoding joined; `.num_channels` is 512 (r18/34) or 2048 (r50/101).
    `return_interm_layers`: the Joiner returns layer1..layer4 maps (and their encodings), the last one last."""
    body = Backbone(name, train_backbone, dilation, weights, fold_bn=fold_bn, channels_last=channels_last,
                    return_interm_layers=return_interm_layers)
    return Joiner(body, build_position_encoding(position_embedding, hidden_dim))
