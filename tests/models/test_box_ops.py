"""Box conversions, IoU and generalized IoU."""
import pytest
import torch

from updetr.util.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                 generalized_box_iou)


def test_round_trips():
    boxes = torch.rand(10, 4)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-6)
    xyxy = box_cxcywh_to_xyxy(boxes)
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-6)
    # batched leading dims work too
    b3 = torch.rand(2, 5, 4)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b3)), b3, atol=1e-6)


def test_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 4.0, 5.0, 5.0]])
    assert box_area(b).tolist() == [4.0, 1.0]
    iou, union = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 5.0]]))
    giou = generalized_box_iou(a, b)
    # enclosing boxes: 3x3=9 and 5x5=25
    assert torch.allclose(giou, torch.tensor([[1 / 7 - (9 - 7) / 9, 0 - (25 - 5) / 25]]))
    assert torch.allclose(generalized_box_iou(a, a), torch.ones(1, 1))


def test_giou_range_and_symmetry():
    b1 = box_cxcywh_to_xyxy(torch.rand(7, 4))
    b2 = box_cxcywh_to_xyxy(torch.rand(5, 4))
    g = generalized_box_iou(b1, b2)
    assert g.shape == (7, 5)
    assert (g <= 1).all() and (g >= -1).all()
    assert torch.allclose(g, generalized_box_iou(b2, b1).T)


def test_giou_degenerate_raises():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.5, 0.0, 0.2, 1.0]])
    with pytest.raises(ValueError, match="degenerate"):
        generalized_box_iou(bad, good)
    with pytest.raises(ValueError, match="boxes2"):
        generalized_box_iou(good, torch.tensor([[float("nan"), 0.0, 1.0, 1.0]]))


def test_giou_empty():
    assert generalized_box_iou(torch.zeros(0, 4), torch.rand(3, 4).sort(-1)[0]).shape == (0, 3)
