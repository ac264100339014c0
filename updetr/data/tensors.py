"""uint8 records -> torch tensors: ToTensor + ImageNet Normalize, and the target dict of the batch contract."""
from __future__ import annotations

import warnings

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def u8_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy uint8 tensor of a (possibly read-only, e.g. Arrow-backed) array; callers never write it."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.from_numpy(a)
    return torch.from_numpy(a)


# ToTensor + Normalize folded into one multiply-add: (x / 255 - mean) / std = x * SCALE + OFFSET.
# Within 1e-6 of torchvision's two-step result, and 4x faster on a patch stack (fewer passes, no temporaries).
_SCALE = 1.0 / (255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float64))
_OFFSET = -torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / torch.tensor(IMAGENET_STD, dtype=torch.float64)
SCALE, OFFSET = _SCALE.float(), _OFFSET.float()


def normalize_into(out: torch.Tensor, u8_hwc: np.ndarray) -> torch.Tensor:
    """Write normalised uint8 `[H, W, 3]` into a float `[3, H, W]` view (e.g. the unpadded part of a batch)."""
    out.copy_(u8_tensor(u8_hwc).permute(2, 0, 1))
    return out.mul_(SCALE.view(3, 1, 1)).add_(OFFSET.view(3, 1, 1))


def normalize_image(u8_hwc: np.ndarray) -> torch.Tensor:
    """uint8 `[H, W, 3]` -> float32 `[3, H, W]`, ToTensor + ImageNet Normalize."""
    h, w = int(u8_hwc.shape[0]), int(u8_hwc.shape[1])
    return normalize_into(torch.empty(3, h, w), u8_hwc)


def normalize_patches(u8_mhwc: np.ndarray) -> torch.Tensor:
    """uint8 `[M, P, P, 3]` -> float32 `[M, 3, P, P]` (contiguous), normalised like `normalize_image`."""
    m, ph, pw = (int(v) for v in u8_mhwc.shape[:3])
    out = torch.empty(m, 3, ph, pw)
    out.copy_(u8_tensor(u8_mhwc).permute(0, 3, 1, 2))
    return out.mul_(SCALE.view(1, 3, 1, 1)).add_(OFFSET.view(1, 3, 1, 1))


def record_target(rec: dict) -> dict:
    """Target dict of the batch contract for one record (labels all 1 = 'patch')."""
    boxes = torch.from_numpy(np.asarray(rec["boxes"], dtype=np.float32).copy())
    return {
        "labels": torch.ones(boxes.shape[0], dtype=torch.int64),
        "boxes": boxes,
        "image_id": torch.tensor(int(rec["image_id"]), dtype=torch.int64),
        "orig_size": torch.as_tensor(np.asarray(rec["orig_size"], dtype=np.int64)),
        "size": torch.as_tensor(np.asarray(rec["size"], dtype=np.int64)),
    }
