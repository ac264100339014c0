"""Box format conversions, IoU and generalized IoU (same op order as DETR's util/box_ops.py)."""
from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """`[..., 4]` (cx, cy, w, h) -> `[..., 4]` (x0, y0, x1, y1)."""
    x_c, y_c, w, h = x.unbind(-1)
    b = [(x_c - 0.5 * w), (y_c - 0.5 * h), (x_c + 0.5 * w), (y_c + 0.5 * h)]
    return torch.stack(b, dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """`[..., 4]` (x0, y0, x1, y1) -> `[..., 4]` (cx, cy, w, h)."""
    x0, y0, x1, y1 = x.unbind(-1)
    b = [(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0), (y1 - y0)]
    return torch.stack(b, dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """`[K, 4]` xyxy -> `[K]` areas."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes `[N, 4]` x `[M, 4]` -> (iou `[N, M]`, union `[N, M]`)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)

    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]

    union = area1[:, None] + area2 - inter
    iou = inter / union
    return iou, union


def _check_boxes(boxes: Tensor, name: str) -> None:
    bad = ~(boxes[:, 2:] >= boxes[:, :2]).all(dim=1)
    if bad.any():
        # DETR asserts here; NaN predictions (e.g. after a diverged step) are the usual cause.
        idx = int(bad.nonzero()[0])
        raise ValueError(
            f"generalized_box_iou: {int(bad.sum())} degenerate box(es) in {name} (need x1>=x0 and y1>=y0; "
            f"NaN also fails), first at row {idx}: {boxes[idx].tolist()}")


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, check: bool = True) -> Tensor:
    """Pairwise generalized IoU (https://giou.stanford.edu/) of xyxy boxes -> `[N, M]`.

    Raises ValueError on degenerate boxes (x1 < x0, y1 < y0 or NaN), which would give inf/NaN. `check=False`
    skips that test (each is a read on the host) for boxes already checked, e.g. matched ones.
    """
    if check:
        _check_boxes(boxes1, "boxes1")
        _check_boxes(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)

    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)  # [N, M, 2]
    area = wh[:, :, 0] * wh[:, :, 1]

    return iou - (area - union) / area
