"""NestedTensor padding and the input-form helper."""
import pytest
import torch

from updetr.util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list, to_nested_tensor


def test_padding_bottom_right():
    a, b = torch.rand(3, 4, 5), torch.rand(3, 6, 2)
    nt = nested_tensor_from_tensor_list([a, b])
    t, m = nt.decompose()
    assert t.shape == (2, 3, 6, 5) and m.shape == (2, 6, 5) and m.dtype == torch.bool
    assert torch.equal(t[0, :, :4, :5], a) and (t[0, :, 4:] == 0).all()
    assert not m[0, :4, :5].any() and m[0, 4:].all()
    assert torch.equal(t[1, :, :6, :2], b) and m[1, :, 2:].all() and not m[1, :, :2].any()


def test_to_nested_tensor_forms():
    x = torch.rand(2, 3, 8, 8)
    nt = to_nested_tensor(x)
    assert nt.tensors is x and not nt.mask.any()
    assert to_nested_tensor(nt) is nt
    assert to_nested_tensor([x[0], x[1]]).tensors.shape == x.shape
    moved = nt.to("cpu")
    assert isinstance(moved, NestedTensor) and moved.mask.shape == (2, 8, 8)
    with pytest.raises(ValueError):
        to_nested_tensor(torch.rand(3, 8, 8))
    with pytest.raises(TypeError):
        to_nested_tensor("image")
