"""What a chat template is given besides the messages, and what it can render.

A record (or a prompt) may carry, besides its messages:
  tools                 a list of JSON-schema function definitions, passed as `tools=` to the template
  chat_template_kwargs  a mapping passed to the template (e.g. {"enable_thinking": false} for Qwen3's);
                        it overrides the run's `data.chat_template_kwargs` key by key, for that row
(TRL reads the same column names.) Messages may carry `tool_calls` (assistant), be `tool` turns, and hold a
reasoning trace (`reasoning_content`, or `reasoning` / `thinking` for templates that read those names);
`jdpo.data.records.as_messages` keeps these fields.

A template that ignores one of these (a Llama-2 template given `tools`, a ChatML template given
`reasoning_content`) would drop it silently, so the training text would not be what the data says.
`TemplateFeatures` renders a probe per feature once per set of template kwargs, and `problem` names
what a record uses that the template cannot render; the tokeniser refuses such a record with its file
and line before anything trains.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from jdpo.data.sources import DataError

# Row fields (besides the messages) that reach the chat template.
CHAT_FIELDS = ("tools", "chat_template_kwargs")
# Message fields besides role / content that chat templates read.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "name", *REASONING_FIELDS)
TOOL_ROLES = ("tool", "ipython", "function")

_PROBE = "jdpo_probe_7431"
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": _PROBE,
        "description": "probe",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
    },
}
_PROBE_CALL = {"type": "function", "function": {"name": _PROBE, "arguments": {"x": "y"}}}


def _decoded(value: Any) -> Any:
    """A JSON cell (CSV, or a column some writers store as text) decoded; numpy arrays as lists."""
    if isinstance(value, str) and value.strip()[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value.tolist() if hasattr(value, "tolist") else value


def _checked(row: Mapping, name: str, ok, want: str, where: str) -> Any:
    """The row's field `name` decoded, None when absent, null or empty; a `DataError` unless `ok(value)`."""
    value = _decoded(row.get(name))
    if value is None:
        return None
    if not ok(value):
        raise DataError(f"{where}: field {name!r} must be {want}, got {value!r:.80}")
    return value or None


def read_chat_fields(row: Mapping, where: str) -> dict:
    """The row's `tools` and `chat_template_kwargs` (those present and not null), checked: tools a list of
    objects, the kwargs an object with text keys. A bad one is a `DataError` naming the row and field."""
    tools = _checked(row, "tools", lambda v: isinstance(v, list) and all(isinstance(t, dict) for t in v),
                     "a list of JSON-schema function definitions (objects)", where)  # fmt: skip
    kwargs = _checked(row, "chat_template_kwargs",
                      lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                      'an object of template arguments (e.g. {"enable_thinking": false})', where)  # fmt: skip
    fields = {"tools": tools, "chat_template_kwargs": kwargs}
    return {k: v for k, v in fields.items() if v is not None}


def chat_fields(record: Mapping) -> dict:
    """The chat fields a loaded record carries (to copy onto records derived from it)."""
    return {k: record[k] for k in CHAT_FIELDS if k in record}


def template_kwargs(defaults: Mapping | None, record: Mapping | None) -> dict:
    """The keyword arguments of `apply_chat_template` for one record: the run's kwargs, the record's own
    `chat_template_kwargs` over them, and its `tools`."""
    out = dict(defaults or {})
    if record:
        out.update(record.get("chat_template_kwargs") or {})
        if record.get("tools"):
            out["tools"] = record["tools"]
    return out


def features_used(messages: Sequence[Sequence[dict]], options: Mapping) -> list[str]:
    """The template features (`TemplateFeatures` names) that these message lists and options use."""
    used = ["tools"] if options.get("tools") else []
    msgs = [m for ms in messages if isinstance(ms, list) for m in ms]
    if any(m.get("tool_calls") for m in msgs):
        used.append("tool_calls")
    if any(m.get("role") in TOOL_ROLES for m in msgs):
        used.append("tool results")
    used += [f for f in REASONING_FIELDS if any(m.get(f) for m in msgs)]
    return used


def message_is_empty(m: Mapping) -> bool:
    """A message with nothing to train on: no content, no tool call, no reasoning."""
    return (
        not (m.get("content") or "").strip()
        and not m.get("tool_calls")
        and not any(m.get(f) for f in REASONING_FIELDS)
    )


class TemplateFeatures:
    """Which of tools, tool calls, tool results and each reasoning field a tokenizer's chat template
    renders, probed once per set of template kwargs (`render(messages, generation_prompt, kwargs)` is
    the tokenizer's template)."""

    def __init__(self, render):
        self.render = render
        self._probed: dict[str, dict[str, bool]] = {}

    def _probe(self, kwargs: Mapping) -> dict[str, bool]:
        key = json.dumps({k: v for k, v in kwargs.items() if k != "tools"}, sort_keys=True, default=str)
        if key not in self._probed:
            base = {k: v for k, v in kwargs.items() if k != "tools"}
            user = {"role": "user", "content": "x"}
            call = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
            result = {"role": "tool", "name": _PROBE, "content": _PROBE + "_result"}
            found = {
                "tools": self._shows([user], {**base, "tools": [_PROBE_TOOL]}, _PROBE, True),
                "tool_calls": self._shows([user, call], base, _PROBE, False),
                "tool results": self._shows(
                    [user, call, result], {**base, "tools": [_PROBE_TOOL]}, _PROBE + "_result", True
                ),  # fmt: skip
            }
            for f in REASONING_FIELDS:
                turn = {"role": "assistant", "content": "a", f: _PROBE + "_reasoning"}
                found[f] = self._shows([user, turn], base, _PROBE + "_reasoning", False)
            self._probed[key] = found
        return self._probed[key]

    def _shows(self, messages, kwargs, marker: str, generation_prompt: bool) -> bool:
        """The rendering holds `marker`, which only the feature under test can write."""
        try:
            return marker in self.render(messages, generation_prompt, kwargs)
        except Exception:  # the template refuses the feature outright
            return False

    def problem(self, messages: Sequence[Sequence[dict]], kwargs: Mapping) -> str | None:
        """What these messages / kwargs use that the template does not render (None: all of it renders)."""
        used = features_used(messages, kwargs)
        if not used:
            return None
        found = self._probe(kwargs)
        missing = [f for f in used if not found[f]]
        if not missing:
            return None
        return (
            f"the tokenizer's chat template does not render {', '.join(missing)} (it would drop them from "
            "the training text); use a model whose chat template renders them (e.g. Qwen3's, Llama 3.1's "
            "for tools), or remove those fields from the data"
        )
