"""One checkpoint schema, atomic writes, safe loads, and the converter for official UP-DETR / DETR files.

Schema (a plain dict of tensors and primitives, so `torch.load(weights_only=True)` reads it):

    format: "updetr-checkpoint", version: 1,
    model: state_dict, optimizer: state_dict | None, lr_scheduler: state_dict | None,
    step: int, epoch: int, step_in_epoch: int,
    config: resolved experiment config as a nested dict | None, git_sha: str | None,
    rng: {"torch": ByteTensor (rank 0), "per_rank": [{"torch": ByteTensor, "cuda": [ByteTensor]}]} | None,
    epoch_tally: [{"sums", "steps", "skipped"} per rank] (running sums of the current epoch; engine),
    source: "updetr" | "official"
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from updetr.provenance import git_sha  # noqa: F401 - re-exported: checkpoints record the same SHA as tracking
from updetr.util.safe_load import UnsafeWeightsError, safe_torch_load

FORMAT = "updetr-checkpoint"
VERSION = 1
# Keys that belong only to the pre-training heads; fine-tuning starts without them (the official
# detr_main.py drops class_embed and ignores patch2query / feature_align, issue dddzg/up-detr#31).
PRETRAIN_ONLY_PREFIXES = ("class_embed.", "patch2query.", "feature_align.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that asks to run code while it loads: refused, and never taken for a damaged one."""


def make_checkpoint(model_state: dict, *, optimizer: dict | None = None, lr_scheduler: dict | None = None,
                    step: int = 0, epoch: int = 0, step_in_epoch: int = 0, config: dict | None = None,
                    rng: dict | None = None, source: str = "updetr", sha: str | None = None) -> dict:
    """Assemble a checkpoint dict in the one schema."""
    return {"format": FORMAT, "version": VERSION, "model": model_state, "optimizer": optimizer,
            "lr_scheduler": lr_scheduler, "step": int(step), "epoch": int(epoch),
            "step_in_epoch": int(step_in_epoch), "config": config, "git_sha": sha, "rng": rng,
            "source": source}


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous checkpoint intact (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one of our checkpoints safely (`weights_only=True`) and check its schema."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = safe_torch_load(path, map_location=map_location)
    except UnsafeWeightsError as e:
        raise UnsafeCheckpointError(str(e)) from None
    except Exception as e:  # the unpickler's errors are many types; all mean "not loadable safely"
        if is_updetr_file(path):  # ours, so damaged (cut short, overwritten): converting cannot help
            raise CheckpointError(f"{path}: updetr checkpoint is damaged and cannot be loaded "
                                  f"({type(e).__name__}: {str(e).split('. ')[0][:200]})") from None
        raise CheckpointError(
            f"{path}: cannot be loaded with weights_only=True ({type(e).__name__}: {str(e)[:200]}). "
            "If this is an official UP-DETR/DETR file, convert it first: "
            "updetr checkpoint convert IN OUT") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an updetr checkpoint (missing format={FORMAT!r}); "
                              "convert official files with: updetr checkpoint convert IN OUT")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                              f"(this updetr reads version {VERSION})")
    return ckpt


def is_updetr_file(path: str | Path, scan_bytes: int = 1 << 20) -> bool:
    """Whether the file carries updetr's metadata: torch writes the pickled dict (with `format`) first,
    uncompressed, so its start holds the marker even when the tensors after it are cut off."""
    try:
        with open(path, "rb") as f:
            return FORMAT.encode() in f.read(scan_bytes)
    except OSError:
        return False


def strip_prefixes(state_dict: dict[str, Any], prefixes=("module.", "_orig_mod.")) -> dict[str, Any]:
    """Remove wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) from every key."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def pretrain_to_finetune(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Pre-training weights -> fine-tuning initialisation.

    Drops `class_embed.*` (2+1 logits, re-initialised for the dataset's classes), `patch2query.*` and
    `feature_align.*` (pre-training only); keeps backbone, input_proj, transformer, query_embed and
    bbox_embed, as the official `detr_main.py --pretrain` does.
    """
    return {k: v for k, v in strip_prefixes(state_dict).items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}


def _plain(value: Any) -> Any:
    """Reduce an official `args` value to YAML/weights_only-safe primitives."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def convert_official(src: str | Path, dst: str | Path) -> dict:
    """Convert an official UP-DETR / DETR / Deformable DETR checkpoint into our schema.

    The official files pickle an `argparse.Namespace` under 'args'; it is the one global the safe loader
    allows (updetr/util/safe_load.py), so official files load with `weights_only=True` like everything
    else, and a file that asks for any other global is refused without running it. Only tensors and
    primitives go out.

    Returns a short report: number of keys, whether pre-training heads are present, the official args.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    try:
        raw = safe_torch_load(src, map_location="cpu")
    except UnsafeWeightsError as e:
        raise UnsafeCheckpointError(str(e)) from None
    except Exception as e:
        raise CheckpointError(f"{src}: cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(raw, dict) and "model" in raw:
        model_sd = raw["model"]
    elif isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values()):
        model_sd = raw  # a bare state_dict
    else:
        raise CheckpointError(f"{src}: expected a dict with a 'model' state_dict (official format)")
    model_sd = {k: v for k, v in strip_prefixes(model_sd).items() if isinstance(v, torch.Tensor)}
    args = raw.get("args") if isinstance(raw, dict) else None
    official_args = {k: _plain(v) for k, v in vars(args).items()} if args is not None and hasattr(args, "__dict__") else None
    ckpt = make_checkpoint(model_sd, epoch=int(raw.get("epoch", -1)) + 1 if isinstance(raw, dict) and "epoch" in raw else 0,
                           config=None, source="official")
    ckpt["official_args"] = official_args
    save_checkpoint(ckpt, dst)
    return {"keys": len(model_sd), "pretrain_heads": any(k.startswith("patch2query.") for k in model_sd),
            "pre_norm": any(k.startswith("transformer.encoder.norm.") for k in model_sd),
            "official_args": official_args, **official_detector(model_sd)}


def official_detector(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Which detector a state dict holds, read from its keys: `detector` detr | deformable_detr, and for
    Deformable DETR its variant (`with_box_refine`: per-layer box heads registered in the decoder;
    `two_stage`: the encoder's proposal head)."""
    if not any(".sampling_offsets." in k for k in state_dict):
        return {"detector": "detr"}
    return {"detector": "deformable_detr",
            "with_box_refine": any(k.startswith("transformer.decoder.bbox_embed.") for k in state_dict),
            "two_stage": "transformer.enc_output.weight" in state_dict}


def weights_pre_norm(path: str | Path) -> Optional[bool]:
    """The transformer norm of a checkpoint's weights (a pre-norm encoder has a final `encoder.norm`); None
    when the file cannot be read (the caller's own load reports why) or holds no transformer."""
    try:
        sd = load_checkpoint(path).get("model") or {}
    except CheckpointError:
        return None
    if not any(k.startswith("transformer.encoder.") for k in sd):
        return None
    return any(k.startswith("transformer.encoder.norm.") for k in sd)
