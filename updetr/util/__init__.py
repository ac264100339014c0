"""Small shared utilities: box geometry and the padded-batch container."""
from updetr.util.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                 generalized_box_iou)
from updetr.util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list, to_nested_tensor

__all__ = [
    "box_area", "box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh", "generalized_box_iou",
    "NestedTensor", "nested_tensor_from_tensor_list", "to_nested_tensor",
]
