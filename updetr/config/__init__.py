"""Typed experiment configuration: one module per section, a root that composes them, YAML loading.

An experiment YAML is a small diff over the defaults of the sections. `load_config(path, overrides)`
resolves `base:` (at most one level), applies `key=value` overrides, validates, and returns a frozen
`ExperimentConfig`; `load_experiment` also reads chained `stages:`. Every error names the file, the field
path and the reason (`ConfigError`).

    base        strict frozen models, ConfigError        experiment  the root: task + every section
    model       model:      pretext   pretext:           loading     YAML, base:, overrides, dict / YAML out
    loss        loss:       data      data:, detection:  stages      stages: (chains)
    weights     init:       optim     optim:             identity    which settings make a run's identity
    schedule    schedule:   runtime   runtime:
    ray         ray:        tracking  tracking:
    oneshot     oneshot:    panoptic  panoptic:
"""
from updetr.config.base import ConfigError
from updetr.config.data import DataConfig, DetectionConfig
from updetr.config.evaluation import EvalConfig
from updetr.config.experiment import _LEGACY_STAGE, ExperimentConfig
from updetr.config.identity import (IDENTITY_KEEP, OPERATIONAL_PREFIXES, RUN_LENGTH_FIELDS, identity_diff,
                                    identity_fields, resume_note)
from updetr.config.loading import (_format_validation, _read_yaml, config_from_dict, config_to_dict, config_to_yaml,
                                   flatten, load_config, parse_overrides, resolve_dict)
from updetr.config.loss import LossConfig
from updetr.config.model import ModelConfig
from updetr.config.oneshot import ONESHOT_UNSEEN, VOC_CLASSES, OneShotConfig
from updetr.config.optim import OptimConfig
from updetr.config.panoptic import PanopticConfig
from updetr.config.pretext import PRETRAIN_SCALES, PretextConfig
from updetr.config.ray import RayConfig
from updetr.config.runtime import RuntimeConfig
from updetr.config.schedule import ScheduleConfig
from updetr.config.stages import STAGE_ACTIONS, Experiment, Stage, load_experiment
from updetr.config.tracking import TrackingConfig
from updetr.config.weights import InitConfig

__all__ = [
    "ConfigError", "DataConfig", "DetectionConfig", "EvalConfig", "Experiment", "ExperimentConfig", "IDENTITY_KEEP",
    "InitConfig",
    "LossConfig", "ModelConfig", "ONESHOT_UNSEEN", "OPERATIONAL_PREFIXES", "OneShotConfig", "OptimConfig",
    "PRETRAIN_SCALES", "PanopticConfig", "PretextConfig", "RUN_LENGTH_FIELDS", "RayConfig", "RuntimeConfig",
    "STAGE_ACTIONS", "ScheduleConfig", "Stage", "TrackingConfig", "VOC_CLASSES", "config_from_dict",
    "config_to_dict", "config_to_yaml", "flatten", "identity_diff", "identity_fields", "load_config",
    "load_experiment", "parse_overrides", "resolve_dict", "resume_note",
]
