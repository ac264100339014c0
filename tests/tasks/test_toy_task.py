"""A task defined and registered here, outside updetr/tasks/, runs end to end through `updetr debug` and
`updetr eval`: its config rules, its data, its model, its evaluator and its table, with no change to
updetr itself. The toy task trains DETR on a tiny COCO set and scores whether the most confident box's
centre lands inside a ground-truth box."""
from __future__ import annotations

from pathlib import Path

import torch

from updetr.cli import main
from updetr.eval.base import Evaluator, distinct_ids, write_json_atomic
from updetr.tasks import Task, register_task
from updetr.util.box_ops import box_cxcywh_to_xyxy

from tests.tasks.conftest import TINY


class CentreEvaluator(Evaluator):
    """`centre_hits`: share of images whose most confident box centre lies inside a ground-truth box."""

    metric_names = ("centre_hits",)

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.hits: list[float] = []

    def add_batch(self, outputs: dict, targets: list[dict], postprocessors: dict) -> None:
        # pred_logits [B, Q, C+1] (last = no-object), pred_boxes [B, Q, 4] cxcywh, normalised like targets
        best = outputs["pred_logits"].softmax(-1)[..., :-1].max(-1).values.argmax(-1)      # [B]
        for b, t in enumerate(targets):
            cx, cy = outputs["pred_boxes"][b, best[b], :2].tolist()
            gt = box_cxcywh_to_xyxy(t["boxes"].float())                                     # [K, 4]
            inside = (gt[:, 0] <= cx) & (cx <= gt[:, 2]) & (gt[:, 1] <= cy) & (cy <= gt[:, 3])
            self.ids.append(int(t["image_id"]))
            self.hits.append(float(bool(inside.any())))

    def state(self) -> tuple[list[int], list[float]]:
        return list(self.ids), list(self.hits)

    def merge(self, parts) -> None:
        self.ids, self.hits = [], []
        for ids, hits in parts:
            self.ids.extend(ids)
            self.hits.extend(hits)

    def summarize(self) -> dict[str, float]:
        distinct_ids(self.ids, "the toy evaluation split is empty")
        return {"centre_hits": sum(self.hits) / len(self.hits)}

    def write_results(self, path) -> Path:
        return write_json_atomic(path, dict(zip(map(str, self.ids), self.hits)))


@register_task
class ToyCentresTask(Task):
    name = "toy_centres"
    sources = ("coco",)
    has_eval = True
    evaluator_class = CentreEvaluator

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.source not in cls.sources:
            raise ValueError(f"data.source '{cfg.data.source}': toy_centres reads coco")
        if cfg.model.num_queries > 16:
            raise ValueError(f"model.num_queries ({cfg.model.num_queries}) must be at most 16 for toy_centres")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._datasets: dict = {}

    def _dataset(self, split: str):
        from updetr.data.detection import build_detection_dataset

        if split not in self._datasets:
            self._datasets[split] = build_detection_dataset(self.cfg, split)
        return self._datasets[split]

    def build(self):
        from updetr.models import build_detr

        return build_detr(self.cfg, self._dataset("train").num_classes)

    def train_batches(self, epoch, skip=0, rank=0, world_size=1, shard=None):
        from updetr.data.detection import detection_batches

        return detection_batches(self.cfg, self._dataset("train"), epoch, skip, rank, world_size)

    def eval_batches(self, rank=0, world_size=1):
        from updetr.data.detection import detection_batches

        cfg = self.cfg.model_copy(update={"data": self.cfg.data.model_copy(update={"batch_size": 1})})
        return detection_batches(cfg, self._dataset("val"), 0, 0, rank, world_size)

    def evaluator(self) -> CentreEvaluator:
        return CentreEvaluator()


def _args(coco_root, tmp_path, *extra):
    return TINY + ["task=toy_centres", "name=toy", "data.source=coco", f"data.path={coco_root}",
                   "data.batch_size=2", "schedule.epochs=1", "schedule.max_steps=2", "schedule.eval_every=1",
                   f"runtime.output_dir={tmp_path / 'runs'}"] + list(extra)


def test_a_task_registered_outside_updetr_trains_evaluates_and_prints_its_table(coco_root, tmp_path, capfd):
    exp = tmp_path / "toy.yaml"
    exp.write_text("name: toy\n")
    assert main(["debug", str(exp), *_args(coco_root, tmp_path)]) == 0
    out = capfd.readouterr().out
    assert "toy_centres on cpu" in out                      # the driver ran this task
    assert "eval after epoch" in out and "centre_hits" in out and "AP50" not in out  # its own table
    ckpt = tmp_path / "runs" / "toy" / "checkpoints" / "last.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["config"]["task"] == "toy_centres" and saved["step"] == 2

    assert main(["eval", str(exp), *_args(coco_root, tmp_path), "--checkpoint", str(ckpt)]) == 0
    table = capfd.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.split() == ["centre_hits"])
    hits = float(table[header + 1]) * 7 / 100                # percent of the 7 val images, each a hit or not
    assert 0 <= hits <= 7 and abs(hits - round(hits)) < 0.01


def test_the_task_checks_its_own_config_in_one_line(coco_root, tmp_path, capfd):
    exp = tmp_path / "toy.yaml"
    exp.write_text("name: toy\n")
    assert main(["config", "validate", str(exp), *_args(coco_root, tmp_path)]) == 0
    assert "OK (toy_centres 'toy')" in capfd.readouterr().out

    assert main(["config", "validate", str(exp), *_args(coco_root, tmp_path, "model.num_queries=20")]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(exp) in err
    assert err.endswith("model.num_queries (20) must be at most 16 for toy_centres")

    assert main(["config", "validate", str(exp), *_args(coco_root, tmp_path, "data.source=synthetic")]) == 2
    assert capfd.readouterr().err.strip().endswith("data.source 'synthetic': toy_centres reads coco")

    assert main(["config", "validate", str(exp), *_args(coco_root, tmp_path, "task=toy_circles")]) == 2
    err = capfd.readouterr().err.strip()
    assert "task: Input should be 'pretrain', 'detect', 'oneshot', 'panoptic' or 'toy_centres'" in err
