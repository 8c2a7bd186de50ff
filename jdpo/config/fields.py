"""What every config section is built from: `setting` (a field with its help text) and `ConfigError`."""

from __future__ import annotations

import json
from dataclasses import field
from typing import Any

from jdpo.errors import ConfigError  # noqa: F401  (the config's error, defined with the others)


class FrozenMapping(dict):
    """A mapping setting (`data.chat_template_kwargs`): a dict that cannot change, so a section stays
    frozen and hashable. YAML gives it as a mapping, the command line as YAML / JSON text."""

    def _frozen(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a config mapping cannot be changed; use jdpo.config.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _frozen  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, default=str))


def setting(default: Any, help: str) -> Any:
    """A section field with its help text (`jdpo train --help`); immutable defaults only (tuples)."""
    return field(default=default, metadata={"help": help})
