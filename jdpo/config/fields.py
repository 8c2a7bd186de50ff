"""What every config section is built from: `setting` (a field with its help text) and `ConfigError`."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from jdpo.errors import UserError


def setting(default: Any, help: str) -> Any:
    """A section field with its help text (`jdpo train --help`); immutable defaults only (tuples)."""
    return field(default=default, metadata={"help": help})


class ConfigError(UserError, ValueError):
    """A config value that is unknown, mistyped or inconsistent; the message names the field."""
