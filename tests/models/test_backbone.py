"""Backbone: FrozenBatchNorm2d, local weight loading, freezing rule, position encodings."""
import math

import pytest
import torch
import torchvision

from updetr.models.backbone import Backbone, FrozenBatchNorm2d, build_backbone
from updetr.models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from updetr.util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list


def test_frozen_bn_matches_eval_batchnorm_and_drops_num_batches_tracked():
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    fbn = FrozenBatchNorm2d(4)
    fbn.load_state_dict(bn.state_dict())  # has num_batches_tracked
    assert set(fbn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert not list(fbn.parameters())
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(fbn(x), bn(x), atol=1e-5)


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet34", 512)])
def test_num_channels_and_stride(name, channels):
    bb = Backbone(name, train_backbone=False)
    assert bb.num_channels == channels
    out = bb(torch.randn(1, 3, 64, 96))
    assert out["0"].shape == (1, channels, 2, 3)


def test_dilation_rejected_for_basic_block():
    with pytest.raises(ValueError, match="dilation"):
        Backbone("resnet18", False, dilation=True)


def _write_torchvision_sd(tmp_path, wrap=None, prefix=""):
    ref = torchvision.models.resnet18(weights=None)  # BatchNorm2d: state dict has num_batches_tracked
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    sd = {prefix + k: v for k, v in ref.state_dict().items()}
    sd[prefix + "projection_head.0.weight"] = torch.zeros(3)  # SwAV-style extra head
    obj = {wrap: sd} if wrap else sd
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    return ref, path


@pytest.mark.parametrize("wrap,prefix", [(None, ""), ("state_dict", "module.")])
def test_local_weights_loaded_with_report(tmp_path, wrap, prefix):
    ref, path = _write_torchvision_sd(tmp_path, wrap, prefix)
    bb = Backbone("resnet18", train_backbone=False, weights=path)
    rep = bb.load_report
    assert rep.missing == [] and rep.unexpected == ["projection_head.0.weight"]
    assert sorted(rep.dropped) == ["fc.bias", "fc.weight"]
    assert torch.equal(bb.body.layer3[1].bn2.running_mean, ref.layer3[1].bn2.running_mean)
    assert torch.equal(bb.body.conv1.weight, ref.conv1.weight)


def test_missing_or_wrong_weight_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        Backbone("resnet18", False, weights=tmp_path / "nope.pth")
    torch.save({"foo.bar": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="no tensor matched"):
        Backbone("resnet18", False, weights=tmp_path / "junk.pth")
    _, path = _write_torchvision_sd(tmp_path)
    with pytest.raises(ValueError, match="shape mismatch"):
        Backbone("resnet50", False, weights=path)


def test_freezing_rules():
    frozen = Backbone("resnet18", train_backbone=False)
    assert frozen.frozen and not any(p.requires_grad for p in frozen.parameters())
    trained = Backbone("resnet18", train_backbone=True)
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert {n.split(".")[1] for n in names} == {"layer2", "layer3", "layer4"}
    assert not trained.frozen


def test_joiner_nested_and_plain_tensor():
    joiner = build_backbone("resnet18", 32)
    nt = nested_tensor_from_tensor_list([torch.randn(3, 64, 64), torch.randn(3, 32, 96)])
    feats, pos = joiner(nt)
    assert isinstance(feats[0], NestedTensor) and feats[0].tensors.shape == (2, 512, 2, 3)
    assert feats[0].mask.shape == (2, 2, 3) and feats[0].mask[1, 1:].all()
    assert pos[0].shape == (2, 32, 2, 3)
    plain = joiner(torch.randn(4, 3, 32, 32))
    assert isinstance(plain, list) and plain[0].shape == (4, 512, 1, 1)


def test_sine_encoding_values():
    pe = PositionEmbeddingSine(4, normalize=True)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = pe(NestedTensor(torch.zeros(1, 1, 2, 3), mask))
    assert pos.shape == (1, 8, 2, 3)
    # channel layout: [y: sin f0, cos f0, sin f1, cos f1, x: ...]; f = 10000^(2*floor(i/2)/4) -> 1, 1, 100, 100
    y, x = 2 / (2 + 1e-6) * 2 * math.pi, 3 / (3 + 1e-6) * 2 * math.pi  # bottom-right pixel
    exp_y = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)]
    exp_x = [math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    assert torch.allclose(pos[0, :, 1, 2], torch.tensor(exp_y + exp_x), atol=1e-5)
    # padding is ignored: a padded column does not change the normalised positions of the others
    mask2 = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask2[:, :, 3] = True
    pos2 = pe(NestedTensor(torch.zeros(1, 1, 2, 4), mask2))
    assert torch.allclose(pos2[..., :3], pos, atol=1e-6)


def test_learned_encoding_shape_and_limit():
    pe = PositionEmbeddingLearned(8)
    assert pe(NestedTensor(torch.zeros(2, 1, 3, 5), None)).shape == (2, 16, 3, 5)
    assert set(pe.state_dict()) == {"row_embed.weight", "col_embed.weight"}
    with pytest.raises(ValueError, match="50x50"):
        pe(NestedTensor(torch.zeros(1, 1, 51, 5), None))


@pytest.mark.parametrize("name,dilation", [("resnet18", False), ("resnet50", False), ("resnet50", True)])
def test_feature_size_is_the_cnns_output_size(name, dilation):
    """`feature_size` (what the dropout-mask plan is sized from, before the CNN runs) = the real map's size."""
    b = Backbone(name, train_backbone=False, dilation=dilation, fold_bn=True, channels_last=True)
    for h, w in ((448, 597), (97, 131), (128, 128), (33, 17)):
        with torch.no_grad():
            out = b(torch.zeros(1, 3, h, w))["0"]
        assert tuple(out.shape[-2:]) == b.feature_size(h, w), (h, w)
