"""From text to a `Config` and back: YAML presets, `--section.field value` overrides, `replace`, `dump`;
and what a resumed run may change (`RESUMABLE_CHANGES`, `config_changes`).

A run's config is three layers, later ones winning: the dataclass defaults, a YAML preset (nested by
section), and command-line overrides. Unknown sections or fields, a key given twice in a YAML mapping,
and values of the wrong type are errors naming the field and where it came from: a long run must never
start on a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jdpo.config.fields import ConfigError, FrozenMapping
from jdpo.config.schema import Config, sections, validate
from jdpo.paths import as_path

# Fields older jdpo versions wrote into every config.yaml, now gone: the value they held when they are
# still read (so a run's own config.yaml keeps loading), and why they went.
REMOVED_FIELDS = {
    "dpo.bco_delta": (0.0, "bco_pair's reward shift is now BCO's running reward mean, in the train state"),
}

# Values older jdpo versions accepted, now gone, and what to use instead.
REMOVED_VALUES = {
    ("model.attention", "cudnn"): (
        "it handed cuDNN a dense [B, 1, T, T] mask; pallas_gpu is the GPU kernel that reads the segment "
        "ids, and model.attention=auto picks it on NVIDIA GPUs"
    ),
}

# Settings a resumed run may change freely: they decide what is logged, saved, where, and how the same
# computation is laid out on devices, not what is computed (the attention kernels agree to float rounding).
RESUMABLE_CHANGES = frozenset({
    "train.output_dir", "train.eval_every", "train.save_every", "train.keep_checkpoints",
    "train.log_every", "train.export", "train.early_stop_patience", "train.early_stop_accuracy",
    "train.allow_config_change", "train.allow_base_change", "train.keep_best", "train.divergence_factor",
    "train.max_param_abs", "train.push_to_hub", "train.hub_private", "train.hub_revision",
    "dpo.cache_dir", "data.token_cache", "train.compile_cache", "model.remat", "model.attention",
    "model.attention_block", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert", "model.moe_dispatch",
    "mesh.context", "model.context_attention", "model.context_balance", "logging.console",
    "logging.tensorboard", "logging.wandb", "logging.wandb_project",
})  # fmt: skip

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is types.UnionType and len(args) == 2 and type(None) in args:  # `X | None`: unset is None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML's true / false
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):
            # Command line: comma-separated; an empty string is the empty list.
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, list | tuple):
            value = [value]
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is FrozenMapping:
        return _coerce_mapping(value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        return _coerce_float(value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp!r} at {where}")  # a bug in a section


def _coerce_mapping(value: Any, where: str) -> FrozenMapping:
    """A mapping with text keys: from YAML as is, from the command line as YAML / JSON text
    (`{enable_thinking: false}`; an empty string is the empty mapping)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not a YAML / JSON mapping ({e})") from None
    if value is None:
        value = {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{where}: expected a mapping of names to values, e.g. {{enable_thinking: false}}, "
                          f"got {value!r}")  # fmt: skip
    return FrozenMapping(value)


def _coerce_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _coerce_float(value: Any, where: str) -> float:
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(number):  # nan passes every `<` / `>` check of the rules and poisons a run
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _unknown(name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"{where}: unknown field {name!r}{hint}")


def _apply(cfg: Config, section: str, name: str, value: Any, where: str) -> Config:
    secs = sections()
    if section not in secs:
        raise _unknown(section, list(secs), where)
    if f"{section}.{name}" in REMOVED_FIELDS:
        default, why = REMOVED_FIELDS[f"{section}.{name}"]
        if value != default:
            raise ConfigError(f"{where}: {section}.{name} is no longer a setting ({why}); remove it")
        return cfg
    if isinstance(value, str) and (f"{section}.{name}", value) in REMOVED_VALUES:
        why = REMOVED_VALUES[f"{section}.{name}", value]
        raise ConfigError(f"{where}: {section}.{name}={value} is no longer a choice ({why})")
    hints = typing.get_type_hints(secs[section])
    if name not in hints:
        raise _unknown(f"{section}.{name}", [f"{section}.{k}" for k in hints], where)
    new_value = _coerce(value, hints[name], f"{where}: {section}.{name}")
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: new_value})}
    )


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`['--dpo.beta', '0.2', '--train.seed=3']` -> [('dpo.beta', '0.2'), ('train.seed', '3')]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: expected --section.field VALUE, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"command line: {arg} needs a value")
            i += 1
            value = args[i]
        out.append((key, value))
        i += 1
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (plain YAML keeps the last one, so a
    second `train:` section would silently replace the first)."""

    source = "<yaml>"  # the file named in the error; set per load

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: explicit keys override it
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(
                    f"{self.source}:{line}: key {key!r} appears twice in one mapping (first at line "
                    f"{seen[key]}); YAML would keep only the last: merge them or remove one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Any) -> dict:
    """The sections of the YAML file at `path` (a local path or a URL), refusing duplicated keys."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    loader = _UniqueKeyLoader(text)
    loader.source = str(path)
    try:
        raw = loader.get_single_data() or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | list[tuple[str, str]] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `overrides`; validated.

    overrides: either raw arguments (`['--dpo.beta', '0.2']`) or (dotted name, value) pairs.
    """
    cfg = Config()
    if path is not None:
        path = as_path(path)  # a local file or a URL (a run's config.yaml on gs://)
        for section, values in _read_yaml(path).items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of fields")
            for name, value in values.items():
                cfg = _apply(cfg, section, name, value, str(path))
    pairs = list(overrides)
    if pairs and isinstance(pairs[0], str):
        pairs = parse_overrides(pairs)  # type: ignore[arg-type]
    for key, value in pairs:
        section, _, name = key.partition(".")
        cfg = _apply(cfg, section, name, value, "command line")
    validate(cfg)
    return cfg


def replace(cfg: Config, **dotted: Any) -> Config:
    """`replace(cfg, **{"train.max_steps": 3})`: typed updates for Python callers; validated."""
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        cfg = _apply(cfg, section, name, value, "replace()")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested plain dict (tuples as lists): what gets written next to a run's outputs as config.yaml."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, FrozenMapping) else v

    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in sections()}


def dump(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back with load_config to an equal Config)."""
    as_path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # local or gs:// (epath)


def config_changes(saved: dict[str, dict[str, Any]], cfg: Config) -> list[tuple[str, Any, Any]]:
    """(dotted name, saved value, new value) for every field of `cfg` that differs from `saved` (a
    `to_dict` of the config a run was started or last resumed with). Fields `saved` lacks (a config
    from an older jdpo) count as unchanged."""
    new = to_dict(cfg)
    return [
        (f"{s}.{k}", saved[s][k], v)
        for s, fields in new.items()
        for k, v in fields.items()
        if s in saved and k in saved[s] and saved[s][k] != v
    ]
