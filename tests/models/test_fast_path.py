"""The default (fast) path computes what the reference path computes: the official arithmetic, op for op.

Reference path = every speed-up off (`runtime.fold_frozen_bn=false runtime.channels_last=false
runtime.fused_adamw=false runtime.onednn_linear=false runtime.bool_dropout_masks=false runtime.compile=false`).
The two must agree to 1e-5 relative (tensor norm of the difference over the norm of the reference) in outputs, losses, gradients and the
stepped weights, for pre-training (frozen CNN) and detection (layers 2-4 of the CNN train).
"""
from __future__ import annotations

import pytest
import torch

from tests.models.conftest import make_targets, tiny_cfg, tiny_finetune_cfg
from updetr.engine import Trainer, train_step
from updetr.engine_setup import build_optimizer
from updetr.models import FrozenBatchNorm2d
from updetr.tasks import build_model
from updetr.models.backbone import Backbone
from updetr.models.dropout import dropout
from updetr.models.onednn import Linear, MultiheadAttention
from updetr.util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

REFERENCE = ["runtime.fold_frozen_bn=false", "runtime.channels_last=false", "runtime.fused_adamw=false",
             "runtime.onednn_linear=false", "runtime.bool_dropout_masks=false",
             "runtime.prefetch_dropout_masks=false", "runtime.compile=false"]
RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def _randomise_frozen_bn(model: torch.nn.Module, seed: int = 3) -> None:
    """Non-trivial BN statistics (fresh init has scale ~1, shift 0, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _pair(cfg_fn, *overrides):
    """(fast, reference) model bundles holding identical weights."""
    torch.manual_seed(0)
    fast = build_model(cfg_fn(*overrides))
    _randomise_frozen_bn(fast[0])
    ref = build_model(cfg_fn(*overrides, *REFERENCE))
    ref[0].load_state_dict(fast[0].state_dict(), strict=True)
    return fast, ref


def _batch(pretrain: bool, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randn(3, 96, 128, generator=g), torch.randn(3, 112, 100, generator=g)]
    nt = nested_tensor_from_tensor_list(imgs)
    batch = {"images": nt.tensors, "mask": nt.mask, "targets": make_targets(2, 4 if pretrain else 3, seed=seed)}
    if pretrain:
        batch["patches"] = torch.randn(2, 4, 3, 64, 64, generator=g)
    return batch


def _run(bundle, batch: dict, seed: int = 11):
    """One forward + loss + backward under a fixed RNG seed (same dropout masks for both paths)."""
    model, criterion, _ = bundle
    model.train()
    torch.manual_seed(seed)
    samples = NestedTensor(batch["images"], batch["mask"])
    out = model(samples, batch["patches"]) if "patches" in batch else model(samples)
    losses = criterion(out, batch["targets"])
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    model.zero_grad(set_to_none=True)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, losses, grads


def _flat_outputs(out: dict) -> dict[str, torch.Tensor]:
    flat = {k: v for k, v in out.items() if torch.is_tensor(v)}
    for i, aux in enumerate(out.get("aux_outputs", [])):
        flat.update({f"{k}_{i}": v for k, v in aux.items()})
    return flat


def _assert_close(fast, ref) -> None:
    (fo, fl, fg), (ro, rl, rg) = fast, ref
    fo, ro = _flat_outputs(fo), _flat_outputs(ro)
    assert fo.keys() == ro.keys()
    for k in ro:
        assert rel(fo[k], ro[k]) <= RTOL, f"output {k}: rel diff {rel(fo[k], ro[k]):.2e}"
    assert fl.keys() == rl.keys()
    for k in rl:
        assert rel(fl[k], rl[k]) <= RTOL, f"loss {k}: {fl[k].item()} vs {rl[k].item()}"
    assert fg.keys() == rg.keys() and rg
    for k in rg:
        assert rel(fg[k], rg[k]) <= RTOL, f"grad {k}: rel diff {rel(fg[k], rg[k]):.2e}"


@pytest.mark.parametrize("name,channels_last,threads", [("resnet18", False, None), ("resnet18", True, None),
                                                        ("resnet50", True, None), ("resnet50", True, 1)])
def test_folded_backbone_matches_conv_then_frozen_bn(name, channels_last, threads):
    """At one thread the reference runs the 1x1 convs of a small batch on PyTorch's native kernel and the
    fold on oneDNN: still the same numbers up to fp32 rounding."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        _check_fold(name, channels_last)
    finally:
        torch.set_num_threads(before)


def _check_fold(name, channels_last):
    torch.manual_seed(0)
    ref = Backbone(name, train_backbone=False)
    _randomise_frozen_bn(ref)
    fast = Backbone(name, train_backbone=False, fold_bn=True, channels_last=channels_last)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        a, b = fast(x)["0"], ref(x)["0"]
    assert a.is_contiguous() and a.shape == b.shape
    assert rel(a, b) <= RTOL
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_frozen_cnn_reuses_folded_weights_until_they_change():
    """A frozen CNN keeps its folded weights between calls; loading other weights or statistics (in place)
    must be seen at the next call, not served from the old fold."""
    torch.manual_seed(0)
    ref = Backbone("resnet18", train_backbone=False)
    fast = Backbone("resnet18", train_backbone=False, fold_bn=True, channels_last=True)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        first = fast(x)["0"]
        assert "_updetr_folded" in fast.body.conv1.__dict__  # the fold is kept
        _randomise_frozen_bn(ref, seed=9)
        with torch.no_grad():
            ref.body.layer3[0].conv1.weight.mul_(-1.5)
        fast.load_state_dict(ref.state_dict(), strict=True)
        a, b = fast(x)["0"], ref(x)["0"]
    assert rel(a, b) <= RTOL and rel(first, b) > 1e-2


def test_frozen_fast_cnn_propagates_nan_like_the_reference():
    """oneDNN's fused ReLU maps NaN to 0; a non-finite input therefore takes the unfused path, so a NaN
    image still reaches the outputs (the engine stops on non-finite predictions)."""
    torch.manual_seed(0)
    ref = Backbone("resnet18", train_backbone=False)
    fast = Backbone("resnet18", train_backbone=False, fold_bn=True, channels_last=True)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 80)
    x[1, 0, 5, 7] = float("nan")
    with torch.no_grad():
        a, b = fast(x)["0"], ref(x)["0"]
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.isnan(a[1]).any() and not torch.isnan(a[0]).any()


def test_fast_path_is_the_default_and_keeps_official_keys():
    fast, ref = _pair(tiny_cfg)
    bb = fast[0].backbone[0]
    assert bb.fold_bn and bb.channels_last
    assert not ref[0].backbone[0].fold_bn and not ref[0].backbone[0].channels_last
    assert list(fast[0].state_dict()) == list(ref[0].state_dict())
    assert any(k.endswith("bn1.running_var") for k in fast[0].state_dict())
    onednn = [m for m in fast[0].modules() if isinstance(m, (Linear, MultiheadAttention))]
    assert onednn and all(m.onednn for m in onednn)  # every linear layer and attention of the model
    assert not any(m.onednn for m in ref[0].modules() if isinstance(m, (Linear, MultiheadAttention)))
    masks = [m for m in fast[0].modules() if hasattr(type(m), "bool_mask")]
    assert masks and all(m.bool_mask for m in masks) and not any(m.bool_mask for m in ref[0].modules()
                                                                 if hasattr(type(m), "bool_mask"))


@pytest.mark.parametrize("key_padding,attn_mask", [(False, None), (True, None), (True, "bool"), (False, "float")])
def test_onednn_attention_matches_torch_attention(key_padding, attn_mask):
    """Our attention with projections on oneDNN = torch's module from the same weights and seed: outputs,
    averaged weights and every gradient, with dropout on (same masks) and each kind of mask UP-DETR passes."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, dropout=0.1)
    fast = MultiheadAttention(32, 4, dropout=0.1)
    fast.load_state_dict(ref.state_dict(), strict=True)
    fast.onednn = fast.bool_mask = True
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, 3, 32, generator=g) for n in (7, 11, 11))
    kpm = torch.rand(3, 11, generator=g) < 0.3 if key_padding else None
    mask = {None: None, "bool": torch.rand(7, 11, generator=g) < 0.2,
            "float": torch.randn(7, 11, generator=g)}[attn_mask]
    results = []
    for m in (fast, ref):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)
        out, w = m(xs[0], xs[1], xs[2], key_padding_mask=kpm, attn_mask=mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, w] + [x.grad for x in xs] + [p.grad for p in m.parameters()])
        m.zero_grad()
    for a, b in zip(*results):
        assert rel(a, b) <= RTOL


@pytest.mark.parametrize("transposed", [False, True])
def test_bool_mask_dropout_is_bit_identical_to_torch_dropout(transposed):
    """Same seed: the same mask, bit-identical outputs and gradients (also for a transposed input, whose mask
    must be drawn in memory order as torch does), and a bool tensor is what autograd keeps."""
    x = torch.randn(64, 48, dtype=torch.float32)
    x[0, :5] = torch.tensor([0.0, -0.0, -1.5, float("inf"), 3.0])
    x = x.t() if transposed else x
    outs = []
    for bool_mask in (True, False):
        xi = x.detach().clone().requires_grad_()
        torch.manual_seed(3)
        y = dropout(xi, 0.1, True, bool_mask)
        y.backward(torch.linspace(-2, 2, y.numel()).view_as(y))
        outs.append((y.detach(), xi.grad))
    for a, b in zip(*outs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit for bit, signed zeros and NaN included
    torch.manual_seed(3)
    y = dropout(x.detach().clone().requires_grad_(), 0.1, True, True)
    assert y.grad_fn.saved_tensors[0].dtype == torch.bool


@pytest.mark.parametrize("shuffle", [False, True])
def test_dropout_mask_prefetch_is_bit_identical_and_restores_threads(shuffle, monkeypatch):
    """Masks drawn in a thread while the CNN runs = masks drawn in place: bit-identical outputs, losses and
    gradients over two steps (query shuffle and patch dropout draw first), every planned mask used, and the
    intra-op thread count back where it was."""
    from updetr.models import mask_prefetch

    taken = []
    orig_exit = mask_prefetch.MaskPrefetch.__exit__

    def counting_exit(self, *exc):
        taken.append((self.taken, len(self.plan)))
        return orig_exit(self, *exc)

    monkeypatch.setattr(mask_prefetch.MaskPrefetch, "__exit__", counting_exit)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        extra = [f"pretext.query_shuffle={str(shuffle).lower()}", "pretext.patch_dropout=0.2"]
        on = build_model(tiny_cfg(*extra))
        off = build_model(tiny_cfg(*extra, "runtime.prefetch_dropout_masks=false"))
        off[0].load_state_dict(on[0].state_dict(), strict=True)
        for seed in (11, 12):
            batch = _batch(pretrain=True, seed=seed)
            (fo, fl, fg), (ro, rl, rg) = _run(on, batch, seed), _run(off, batch, seed)
            for a, b in [(fo[k], ro[k]) for k in ro if torch.is_tensor(ro[k])] + [(fl[k], rl[k]) for k in rl] + \
                        [(fg[k], rg[k]) for k in rg]:
                assert torch.equal(a, b)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(taken) == 2 and all(t == n and n > 0 for t, n in taken)  # the prefetch ran, every mask used


def test_dropout_mask_plan_out_of_step_is_an_error():
    from updetr.models.mask_prefetch import MaskPrefetch

    with pytest.raises(RuntimeError, match="out of step"):
        with MaskPrefetch([((4, 3), 0.1)]) as prefetch:
            prefetch.take(torch.zeros(3, 4), 0.1)
    with pytest.raises(RuntimeError, match="1 masks drawn, 0 used"):
        with MaskPrefetch([((4, 3), 0.1)]):
            pass


def test_onednn_linear_is_the_cpu_path_and_falls_back_elsewhere():
    """On CPU fp32 the oneDNN kernel runs (checked by profiling); in bf16 autocast torch's own linear does."""
    lin = Linear(16, 8)
    lin.onednn = True
    x = torch.randn(5, 4, 16, requires_grad=True)
    with torch.profiler.profile() as prof:
        y = lin(x)
        y.sum().backward()
    names = {e.name for e in prof.events()}
    assert "mkldnn::_linear_pointwise" in names and "aten::addmm" not in names
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert y.shape == (5, 4, 8) and rel(y, ref) <= RTOL
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        lin(x)
    assert "mkldnn::_linear_pointwise" not in {e.name for e in prof.events()}


def test_pretrain_fast_path_matches_reference():
    fast, ref = _pair(tiny_cfg)
    batch = _batch(pretrain=True)
    _assert_close(_run(fast, batch), _run(ref, batch))


def test_detection_fast_path_matches_reference_with_trainable_backbone():
    # pre-norm, as this parity was established (post-norm: 1.4e-5 on one gradient on AVX2 kernels)
    fast, ref = _pair(tiny_finetune_cfg, "model.freeze_backbone=false", "optim.lr_backbone=1e-5", "model.pre_norm=true")
    assert not fast[0].backbone[0].frozen
    batch = _batch(pretrain=False)
    f, r = _run(fast, batch), _run(ref, batch)
    _assert_close(f, r)
    # The fold is differentiated through: trainable conv weights get the same gradients.
    assert any(k.startswith("backbone.0.body.layer2") for k in r[2])


def test_train_step_and_fused_adamw_match_reference_weights():
    """Two full steps (forward, loss, backward, clip, AdamW) leave the same weights on both paths."""
    fast, ref = _pair(tiny_cfg, "runtime.fused_adamw=true")
    cpu = torch.device("cpu")
    t_fast = Trainer(tiny_cfg("runtime.fused_adamw=true"), cpu, model_bundle=fast)
    t_ref = Trainer(tiny_cfg(*REFERENCE), cpu, model_bundle=ref)
    assert t_fast.optimizer.defaults.get("fused") and not t_ref.optimizer.defaults.get("fused")
    for step in range(2):
        batch = _batch(pretrain=True, seed=20 + step)
        metrics = []
        for t in (t_fast, t_ref):
            torch.manual_seed(100 + step)
            metrics.append(train_step(t.model, t.criterion, batch, t.optimizer, device=cpu))
        for k in metrics[1]:
            assert abs(metrics[0][k] - metrics[1][k]) <= RTOL * max(abs(metrics[1][k]), 1e-8), k
    sd_f, sd_r = t_fast.model.state_dict(), t_ref.model.state_dict()
    lr = t_ref.optimizer.param_groups[0]["lr"]
    for k in sd_r:
        if not sd_r[k].is_floating_point():
            continue
        f, r = sd_f[k], sd_r[k]
        if k.endswith("in_proj_bias"):
            # The key bias cancels in the softmax: its true gradient is 0 and both paths hold only rounding
            # noise there, which AdamW's g / sqrt(v) scales up to a full +-lr step. Compare q and v biases.
            # These start at 0, so after two steps they hold only AdamW's updates, and a q-bias entry whose
            # gradient is near 0 is rounding-dominated the same way (AVX2 kernels: 1.9e-8 on entries of
            # ~1e-7 beside others of 2e-4, 1.3e-5 of the norm): bound them per entry by a small share of
            # one AdamW step instead of relative to the tensor.
            d = r.numel() // 3
            f, r = torch.cat([f[:d], f[2 * d:]]), torch.cat([r[:d], r[2 * d:]])
            assert (f - r).abs().max().item() <= 1e-3 * lr, k
            continue
        assert rel(f, r) <= RTOL, k


def test_fused_adamw_is_the_cpu_default_and_off_on_the_reference_path():
    model = build_model(tiny_cfg())[0]
    assert not build_optimizer(model, tiny_cfg().optim).defaults.get("fused")
    assert Trainer(tiny_cfg(), torch.device("cpu")).optimizer.defaults.get("fused")
    assert not Trainer(tiny_cfg(*REFERENCE), torch.device("cpu")).optimizer.defaults.get("fused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fast_defaults_step_and_match_reference():
    """CUDA defaults (channels-last, fused AdamW, torch.compile) stay within 1e-5 of the fp32 reference path
    on losses; bf16 autocast (an option) steps with finite losses."""
    cuda = torch.device("cuda")
    fast, ref = _pair(tiny_cfg)
    t_fast = Trainer(tiny_cfg(), cuda, model_bundle=fast)
    t_ref = Trainer(tiny_cfg(*REFERENCE), cuda, model_bundle=ref)
    assert t_fast.optimizer.defaults.get("fused") and t_fast.train_model is not t_fast.model
    batch = _batch(pretrain=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = []
    for t in (t_fast, t_ref):
        torch.manual_seed(7)
        out.append(train_step(t.train_model, t.criterion, batch, t.optimizer, device=cuda))
    for k in out[1]:  # inductor fuses and reorders fp32 sums: 1e-4, not the CPU path's 1e-5
        assert abs(out[0][k] - out[1][k]) <= 1e-4 * max(abs(out[1][k]), 1e-6), k
    t_bf16 = Trainer(tiny_cfg("runtime.precision=bf16"), cuda)
    m = train_step(t_bf16.train_model, t_bf16.criterion, batch, t_bf16.optimizer, device=cuda, precision="bf16")
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
