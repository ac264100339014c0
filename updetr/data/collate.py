"""Batch collation: pad images to the batch max with a padding mask, stack patches (CONTRACTS.md batch dict)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from updetr.data.tensors import normalize_into, normalize_patches, record_target


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of float `[3, H_i, W_i]` -> (`[B, 3, H, W]` zero-padded bottom/right, bool mask `[B, H, W]`
    True on padding). B = 0 gives `[0, 3, 0, 0]` and `[0, 0, 0]`."""
    if not images:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.bool)
    hm = max(int(t.shape[1]) for t in images)
    wm = max(int(t.shape[2]) for t in images)
    out = torch.zeros(len(images), images[0].shape[0], hm, wm, dtype=images[0].dtype)
    mask = torch.ones(len(images), hm, wm, dtype=torch.bool)
    for i, t in enumerate(images):
        out[i, :, : t.shape[1], : t.shape[2]].copy_(t)
        mask[i, : t.shape[1], : t.shape[2]] = False
    return out, mask


def pad_u8_images(images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of uint8 `[H_i, W_i, 3]` -> normalised float `[B, 3, H, W]` (zero on padding) + mask `[B, H, W]`.

    Normalisation is ToTensor + ImageNet Normalize with torchvision's op order, done once per batch
    directly into the padded buffer (the padding stays exactly 0, as DETR's NestedTensor)."""
    if not len(images):
        return pad_images([])
    hm = max(int(a.shape[0]) for a in images)
    wm = max(int(a.shape[1]) for a in images)
    out = torch.zeros(len(images), 3, hm, wm)
    mask = torch.ones(len(images), hm, wm, dtype=torch.bool)
    for i, a in enumerate(images):
        h, w = int(a.shape[0]), int(a.shape[1])
        normalize_into(out[i, :, :h, :w], a)
        mask[i, :h, :w] = False
    return out, mask


def collate_records(records: Sequence[dict], skipped: Optional[dict] = None, num_patches: int = 0,
                    patch_size: int = 0) -> dict:
    """Pre-training records (`updetr.data.pretext` module docstring) -> the batch dict of CONTRACTS.md:
    images float32 `[B, 3, H, W]`, mask bool `[B, H, W]`, patches float32 `[B, M, 3, P, P]`,
    targets list of B dicts, skipped dict. `num_patches`/`patch_size` only shape an empty (B = 0) batch."""
    images, mask = pad_u8_images([r["image"] for r in records])
    if records:
        stacked = np.stack([np.asarray(r["patches"]) for r in records])  # [B, M, P, P, 3] uint8
        b, m, ph, pw = stacked.shape[:4]
        patches = normalize_patches(stacked.reshape(b * m, ph, pw, 3)).view(b, m, 3, ph, pw)
    else:
        patches = torch.zeros(0, num_patches, 3, patch_size, patch_size)
    return {"images": images, "mask": mask, "patches": patches,
            "targets": [record_target(r) for r in records], "skipped": dict(skipped or {})}


def collate_detection(samples: Sequence[tuple[torch.Tensor, dict]], skipped: Optional[dict] = None) -> dict:
    """Detection samples (float image `[3, H, W]` normalised, target dict) -> batch dict without patches."""
    images, mask = pad_images([s[0] for s in samples])
    return {"images": images, "mask": mask, "targets": [s[1] for s in samples], "skipped": dict(skipped or {})}
