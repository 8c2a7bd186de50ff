"""Every setting of a jdpo run, as typed frozen dataclasses: one section per feature, each module holding
its section and its rules (`model`, `data`, `dpo`, `optim`, `train`, `lora`, `online`); `schema` puts
them together as `Config` and runs the rules (`validate`); `parse` reads YAML presets and
`--section.field value` overrides and writes a run's config back.

No jax at import: `jdpo --help` lists these fields without loading it.
"""

from jdpo.config.data import DataSection
from jdpo.config.dpo import LOSS_OPTIONS, DPOSection
from jdpo.config.fields import ConfigError
from jdpo.config.lora import LORA_TARGETS, LoRASection
from jdpo.config.model import MeshSection, ModelSection, attention_block_problem
from jdpo.config.online import OnlineSection
from jdpo.config.optim import OptimSection
from jdpo.config.parse import (
    REMOVED_FIELDS,
    REMOVED_VALUES,
    RESUMABLE_CHANGES,
    config_changes,
    dump,
    load_config,
    parse_overrides,
    replace,
    to_dict,
)
from jdpo.config.schema import Config, field_help, sections, validate
from jdpo.config.train import LoggingSection, TrainSection
from jdpo.losses.spec import UNPAIRED_OPTIONS, LossSpec

__all__ = [
    "LORA_TARGETS",
    "LOSS_OPTIONS",
    "REMOVED_FIELDS",
    "REMOVED_VALUES",
    "RESUMABLE_CHANGES",
    "UNPAIRED_OPTIONS",
    "Config",
    "ConfigError",
    "DPOSection",
    "DataSection",
    "LoRASection",
    "LoggingSection",
    "LossSpec",
    "MeshSection",
    "ModelSection",
    "OnlineSection",
    "OptimSection",
    "TrainSection",
    "attention_block_problem",
    "config_changes",
    "dump",
    "field_help",
    "load_config",
    "parse_overrides",
    "replace",
    "sections",
    "to_dict",
    "validate",
]
