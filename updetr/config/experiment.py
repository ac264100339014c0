"""The root config: one experiment = a task plus every section it needs."""
from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from updetr.config.base import _Strict
from updetr.config.data import DataConfig, DetectionConfig
from updetr.config.detector_defaults import resolve_detector_defaults
from updetr.config.evaluation import EvalConfig
from updetr.config.loss import LossConfig
from updetr.config.model import ModelConfig
from updetr.config.oneshot import OneShotConfig
from updetr.config.optim import OptimConfig
from updetr.config.panoptic import PanopticConfig
from updetr.config.pretext import PretextConfig
from updetr.config.ray import RayConfig
from updetr.config.runtime import RuntimeConfig
from updetr.config.schedule import ScheduleConfig
from updetr.config.tracking import TrackingConfig
from updetr.config.weights import InitConfig


# The field was called `stage` before tasks existed; old YAMLs and overrides keep working.
_LEGACY_STAGE = {"pretrain": "pretrain", "finetune": "detect"}


class ExperimentConfig(_Strict):
    """One experiment: a task plus every setting it needs."""

    name: str = Field("experiment", min_length=1, description="Experiment name (run names derive from it).")
    task: str = Field(
        "pretrain", description="What is trained (updetr.tasks): pretrain = random query patch detection, "
                                "detect = DETR detection fine-tuning / evaluation, oneshot = one-shot "
                                "detection on VOC (paper Table 3), panoptic = DETR's mask head on a frozen "
                                "detector, scored by PQ and AP^seg. (`stage: finetune` is read as detect.)")
    seed: int = Field(42, description="Run seed; every random draw derives from it.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Network architecture.")
    pretext: PretextConfig = Field(default_factory=PretextConfig, description="Random query patch detection.")
    detection: DetectionConfig = Field(default_factory=DetectionConfig, description="Detection augmentation.")
    init: InitConfig = Field(default_factory=InitConfig, description="Weight initialisation.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss and matcher weights.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data source and batching.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Schedule and checkpoints.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Device and precision.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray Train settings.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    oneshot: OneShotConfig = Field(default_factory=OneShotConfig, description="One-shot detection (task oneshot).")
    panoptic: PanopticConfig = Field(default_factory=PanopticConfig, description="Panoptic mask head.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation metric.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_stage(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stage" in data:
            data = dict(data)
            stage = data.pop("stage")
            if stage not in _LEGACY_STAGE:
                raise ValueError(f"stage: '{stage}' is not pretrain | finetune (the field is now `task`: "
                                 "pretrain | detect)")
            data.setdefault("task", _LEGACY_STAGE[stage])
        return data

    @model_validator(mode="before")
    @classmethod
    def _eos_coef_m_over_n(cls, data: Any) -> Any:
        loss = data.get("loss") if isinstance(data, dict) else None
        if isinstance(loss, dict) and isinstance(loss.get("eos_coef"), str) and \
                loss["eos_coef"].replace(" ", "") == "M/N":
            m = (data.get("pretext") or {}).get("num_patches", PretextConfig.model_fields["num_patches"].default)
            n = (data.get("model") or {}).get("num_queries", ModelConfig.model_fields["num_queries"].default)
            if isinstance(m, int) and isinstance(n, int) and n > 0:  # other types: the field checks report them
                data = {**data, "loss": {**loss, "eos_coef": m / n}}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> "ExperimentConfig":
        task = _task_class(self.task)
        if self.model.detector not in task.detectors:
            raise ValueError(f"model.detector '{self.model.detector}': task {self.task} builds "
                             f"{' | '.join(task.detectors)} only (docs/detectors.md)")
        if self.model.detector != "deformable_detr":
            for field, value, default in (("loss.focal_alpha", self.loss.focal_alpha, 0.25),
                                          ("optim.lr_linear_proj_mult", self.optim.lr_linear_proj_mult, 0.1)):
                if value != default:
                    raise ValueError(f"{field} applies to model.detector deformable_detr only")
            if self.pretext.classification == "focal":
                raise ValueError("pretext.classification 'focal' applies to model.detector deformable_detr only "
                                 "(DETR classifies with a softmax)")
        task.check_config(self)   # the task's own rules (sources, heads, losses, subsets)
        if self.eval.metric not in task.eval_metrics or (self.eval.metric in ("voc07", "voc12") and
                                                         self.data.source not in ("voc", "synthetic_voc")):
            raise ValueError(f"eval.metric '{self.eval.metric}': task {self.task} scores "
                             f"{' | '.join(task.eval_metrics)}; voc07 | voc12 are the VOC devkit's and score VOC "
                             f"data only (data.source voc | synthetic_voc; here '{self.data.source}')")
        if self.data.source in ("folder", "shards", "coco", "voc", "coco_panoptic") and not self.data.path:
            raise ValueError(f"data.path is required for data.source '{self.data.source}'")
        return self

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        from updetr.tasks.defaults import resolve_task_defaults  # the official per-task defaults (deferred as below)

        # the detector's defaults first: they fix fields (pre_norm, lr_backbone) the task's table would fill
        data = resolve_task_defaults(resolve_detector_defaults(data))
        if isinstance(data, dict) and isinstance(data.get("task"), str) and data["task"] in _task_names():
            data = _task_class(data["task"]).config_defaults(data)
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        names = _task_names()
        if v not in names:
            quoted = [f"'{n}'" for n in names]
            raise ValueError(f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}")
        return v

    @property
    def num_classes(self) -> int:
        """Classes the head predicts (excluding no-object): the task's default (2 for pre-training and
        one-shot) unless model.num_classes is set."""
        if self.model.num_classes is not None:
            return self.model.num_classes
        n = _task_class(self.task).default_num_classes
        if n is not None:
            return n
        raise ValueError("model.num_classes must be set for fine-tuning (max category id + 1)")


# The one import that points up: the task a config names validates that config (its sources, its rules).
# Deferred to validation time; tasks/ imports nothing of config/, so no import circle forms.
def _tasks():
    from updetr import tasks

    return tasks


def _task_class(name: str):
    return _tasks().task_class(name)


def _task_names() -> tuple[str, ...]:
    return _tasks().task_names()
