"""What every format reader checks in a row, and where a loaded record came from.

The field checks raise `DataError` naming the row (`where`, "data/train.jsonl:17") and the field, so a bad
row is found in the file. They live here, below the readers of both record kinds (`formats` for pairs,
`unpaired` for rated completions), so that neither reaches into the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jdpo.data.chat import MESSAGE_FIELDS
from jdpo.data.sources import DataError

# Message roles chat templates know; anything else (a typo such as "asistant") is a bad row.
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def get_field(row: dict, name: str, where: str) -> Any:
    """`row[name]`; a missing field is a `DataError` listing the fields present."""
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(row)})")
    return row[name]


def get_text(row: dict, name: str, where: str) -> str:
    """A field that must be text."""
    value = get_field(row, name, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value


def get_number(row: dict, name: str, where: str) -> float:
    """A number, also from the text of a CSV cell."""
    value = get_field(row, name, where)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: field {name!r} must be a number, got {value!r}")
    return value


def as_messages(value: Any, name: str, where: str, default_role: str) -> list[dict]:
    """Text -> one message with `default_role`; a list is checked to hold {"role": str, "content": str}
    with a known role. The fields chat templates read besides (`chat.MESSAGE_FIELDS`: tool_calls,
    tool_call_id, name, reasoning_content, ...) are kept when not null; an assistant turn that only calls
    tools may have a null or missing content (kept as "")."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from parquet / datasets
        value = value.tolist()
    if not isinstance(value, list):
        raise DataError(
            f"{where}: field {name!r} must be text or a list of messages, got {type(value).__name__}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: field {name!r} message {i} must be a dict with a 'role' string")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: field {name!r} message {i} has role {m['role']!r}; known roles: {', '.join(ROLES)}"
            )
        extra = {k: m[k] for k in MESSAGE_FIELDS if m.get(k) is not None}
        content = m.get("content")
        if content is None and extra.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise DataError(
                f"{where}: field {name!r} message {i} 'content' must be text, got {type(content).__name__}"
            )
        if "tool_calls" in extra:
            calls = extra["tool_calls"] = _decoded_list(extra["tool_calls"])
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise DataError(f"{where}: field {name!r} message {i} 'tool_calls' must be a list of objects")
        out.append({"role": m["role"], "content": content, **extra})
    return out


def _decoded_list(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def is_unpaired(record: dict) -> bool:
    """A loaded record of the unpaired format {"prompt", "completion", "label"} (else a pair
    {"prompt", "chosen", "rejected"})."""
    return "completion" in record


def record_locations(records: Sequence[dict]) -> list[str]:
    """Where each record came from: `PreferenceRecords.where`, or "record i" for a plain list."""
    where = getattr(records, "where", None)
    return list(where) if where is not None else [f"record {i}" for i in range(len(records))]
