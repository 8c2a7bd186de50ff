"""What every config section is built from: `setting` (a field with its help text) and `ConfigError`."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from jdpo.errors import ConfigError  # noqa: F401  (the config's error, defined with the others)


def setting(default: Any, help: str) -> Any:
    """A section field with its help text (`jdpo train --help`); immutable defaults only (tuples)."""
    return field(default=default, metadata={"help": help})
