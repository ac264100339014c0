"""The multi-scale deformable attention core and module: float64 gradcheck, an explicit bilinear loop in the
official CUDA kernel's convention, the official PyTorch core, and the module's offsets, padding and init."""
from __future__ import annotations

import math

import pytest
import torch

from tests.models.deformable.official import official_deformable
from updetr.models.deformable import MSDeformAttn, ms_deform_attn_core

SHAPES = torch.tensor([[6, 4], [3, 2]])  # the official ops/test.py levels (H, W)


def sample_inputs(dtype=torch.float64, n=2, heads=2, d=3, lq=4, points=2, seed=3):
    """Random value / locations / weights; about a fifth of the locations fall outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    s = int(SHAPES.prod(1).sum())
    levels = SHAPES.shape[0]
    value = torch.rand(n, s, heads, d, generator=g, dtype=dtype)
    locations = torch.rand(n, lq, heads, levels, points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(n, lq, heads, levels, points, generator=g, dtype=dtype) + 1e-5
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, locations, weights


def bilinear_loop(value, shapes, locations, weights):
    """The CUDA kernel's arithmetic one sample at a time: pixel = loc * size - 0.5; the four neighbours,
    each read as zero when outside the map."""
    n, _, heads, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    starts = [0] + torch.cumsum(shapes.prod(1), 0).tolist()[:-1]
    out = torch.zeros(n, lq, heads, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for m in range(heads):
                for lvl in range(levels):
                    h, w = shapes[lvl].tolist()
                    for p in range(points):
                        x = float(locations[b, q, m, lvl, p, 0]) * w - 0.5
                        y = float(locations[b, q, m, lvl, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(d, dtype=value.dtype)
                        for yy, xx, f in ((y0, x0, (y0 + 1 - y) * (x0 + 1 - x)), (y0, x0 + 1, (y0 + 1 - y) * (x - x0)),
                                          (y0 + 1, x0, (y - y0) * (x0 + 1 - x)), (y0 + 1, x0 + 1, (y - y0) * (x - x0))):
                            if 0 <= yy < h and 0 <= xx < w:
                                acc += f * value[b, starts[lvl] + yy * w + xx, m]
                        out[b, q, m] += weights[b, q, m, lvl, p] * acc
    return out.flatten(2)


def test_core_matches_an_explicit_bilinear_loop_in_the_cuda_convention():
    value, locations, weights = sample_inputs()
    assert ((locations < 0) | (locations > 1)).any()  # out-of-range samples are exercised
    got = ms_deform_attn_core(value, SHAPES, locations, weights)
    assert got.shape == (2, 4, 6)
    assert (got - bilinear_loop(value, SHAPES, locations, weights)).abs().max() < 1e-12


def test_core_gradcheck_float64():
    value, locations, weights = sample_inputs(n=1, lq=2)
    args = tuple(t.clone().requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_core(v, SHAPES, loc, w), args,
                                    eps=1e-6, atol=1e-5)


def test_core_equals_the_official_pytorch_core():
    value, locations, weights = sample_inputs()
    with official_deformable() as dd:
        expected = dd.core(value, SHAPES, locations, weights)
    assert torch.equal(ms_deform_attn_core(value, SHAPES, locations, weights), expected)


def test_initial_offsets_and_uniform_weights():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 2, 4, 2)
    assert torch.equal(bias[0, 0], torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]]))  # head 0: along +x
    assert torch.allclose(bias[1, 0, 0], torch.tensor([1.0, 1.0]))                     # head 1: the diagonal
    assert torch.equal(bias[:, 0], bias[:, 1])                                          # alike on every level
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    assert not attn.attention_weights.bias.any()                                        # uniform softmax


def test_point_offsets_are_pixels_of_each_level_divided_by_w_then_h():
    """An offset (dx, dy) in pixels moves a point reference by (dx / W, dy / H) on a non-square level (the
    division by (H, W) of the first release is the bug fixed in Deformable-DETR PR #7)."""
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=1, n_points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 2.0]))
    query = torch.zeros(1, 1, 8)
    shapes = torch.tensor([[4, 8]])                                                      # H 4, W 8
    loc = attn.sampling_locations(query, torch.full((1, 1, 1, 2), 0.5), shapes)
    assert torch.allclose(loc.flatten(), torch.tensor([0.5 + 1 / 8, 0.5 + 2 / 4]))
    box = torch.tensor([0.5, 0.5, 0.4, 0.2]).view(1, 1, 1, 4)                           # box references
    loc = attn.sampling_locations(query, box, shapes)
    assert torch.allclose(loc.flatten(), torch.tensor([0.5 + 1.0 * 0.4 * 0.5, 0.5 + 2.0 * 0.2 * 0.5]))


def test_padded_values_are_never_read():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 1.0)
    s = int(SHAPES.prod(1).sum())
    value, query = torch.randn(1, s, 8), torch.randn(1, 5, 8)
    refs = torch.rand(1, 5, 2, 2)
    pad = torch.zeros(1, s, dtype=torch.bool)
    pad[0, ::3] = True
    changed = value.clone()
    changed[pad] = 100.0
    a = attn(query, refs, value, SHAPES, pad)
    assert torch.equal(a, attn(query, refs, changed, SHAPES, pad))
    assert not torch.equal(a, attn(query, refs, changed, SHAPES))


@pytest.mark.parametrize("bad", [3, 5])
def test_reference_points_need_2_or_4_coordinates(bad):
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=1)
    with pytest.raises(ValueError, match="2 .points. or 4"):
        attn(torch.zeros(1, 1, 8), torch.zeros(1, 1, 2, bad), torch.zeros(1, 30, 8), SHAPES)
