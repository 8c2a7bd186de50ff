"""One reader per public preference format -> records {"prompt", "chosen", "rejected"}.

A record's fields are either all text (`str`) or all chat messages (`list[{"role", "content"}]`; the
prompt holds every turn before the completion, `chosen` / `rejected` hold the completion turns, usually
one assistant message). A row's `tools` and `chat_template_kwargs` go with its record (`jdpo.data.chat`).
Formats, auto-detected from the fields of the first rows:

  standard         prompt, chosen, rejected as text
  implicit_prompt  chosen, rejected as text; prompt = their longest common prefix, cut at a turn boundary
  conversational   message lists; chosen / rejected may repeat the prompt turns (UltraFeedback-binarized),
                   which are stripped; without a prompt field the shared leading turns are the prompt
  hh-rlhf          Anthropic transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages
  shp              Stanford Human Preferences: history, human_ref_A/B, labels (1 = A preferred), score_A/B
  oasst1           OpenAssistant message rows; trees rebuilt, sibling assistant replies paired by rank
  unpaired         prompt, completion, label (true / false): one rated completion, text or messages, as
                   records {"prompt", "completion", "label"} for the unpaired losses (`jdpo.data.unpaired`)

`load_preferences` (below) reads one source or a mixture, and `split_eval` carves a held-out split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jdpo.data.chat import read_chat_fields
from jdpo.data.records import as_messages, get_field, get_number, get_text, is_unpaired, record_locations
from jdpo.data.sources import DataError, parse_source_spec, read_rows
from jdpo.data.unpaired import UNPAIRED_FORMAT, is_unpaired_row, read_unpaired_row

FORMATS = ("standard", "implicit_prompt", "conversational", "hh-rlhf", "shp", "oasst1", UNPAIRED_FORMAT)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
# An assistant-turn marker in plain text; the implicit prompt is cut right after the last one.
_ASSISTANT_MARK = re.compile(r"(?:^|\n)[ \t]*(?:Assistant|ASSISTANT|assistant|AI|Bot|Model|model|GPT)[ \t]*:")
_MAX_BAD_EXAMPLES = 5


@dataclass
class LoadReport:
    """What loading did: rows read, records produced, rows dropped by reason, bad rows skipped."""

    rows_read: int = 0
    records: int = 0
    formats: dict[str, str] = field(default_factory=dict)  # source -> format used
    per_source: dict[str, int] = field(default_factory=dict)  # source -> records after mixing
    dropped: Counter = field(default_factory=Counter)  # reason -> rows (data quirks, not errors)
    bad_rows: int = 0  # malformed rows skipped with skip_bad_rows=True
    bad_examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.records} preference pairs from {self.rows_read} rows"]
        for src, fmt in self.formats.items():
            lines.append(f"  {src}: format {fmt}, {self.per_source.get(src, 0)} pairs")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped {n} ({reason})")
        if self.bad_rows:
            lines.append(f"  skipped {self.bad_rows} bad rows, e.g.:")
            lines.extend(f"    {e}" for e in self.bad_examples)
        return "\n".join(lines)


class PreferenceRecords(list):
    """A list of {"prompt", "chosen", "rejected"} dicts with the `LoadReport` attached as `.report` and
    `.where[i]`, where record i came from ("data/train.jsonl:17"), for errors found after loading."""

    report: LoadReport
    where: list[str]

    def __init__(
        self,
        records: Iterable[dict] = (),
        report: LoadReport | None = None,
        where: Sequence[str] | None = None,
    ):
        super().__init__(records)
        self.report = report if report is not None else LoadReport(records=len(self))
        self.where = list(where) if where is not None else [f"record {i}" for i in range(len(self))]
        if len(self.where) != len(self):
            raise ValueError(f"{len(self.where)} locations for {len(self)} records")


class _BadRows:
    """Raise on the first bad row, or (skip=True) count them and keep the first few messages."""

    def __init__(self, skip: bool, report: LoadReport):
        self.skip, self.report = skip, report

    def __call__(self, err: DataError) -> None:
        if not self.skip:
            raise err
        self.report.bad_rows += 1
        if len(self.report.bad_examples) < _MAX_BAD_EXAMPLES:
            self.report.bad_examples.append(str(err))


# ----------------------------------------------------------------------------------------------------
# Prompt extraction


def common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def extract_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two texts that share a prompt into (prompt, chosen_completion, rejected_completion).

    The prompt is their longest common prefix cut right after the last assistant-turn marker in it
    ("...\\n\\nAssistant:"), so a completion never starts inside a turn header. Without a marker it is
    cut at the last whitespace (the whitespace goes with the completion, as BPE tokenizers attach a
    leading space to the next word), so that a completion never starts mid-word.
    """
    lcp = common_prefix(chosen, rejected)
    marks = list(_ASSISTANT_MARK.finditer(lcp))
    if marks:
        cut = marks[-1].end()
    elif len(lcp) in (len(chosen), len(rejected)) or lcp == "":
        cut = len(lcp)
    else:
        ws = max(lcp.rfind(" "), lcp.rfind("\n"), lcp.rfind("\t"))
        cut = ws if ws > 0 else len(lcp)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _shared_turns(a: list[dict], b: list[dict]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    # The completion starts at an assistant turn: step back over trailing shared assistant turns only
    # when nothing would be left for one side.
    while k > 0 and (k == len(a) or k == len(b)) and a[k - 1]["role"] == "assistant":
        k -= 1
    return k


def parse_hh(transcript: str, where: str, name: str) -> list[dict]:
    """An Anthropic hh-rlhf transcript -> messages (Human -> user, Assistant -> assistant)."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise DataError(f"{where}: field {name!r} does not start with '\\n\\nHuman:' (hh-rlhf transcript)")
    msgs = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": text.strip()})
    if not msgs:
        raise DataError(f"{where}: field {name!r} holds no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    return msgs


# ----------------------------------------------------------------------------------------------------
# Per-row readers: row -> record, or a str (the reason the row is dropped), or raise DataError


def _read_standard(row: dict, where: str, opts: dict) -> dict | str:
    prompt = get_field(row, "prompt", where)
    chosen, rejected = get_field(row, "chosen", where), get_field(row, "rejected", where)
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if any(isinstance(v, list) or hasattr(v, "tolist") for v in (prompt, chosen, rejected)):
        return _read_conversational(row, where, opts)
    for name in ("prompt", "chosen", "rejected"):
        get_text(row, name, where)
    raise AssertionError("unreachable")


def _read_implicit(row: dict, where: str, opts: dict) -> dict | str:
    chosen, rejected = get_field(row, "chosen", where), get_field(row, "rejected", where)
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return _read_conversational(row, where, opts)
    prompt, c, r = extract_prompt(chosen, rejected)
    return {"prompt": prompt, "chosen": c, "rejected": r}


def _read_conversational(row: dict, where: str, opts: dict) -> dict | str:
    chosen = as_messages(get_field(row, "chosen", where), "chosen", where, "assistant")
    rejected = as_messages(get_field(row, "rejected", where), "rejected", where, "assistant")
    if row.get("prompt") is not None:
        prompt = as_messages(row["prompt"], "prompt", where, "user")
        # UltraFeedback-binarized repeats the prompt turns at the start of chosen and rejected.
        n = len(prompt)
        if chosen[:n] == prompt:
            chosen = chosen[n:]
        if rejected[:n] == prompt:
            rejected = rejected[n:]
    else:
        k = _shared_turns(chosen, rejected)
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _read_hh(row: dict, where: str, opts: dict) -> dict | str:
    chosen = parse_hh(get_text(row, "chosen", where), where, "chosen")
    rejected = parse_hh(get_text(row, "rejected", where), where, "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return "hh-rlhf: transcript does not end with an Assistant turn"
    if chosen[:-1] != rejected[:-1]:
        return "hh-rlhf: chosen and rejected differ before the last Assistant turn"
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _read_shp(row: dict, where: str, opts: dict) -> dict | str:
    history = get_text(row, "history", where)
    a, b = get_text(row, "human_ref_A", where), get_text(row, "human_ref_B", where)
    label = get_number(row, "labels", where)
    if label not in (0, 1):
        raise DataError(f"{where}: field 'labels' must be 0 or 1, got {row['labels']!r}")
    ratio = opts.get("min_score_ratio")
    if ratio:
        sa, sb = get_number(row, "score_A", where), get_number(row, "score_B", where)
        hi, lo = max(sa, sb), min(sa, sb)
        if (hi / lo if lo > 0 else (float("inf") if hi > 0 else 1.0)) < ratio:
            return f"shp: score ratio below {ratio}"
    chosen, rejected = (a, b) if int(label) == 1 else (b, a)
    return {
        "prompt": [{"role": "user", "content": history}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


_ROW_READERS = {
    "standard": _read_standard,
    "implicit_prompt": _read_implicit,
    "conversational": _read_conversational,
    "hh-rlhf": _read_hh,
    "shp": _read_shp,
    UNPAIRED_FORMAT: read_unpaired_row,
}


def _read_oasst1(
    rows: list[tuple[str, dict]], opts: dict, bad: _BadRows, report: LoadReport
) -> tuple[list[dict], list[str]]:
    """Rebuild OpenAssistant message trees and pair sibling assistant replies by rank (0 = best).

    Default: one pair per prompter message (best vs worst ranked reply); `all_pairs=True`: every pair
    of differently ranked replies. `languages` keeps threads whose prompter message is in the list.
    Deleted messages, their subtrees, and unranked replies are left out. Returns the records and, for
    each, where its prompter message is.
    """
    nodes: dict[str, dict] = {}
    located: dict[str, str] = {}  # message id -> where its row is
    children: dict[str, list[str]] = defaultdict(list)
    for where, row in rows:
        try:
            mid = get_field(row, "message_id", where)
            role = get_text(row, "role", where)
            get_text(row, "text", where)
            if role not in ("prompter", "assistant"):
                raise DataError(f"{where}: field 'role' must be 'prompter' or 'assistant', got {role!r}")
            rank = row.get("rank")
            if isinstance(rank, float) and rank != rank:  # NaN from pandas-written files means null
                row = {**row, "rank": None}
                rank = None
            if rank is not None and not isinstance(rank, int | float):
                raise DataError(f"{where}: field 'rank' must be a number or null, got {type(rank).__name__}")
        except DataError as e:
            bad(e)
            continue
        nodes[mid], located[mid] = row, where
        if row.get("parent_id") is not None:
            children[row["parent_id"]].append(mid)

    def alive(mid: str | None) -> bool:
        return mid in nodes and not nodes[mid].get("deleted", False)

    languages = opts.get("languages")
    out, wheres = [], []
    for mid, node in nodes.items():
        if node["role"] != "prompter" or not alive(mid):
            continue
        if languages and node.get("lang") not in languages:
            report.dropped["oasst1: language filtered"] += 1
            continue
        replies = [nodes[c] for c in children.get(mid, []) if alive(c) and nodes[c].get("rank") is not None]
        replies = [r for r in replies if r["role"] == "assistant"]
        if len(replies) < 2:
            continue
        # The thread up to this message; a deleted or missing ancestor breaks it.
        thread, cur = [], mid
        while cur is not None:
            if not alive(cur):
                thread = None
                break
            thread.append(nodes[cur])
            cur = nodes[cur].get("parent_id")
        if thread is None:
            report.dropped["oasst1: thread with deleted or missing messages"] += 1
            continue
        prompt = [
            {"role": "user" if m["role"] == "prompter" else "assistant", "content": m["text"]}
            for m in reversed(thread)
        ]
        replies.sort(key=lambda r: (r["rank"], r["message_id"]))
        if opts.get("all_pairs"):
            combos = [(i, j) for i in range(len(replies)) for j in range(i + 1, len(replies))]
        else:
            combos = [(0, len(replies) - 1)]
        for i, j in combos:
            if replies[i]["rank"] == replies[j]["rank"]:
                continue
            out.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": replies[i]["text"]}],
                    "rejected": [{"role": "assistant", "content": replies[j]["text"]}],
                }
            )
            wheres.append(located[mid])
    return out, wheres


# ----------------------------------------------------------------------------------------------------
# Detection and loading


def detect_format(row: dict) -> str | None:
    """The format a row's fields imply, or None when they fit none."""
    keys = set(row)
    if {"message_id", "parent_id", "role", "text"} <= keys:
        return "oasst1"
    if {"history", "human_ref_A", "human_ref_B"} <= keys:
        return "shp"
    if is_unpaired_row(row):
        return UNPAIRED_FORMAT
    if {"chosen", "rejected"} <= keys:
        chosen, prompt = row["chosen"], row.get("prompt")
        if isinstance(chosen, list) or isinstance(prompt, list) or hasattr(chosen, "tolist"):
            return "conversational"
        if prompt is not None:
            return "standard"
        if isinstance(chosen, str) and "\n\nHuman:" in chosen and "\n\nAssistant:" in chosen:
            return "hh-rlhf"
        return "implicit_prompt"
    return None


def read_source(
    path: str,
    format: str = "auto",
    *,
    split: str | None = None,
    skip_bad_rows: bool = False,
    report: LoadReport | None = None,
    **options: Any,
) -> PreferenceRecords:
    """Read one source in one format (see module docstring); options: min_score_ratio (shp),
    all_pairs and languages (oasst1). Bad rows raise `DataError` naming file, line and field, unless
    `skip_bad_rows`, which counts them in `report`. A file holds one format: a row of text fields
    after one of message lists (or the reverse) is a bad row naming the first row of the other kind."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; known formats: auto, {', '.join(FORMATS)}")
    report = report if report is not None else LoadReport()
    bad = _BadRows(skip_bad_rows, report)
    rows: list[tuple[str, dict]] = []
    for where, row in read_rows(path, split):
        report.rows_read += 1
        if isinstance(row, DataError):
            bad(row)
        elif not isinstance(row, dict):
            bad(DataError(f"{where}: expected an object with fields, got {type(row).__name__}"))
        else:
            rows.append((where, row))
    if not rows and not report.bad_rows:
        raise DataError(f"{path}: holds no rows")
    if format == "auto":
        for _, row in rows[:100]:
            format = detect_format(row) or "auto"
            if format != "auto":
                break
        else:
            where, row = rows[0] if rows else (path, {})
            raise DataError(
                f"{where}: cannot detect the preference format from fields {sorted(row)}; expected "
                "prompt/chosen/rejected, chosen/rejected, prompt/completion/label (unpaired), "
                "history/human_ref_A/human_ref_B (shp), or "
                "message_id/parent_id/role/text (oasst1); or pass format= one of " + ", ".join(FORMATS)
            )
    report.formats[path] = format
    if format == "oasst1":
        records, wheres = _read_oasst1(rows, options, bad, report)
        return PreferenceRecords(records, report, wheres)
    reader = _ROW_READERS[format]
    out, wheres = [], []
    first: tuple[str, str] | None = None  # (where, kind) of the first good row
    for where, row in rows:
        try:
            rec = reader(row, where, options)  # the row's own errors first, then its kind
            if isinstance(rec, dict):
                rec.update(read_chat_fields(row, where))  # tools, chat_template_kwargs
            kind = _check_kind(row, where, first) if format in _ONE_READER_FOR_BOTH else None
        except DataError as e:
            bad(e)
            continue
        if first is None and kind is not None:
            first = (where, kind)
        if isinstance(rec, str):
            report.dropped[rec] += 1
        else:
            out.append(rec)
            wheres.append(where)
    return PreferenceRecords(out, report, wheres)


# Their readers take text rows and message-list rows alike (the latter through the conversational reader).
_ONE_READER_FOR_BOTH = ("standard", "implicit_prompt", "conversational")


def _row_kind(row: dict) -> str:
    values = [row.get(k) for k in ("prompt", "chosen", "rejected")]
    return "message lists" if any(isinstance(v, list) or hasattr(v, "tolist") for v in values) else "text"


def _check_kind(row: dict, where: str, first: tuple[str, str] | None) -> str:
    """The row's kind (text or message lists), which must be the first row's (`first`: its where and
    kind): read as the other kind, a row would be silently re-wrapped (text as one user / assistant turn)."""
    kind = _row_kind(row)
    if first is not None and kind != first[1]:
        raise DataError(
            f"{where}: this row's prompt / chosen / rejected are {kind}, but the file's first row "
            f"({first[0]}) has {first[1]}: a file holds one format; put the two kinds in separate files "
            "(a mixture of files is fine)"
        )
    return kind


def _split_sources(source: str | Sequence[str]) -> list[str]:
    if isinstance(source, str):
        if "," in source and not os.path.exists(source):
            return [s for s in source.split(",") if s.strip()]
        return [source]
    return list(source)


def load_preferences(
    source: str | Sequence[str],
    format: str | Sequence[str] = "auto",
    *,
    split: str | None = None,
    seed: int = 0,
    skip_bad_rows: bool = False,
    verbose: bool = False,
    **options: Any,
) -> PreferenceRecords:
    """Load preference records {"prompt", "chosen", "rejected"} from one source or a mixture.

    Args:
      source: a path / hub name, or several (a list, or one string joined with commas), each optionally
        with an amount: `path:5000` takes 5000 records, `path:0.25` a quarter; amounts above the size
        repeat records. The subset is deterministic for `seed`.
      format: "auto" or one of FORMATS, for all sources or one per source.
      split: split name for saved DatasetDicts / hub datasets / file names in a directory.
      skip_bad_rows: skip malformed rows (counted, first examples in the report) instead of raising.
      options: min_score_ratio (shp; the DPO paper used 2), all_pairs / languages (oasst1).
    Returns a list of records (mixture sources concatenated in order) with `.report` attached.
    """
    specs = [parse_source_spec(s) for s in _split_sources(source)]
    formats = [format] * len(specs) if isinstance(format, str) else list(format)
    if len(formats) != len(specs):
        raise DataError(f"{len(formats)} formats given for {len(specs)} sources")
    report = LoadReport()
    out: list[dict] = []
    wheres: list[str] = []
    for i, (spec, fmt) in enumerate(zip(specs, formats, strict=True)):
        recs = read_source(spec.path, fmt, split=split, skip_bad_rows=skip_bad_rows, report=report, **options)
        keep = spec.take(len(recs), np.random.default_rng([seed, i]))
        report.per_source[spec.path] = report.per_source.get(spec.path, 0) + len(keep)
        out.extend(recs[k] for k in keep)
        wheres.extend(recs.where[k] for k in keep)
    report.records = len(out)
    if verbose or report.bad_rows:
        print(report)
    return PreferenceRecords(out, report, wheres)


def _record_key(rec: dict, seed: int) -> bytes:
    fields = ("completion", "label") if is_unpaired(rec) else ("chosen", "rejected")
    blob = json.dumps([rec["prompt"], *(rec[f] for f in fields)], sort_keys=True).encode()
    return hashlib.sha1(seed.to_bytes(8, "little", signed=True) + blob).digest()


def split_eval(
    records: Sequence[dict], eval_size: float | int, *, seed: int = 0
) -> tuple[PreferenceRecords, PreferenceRecords]:
    """Carve a held-out split: `eval_size` a fraction (< 1) or a count of records.

    The choice hashes each record's content with the seed, so it is deterministic, does not depend on
    record order, and a record repeated by a mixture never lands on both sides. Returns (train, eval),
    each keeping the original order.
    """
    n = len(records)
    want = int(round(eval_size * n)) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    keys = [_record_key(r, seed) for r in records]
    order = sorted(range(n), key=lambda i: keys[i])
    eval_keys = {keys[i] for i in order[:want]}
    where = record_locations(records)
    sides = [[i for i in range(n) if (keys[i] in eval_keys) == is_eval] for is_eval in (False, True)]
    train, held = (PreferenceRecords([records[i] for i in s], where=[where[i] for i in s]) for s in sides)
    return train, held
