"""`Config`, a whole run: one frozen section per feature; `validate`, each feature's rules in turn; the
field table behind `jdpo train --help`."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from jdpo.config.context import check_context
from jdpo.config.data import DataSection, check_data
from jdpo.config.dpo import DPOSection, check_loss, check_moving_reference
from jdpo.config.fields import FrozenMapping
from jdpo.config.lora import LoRASection, check_lora
from jdpo.config.model import MeshSection, ModelSection, check_mesh, check_model
from jdpo.config.online import OnlineSection, check_online
from jdpo.config.optim import OptimSection, check_optim
from jdpo.config.train import LoggingSection, TrainSection, check_keep_best, check_train


@dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoRASection = field(default_factory=LoRASection)
    online: OnlineSection = field(default_factory=OnlineSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


def validate(cfg: Config) -> None:
    """Cross-field checks that would otherwise fail late in a run: each feature's rules, the loss first."""
    check_loss(cfg)
    check_optim(cfg.optim)
    check_data(cfg.data)
    check_train(cfg.train)
    check_model(cfg.model)
    check_mesh(cfg.mesh)
    check_context(cfg)
    check_lora(cfg)
    check_moving_reference(cfg)
    check_online(cfg)
    check_keep_best(cfg)


def sections() -> dict[str, type]:
    """Section name -> section dataclass, in declaration order."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def field_help() -> list[tuple[str, str, Any, str]]:
    """(dotted name, type name, default, help) for every field: the source of `jdpo train --help`."""
    rows = []
    for sname, scls in sections().items():
        hints = typing.get_type_hints(scls)
        for f in dataclasses.fields(scls):
            rows.append((f"{sname}.{f.name}", _type_name(hints[f.name]), f.default, f.metadata["help"]))
    return rows


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if typing.get_origin(tp) is tuple:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    if typing.get_origin(tp) is types.UnionType:  # X | None
        return " | ".join(a.__name__ if a is not type(None) else "none" for a in typing.get_args(tp))
    if tp is FrozenMapping:
        return "mapping"
    return tp.__name__
