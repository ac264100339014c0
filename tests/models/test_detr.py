"""DETR forward: input forms, output shapes, aux outputs, padding; PostProcess."""
import pytest
import torch

from updetr.tasks import build_model
from updetr.models.postprocess import PostProcess
from updetr.util.nested_tensor import nested_tensor_from_tensor_list

from .conftest import make_targets, tiny_finetune_cfg


@pytest.fixture(scope="module")
def detr():
    model, criterion, post = build_model(tiny_finetune_cfg("model.dec_layers=3"))
    return model.eval(), criterion, post


def test_three_input_forms_agree(detr):
    model, _, _ = detr
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        a = model(x)
        b = model([x[0], x[1]])
        c = model(nested_tensor_from_tensor_list([x[0], x[1]]))
    for o in (b, c):
        assert torch.allclose(a["pred_logits"], o["pred_logits"], atol=1e-6)
        assert torch.allclose(a["pred_boxes"], o["pred_boxes"], atol=1e-6)


def test_shapes_and_aux(detr):
    model, criterion, _ = detr
    out = model([torch.randn(3, 64, 80), torch.randn(3, 48, 96)])
    assert out["pred_logits"].shape == (2, 20, 6)  # num_classes 5 + no-object
    assert out["pred_boxes"].shape == (2, 20, 4)
    assert len(out["aux_outputs"]) == 2  # dec_layers - 1
    assert all(a["pred_logits"].shape == (2, 20, 6) for a in out["aux_outputs"])
    losses = criterion(out, make_targets(2, 3, label=4))
    assert "loss_feature" not in losses and "loss_ce_1" in losses
    assert set(criterion.weight_dict) == {f"loss_{k}{s}" for k in ("ce", "bbox", "giou") for s in ("", "_0", "_1")}


def test_no_aux():
    model, _, _ = build_model(tiny_finetune_cfg("model.aux_loss=false"))
    out = model(torch.randn(1, 3, 64, 64))
    assert "aux_outputs" not in out


def test_detect_num_classes_comes_from_the_dataset(tmp_path):
    from updetr.config import load_config
    from updetr.data.synthetic import write_coco_dataset
    from updetr.tasks.detect import DatasetError

    cfg = load_config(None, ["task=detect", "data.source=coco", f"data.path={tmp_path}/none"])
    with pytest.raises(DatasetError, match="none.*instances_train"):  # one line naming the folder
        build_model(cfg)
    write_coco_dataset(tmp_path, 2, split="train")
    cfg = load_config(None, ["task=detect", "data.source=coco", f"data.path={tmp_path}",
                             "model.backbone=resnet18", "model.hidden_dim=32", "model.nheads=2"])
    model, _, _ = build_model(cfg)
    assert model.class_embed.out_features == 8 + 1  # ids 1, 2, 3, 7 -> num_classes 8, + no-object


def test_postprocess():
    logits = torch.tensor([[[0.0, 3.0, 0.0], [5.0, 0.0, 9.0]]])  # K=2 + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    res = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert len(res) == 1
    r = res[0]
    prob = logits.softmax(-1)[0]
    assert r["labels"].tolist() == [1, 0]  # no-object never wins even when it has the top score
    assert torch.allclose(r["scores"], torch.stack([prob[0, 1], prob[1, 0]]))
    # (h, w) = (100, 200): x scaled by 200, y by 100
    assert torch.allclose(r["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    assert torch.allclose(r["boxes"][1], torch.tensor([0.0, 50.0, 100.0, 100.0]))
    with pytest.raises(ValueError):
        PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))
