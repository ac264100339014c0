"""Bad fine-tuning / evaluation input: one `updetr: error:` line naming the file / key and the reason, exit 2,
never a traceback and never a silent AP of 0."""
from __future__ import annotations

import json

import pytest

from updetr.checkpoint import make_checkpoint, save_checkpoint
from updetr.cli import main
from updetr.config import config_to_dict
from updetr.tasks import get_task

from .conftest import TINY, pretrain_cfg


def run_eval(capsys, tmp_path, checkpoint, *extra) -> tuple[int, str]:
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: bad\ntask: detect\n")
    rc = main(["eval", str(exp), "--checkpoint", str(checkpoint), *TINY, *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    cfg = pretrain_cfg()
    model, _, _ = get_task(cfg).build()
    path = tmp_path_factory.mktemp("ck") / "pre.pt"
    return save_checkpoint(make_checkpoint(model.state_dict(), config=config_to_dict(cfg)), path)


def test_missing_annotation_file(capsys, tmp_path, pretrained):
    rc, err = run_eval(capsys, tmp_path, pretrained, "data.source=coco", f"data.path={tmp_path}/nowhere")
    assert rc == 2 and err.count("\n") == 0
    assert f"{tmp_path}/nowhere" in err and "instances_train" in err


def test_category_id_outside_num_classes(capsys, tmp_path, pretrained, coco_root):
    rc, err = run_eval(capsys, tmp_path, pretrained, "data.source=coco", f"data.path={coco_root}",
                       "model.num_classes=3")
    assert rc == 2 and "category id(s) [3, 7] outside model.num_classes = 3" in err


def test_empty_evaluation_split(capsys, tmp_path, pretrained, coco_root):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text((coco_root / "annotations" / "instances_train.json").read_text())
    (root / "annotations" / "instances_val.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    rc, err = run_eval(capsys, tmp_path, pretrained, "data.source=coco", f"data.path={root}")
    assert rc == 2 and "val split" in err and "no images listed" in err


def test_checkpoint_missing_or_without_a_detection_head(capsys, tmp_path, pretrained, coco_root):
    rc, err = run_eval(capsys, tmp_path, tmp_path / "none.pt", "data.source=coco", f"data.path={coco_root}")
    assert rc == 2 and "none.pt: no such checkpoint file" in err
    # a pre-training checkpoint has no trained class head: evaluating it would be a silent AP of ~0
    rc, err = run_eval(capsys, tmp_path, pretrained, "data.source=coco", f"data.path={coco_root}")
    assert rc == 2 and "pre.pt: holds no trained detection head" in err
