"""Per-process set-up of the training engine: device, distributed rank, seeds and RNG state, autocast,
frozen heads, the optimizer and torch.compile. Pure PyTorch, like `updetr/engine.py`, which uses them."""
from __future__ import annotations

import random
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from updetr.config import ExperimentConfig, OptimConfig


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but no CUDA device is available")
    return torch.device(name)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_process(seed: int, rank: int = 0) -> None:
    """Seed torch (CPU and CUDA), numpy and `random` with `seed + rank`, as the reference main.py does, so
    that dropout, patch dropout and query shuffles differ between ranks. Data draws do not use these
    generators (they are seeded per sample), so they stay identical for any number of ranks."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    random.seed(seed + rank)


def rng_state() -> dict:
    """This process's torch RNG state: `{"torch": ByteTensor, "cuda": [ByteTensor per device]}`."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CUDA; fp32 everywhere else (bf16 on CPU is refused: slow and not the paper's)."""
    if precision == "fp32":
        return nullcontext()
    if device.type != "cuda":
        raise RuntimeError("runtime.precision=bf16 needs a CUDA device; use runtime.precision=fp32 on CPU")
    return torch.autocast("cuda", dtype=torch.bfloat16)


def freeze_heads_without_loss(model: nn.Module, cfg: ExperimentConfig) -> list[str]:
    """Freeze each output head whose every loss weighs 0 (it would get no gradient); returns their names.

    `class_embed` trains only through loss_ce (the matcher's class cost takes no gradient), `bbox_embed`
    through loss_bbox / loss_giou, `feature_align` through loss_feature. A frozen head stays in the model,
    so state_dicts keep the official keys and load strictly; it is left out of the optimizer, and under DDP
    every trainable parameter then gets a gradient on every step.
    """
    loss = cfg.loss
    off = {"class_embed": loss.ce == 0, "bbox_embed": loss.bbox == 0 and loss.giou == 0,
           "feature_align": loss.feature == 0}
    frozen = []
    for name, is_off in off.items():
        head = getattr(model, name, None)
        if is_off and isinstance(head, nn.Module):
            head.requires_grad_(False)
            frozen.append(name)
    return frozen


# Deformable DETR's sampling-offset and reference-point projections train at lr * optim.lr_linear_proj_mult
# (the official `lr_linear_proj_names`); DETR has no such parameters, so its optimizer keeps two groups.
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def build_optimizer(model: nn.Module, optim: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with the official groups: transformer + heads at `lr`, trainable backbone params at
    `lr_backbone`, and (Deformable DETR) the `LINEAR_PROJ_NAMES` projections at `lr * lr_linear_proj_mult`.

    Frozen parameters (requires_grad False) are left out, so a frozen backbone has no optimizer state; an
    empty group is left out too. `fused`: one fused kernel for every parameter (same update rule;
    rounding-level differences only).
    """
    main, backbone, linear_proj = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if "backbone" in name:
                backbone.append(p)
            elif any(k in name for k in LINEAR_PROJ_NAMES):
                linear_proj.append(p)
            else:
                main.append(p)
    groups = [{"params": main, "lr": optim.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": optim.lr_backbone})
    if linear_proj:
        groups.append({"params": linear_proj, "lr": optim.lr * optim.lr_linear_proj_mult})
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay, **extra)


def use_fused_adamw(cfg: ExperimentConfig, device: torch.device) -> bool:
    """`runtime.fused_adamw`, where None means on (CUDA and CPU: on CPU the fused kernel is ~3x faster than
    the per-tensor loop, ~20 ms of a paper-shape step at one thread)."""
    flag = cfg.runtime.fused_adamw
    return True if flag is None else flag


def use_compile(cfg: ExperimentConfig, device: torch.device) -> bool:
    """`runtime.compile`, where None means: on for CUDA, off on CPU."""
    flag = cfg.runtime.compile
    return device.type == "cuda" if flag is None else flag


def set_tf32(flag: Optional[bool], device: torch.device) -> None:
    """`runtime.tf32` on a CUDA device: None leaves PyTorch's defaults (cuDNN convolutions in TF32, matmuls
    in fp32, as the official code runs); True / False sets both. Nothing on CPU."""
    if device.type != "cuda" or flag is None:
        return
    torch.backends.cuda.matmul.allow_tf32 = flag
    torch.backends.cudnn.allow_tf32 = flag


def _to_terminal(handler) -> bool:
    """A handler that writes to stderr / stdout: torch's own `_StderrHandler` (not a StreamHandler) or a
    StreamHandler that is not a file."""
    import logging

    if type(handler).__name__ == "_StderrHandler":
        return True
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def route_torch_logs(path: Path) -> None:
    """Send torch's own log lines (dynamo / inductor notes and warnings) to `path` instead of the terminal,
    which keeps the run's own progress lines. Inductor's note that TF32 is off is dropped: `runtime.tf32` is
    the documented switch for it."""
    import logging
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)  # not the structured-trace DEBUG records that also reach "torch"
    handler.updetr_torch_log = True  # an earlier stage's file is swapped like a terminal
    # torch gives its own terminal handler to "torch" and to each of its registered logs (torch._dynamo,
    # torch._inductor, ...), which do not propagate: each is swapped for the file
    names = ["torch"] + [n for n in logging.root.manager.loggerDict if n.startswith("torch.")]
    for logger in (logging.getLogger(n) for n in names):
        swapped = [h for h in logger.handlers if getattr(h, "updetr_torch_log", False) or _to_terminal(h)]
        for h in swapped:
            logger.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()
        if swapped or logger.name == "torch":
            logger.addHandler(handler)
    warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores.*")


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """`torch.compile` for training; the uncompiled module keeps the state dict and its keys.

    The model's eager-only speed-ups are switched off first (they would break the graph, and each break
    guards on shapes and Python flags, so a run of multi-scale images hit the recompile limit): the oneDNN
    linear, the bool-mask dropout and its prefetch, and the BN fold (inductor fuses FrozenBN into the
    convolution's epilogue). No graph break is left in the forward of DETR, UP-DETR or Deformable DETR, and
    image sizes are dynamic after the second one: a whole run compiles twice (`tests/core/test_compile.py`).
    Dropout keeps eager's random-number generator (`fallback_random`): inductor's own generator would draw
    other masks than the reference path for the same seed. `backend`: "eager" traces without code
    generation (what the recompile test counts).
    """
    import torch._inductor.config as inductor_config

    from updetr.models import set_switches

    inductor_config.fallback_random = True
    set_switches(model, onednn=False, bool_mask=False, prefetch_masks=False, fold_bn=False)
    return torch.compile(model, backend=backend)


def move_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets]
