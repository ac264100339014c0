"""`NestedTensor`: a zero-padded image batch plus its padding mask (True = padding)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor


class NestedTensor:
    """Padded batch `tensors [B, C, H, W]` with `mask [B, H, W]` bool (True on padding), or mask None."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        tensors = self.tensors.to(device, non_blocking=non_blocking)
        mask = self.mask.to(device, non_blocking=non_blocking) if self.mask is not None else None
        return NestedTensor(tensors, mask)

    def decompose(self) -> tuple[Tensor, Optional[Tensor]]:
        return self.tensors, self.mask

    @property
    def shape(self) -> torch.Size:
        return self.tensors.shape

    def __repr__(self) -> str:
        mask = None if self.mask is None else tuple(self.mask.shape)
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={mask})"


def nested_tensor_from_tensor_list(tensor_list: Sequence[Tensor]) -> NestedTensor:
    """List of `[C, H_i, W_i]` images -> NestedTensor zero-padded bottom/right to the max (C, H, W)."""
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: empty list")
    if any(t.ndim != 3 for t in tensor_list):
        raise ValueError(f"expected 3-D [C, H, W] tensors, got shapes {[tuple(t.shape) for t in tensor_list]}")
    max_size = [max(s) for s in zip(*[t.shape for t in tensor_list])]
    b = len(tensor_list)
    c, h, w = max_size
    first = tensor_list[0]
    tensor = torch.zeros((b, c, h, w), dtype=first.dtype, device=first.device)
    mask = torch.ones((b, h, w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, tensor, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensor, mask)


def to_nested_tensor(samples: Union[NestedTensor, Tensor, Sequence[Tensor]]) -> NestedTensor:
    """NestedTensor (returned as is), 4-D `[B, C, H, W]` tensor (no padding) or list of `[C, H, W]`."""
    if isinstance(samples, NestedTensor):
        return samples
    if isinstance(samples, Tensor):
        if samples.ndim != 4:
            raise ValueError(f"expected a 4-D [B, C, H, W] tensor, got shape {tuple(samples.shape)}")
        # DETR goes through nested_tensor_from_tensor_list here; for equal-sized images that is an all-False mask.
        mask = torch.zeros(samples.shape[0], samples.shape[2], samples.shape[3], dtype=torch.bool,
                           device=samples.device)
        return NestedTensor(samples, mask)
    if isinstance(samples, (list, tuple)):
        return nested_tensor_from_tensor_list(list(samples))
    raise TypeError(f"expected NestedTensor, Tensor or list of Tensors, got {type(samples).__name__}")
