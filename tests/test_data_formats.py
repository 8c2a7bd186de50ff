"""Format readers on hand-written fixtures, prompt extraction, sources, mixtures, eval split, bad input."""

import json
import re
import time
from pathlib import Path

import pytest

from jdpo.data import (
    DataError,
    detect_format,
    extract_prompt,
    load_preferences,
    parse_source_spec,
    split_eval,
)

FIX = Path(__file__).parent / "fixtures"


def msg(role, content):
    return {"role": role, "content": content}


def test_standard():
    recs = load_preferences(str(FIX / "standard.jsonl"))
    assert recs.report.formats[str(FIX / "standard.jsonl")] == "standard"
    assert len(recs) == 3
    assert recs[0] == {
        "prompt": "What colour is a ripe banana?",
        "chosen": " Yellow, with a few brown spots.",
        "rejected": " Purple.",
    }
    assert set(recs[2]) == {"prompt", "chosen", "rejected"}  # extra columns are not carried


def test_implicit_prompt():
    recs = load_preferences(str(FIX / "implicit_prompt.jsonl"))
    assert recs.report.formats[str(FIX / "implicit_prompt.jsonl")] == "implicit_prompt"
    # Cut right after the assistant marker, not at the longest common prefix ("...Assistant: ").
    assert recs[0]["prompt"] == "User: Is tea hot?\nAssistant:"
    assert recs[0]["chosen"] == " Usually, yes, it is served hot."
    assert recs[0]["rejected"] == " Never."
    # No turn marker: cut at a word boundary ("Oslo" / "Bergen" share no prefix letter here anyway).
    assert recs[1] == {
        "prompt": "The capital of Norway is",
        "chosen": " Oslo.",
        "rejected": " Bergen.",
    }


@pytest.mark.parametrize(
    "chosen, rejected, prompt",
    [
        ("The answer is 42.", "The answer is 43.", "The answer is"),  # never cut mid-word
        ("\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman: hi\n\nAssistant: hey", "\n\nHuman: hi\n\nAssistant:"),
        ("abc", "xyz", ""),
        ("same start", "same start and more", "same start"),
    ],
)
def test_extract_prompt(chosen, rejected, prompt):
    p, c, r = extract_prompt(chosen, rejected)
    assert p == prompt
    assert p + c == chosen and p + r == rejected


def test_conversational_strips_prompt_turns():
    recs = load_preferences(str(FIX / "conversational.jsonl"))
    assert recs.report.formats[str(FIX / "conversational.jsonl")] == "conversational"
    # UltraFeedback-binarized style: text prompt, chosen / rejected repeat the user turn.
    assert recs[0] == {
        "prompt": [msg("user", "How many legs does a spider have?")],
        "chosen": [msg("assistant", "Eight.")],
        "rejected": [msg("assistant", "Six.")],
    }
    assert recs[1]["prompt"][0] == msg("system", "You are terse.")
    assert recs[1]["chosen"] == [msg("assistant", "Simmer it for nine minutes.")]


def test_conversational_implicit_prompt_json_array():
    recs = load_preferences(str(FIX / "conversational_implicit.json"))
    (rec,) = recs
    assert [m["role"] for m in rec["prompt"]] == ["user", "assistant", "user"]
    assert rec["chosen"] == [msg("assistant", "Sir Finnegan Goldscale.")]
    assert rec["rejected"] == [msg("assistant", "Fish.")]


def test_hh_rlhf():
    recs = load_preferences(str(FIX / "hh_rlhf.jsonl"))
    assert recs.report.formats[str(FIX / "hh_rlhf.jsonl")] == "hh-rlhf"
    assert len(recs) == 2
    assert recs.report.dropped == {"hh-rlhf: chosen and rejected differ before the last Assistant turn": 1}
    assert recs[0] == {
        "prompt": [msg("user", "What is a good first houseplant?")],
        "chosen": [msg("assistant", "A pothos: it forgives missed waterings.")],
        "rejected": [msg("assistant", "A bonsai, they are easy.")],
    }
    assert [m["role"] for m in recs[1]["prompt"]] == ["user", "assistant", "user"]
    assert recs[1]["rejected"] == [msg("assistant", "Owls are fish.")]


def test_shp_csv_and_score_ratio():
    path = str(FIX / "shp.csv")
    recs = load_preferences(path)
    assert recs.report.formats[path] == "shp"
    assert len(recs) == 3
    assert recs[0]["chosen"] == [msg("assistant", "Curiosity and play, mostly.")]  # labels 1 -> A
    assert recs[1]["chosen"] == [msg("assistant", "Practise one knot a day with a rope.")]  # labels 0 -> B
    assert recs[0]["prompt"] == [msg("user", "Why do cats knock things off tables?\nGenuinely curious.")]
    # The DPO paper kept pairs whose scores differ by a factor of 2 or more: 5 vs 4 goes.
    recs = load_preferences(path, min_score_ratio=2.0)
    assert len(recs) == 2 and recs.report.dropped == {"shp: score ratio below 2.0": 1}


def test_oasst1_trees():
    path = str(FIX / "oasst1.jsonl")
    recs = load_preferences(path)
    assert recs.report.formats[path] == "oasst1"
    by_prompt = {tuple(m["content"] for m in r["prompt"]): r for r in recs}
    haiku = by_prompt[("Write a haiku about frost.",)]
    assert haiku["chosen"][0]["content"].startswith("Silver on the grass")  # rank 0
    assert haiku["rejected"][0]["content"] == "Frost is cold."  # worst live rank (deleted rank 3 skipped)
    rain = by_prompt[("Write a haiku about frost.", haiku["chosen"][0]["content"], "Now one about rain.")]
    assert [m["role"] for m in rain["prompt"]] == ["user", "assistant", "user"]
    assert rain["rejected"] == [msg("assistant", "Rain rain rain.")]
    assert len(recs) == 3  # haiku, rain, German; the single-reply thread gives none
    assert len(load_preferences(path, all_pairs=True)) == 3 + 1 + 1  # haiku: 3 ranked replies -> 3 pairs
    only_de = load_preferences(path, languages=["de"])
    assert len(only_de) == 1 and only_de[0]["chosen"][0]["content"] == "Ich habe keine Uhr."


def test_detect_format_and_forced_format():
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "standard"
    assert detect_format({"chosen": "a b", "rejected": "a c"}) == "implicit_prompt"
    assert detect_format({"chosen": [msg("user", "x")], "rejected": []}) == "conversational"
    assert detect_format({"x": 1}) is None
    recs = load_preferences(str(FIX / "hh_rlhf.jsonl"), format="implicit_prompt")
    assert recs[0]["prompt"].endswith("\n\nAssistant:")  # text, not messages


def test_parquet_and_saved_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(FIX / "standard.jsonl")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_preferences(str(tmp_path / "d.parquet")) == load_preferences(str(FIX / "standard.jsonl"))
    conv = [json.loads(line) for line in open(FIX / "conversational.jsonl")]
    conv[0]["prompt"] = [msg("user", conv[0]["prompt"])]  # one column type for Arrow
    dsd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(conv), "test": datasets.Dataset.from_list(conv[:1])}
    )
    dsd.save_to_disk(str(tmp_path / "saved"))
    assert len(load_preferences(str(tmp_path / "saved"))) == 2
    test = load_preferences(str(tmp_path / "saved"), split="test")
    assert test[0]["chosen"] == [msg("assistant", "Eight.")]


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(DataError, match="Pass a local path"):
        load_preferences("someone/some-preferences")
    assert time.time() - t0 < 5
    with pytest.raises(DataError, match="no such file"):
        load_preferences("./missing.jsonl")


def test_mixture_counts_fractions_deterministic():
    std, hh = str(FIX / "standard.jsonl"), str(FIX / "hh_rlhf.jsonl")
    assert parse_source_spec("a.jsonl:5000").count == 5000
    assert parse_source_spec("a.jsonl:0.25").fraction == 0.25
    assert parse_source_spec("org/name").count is None
    mix = load_preferences(f"{std}:2,{hh}:0.5", seed=3)
    assert len(mix) == 2 + 1
    assert mix == load_preferences([f"{std}:2", f"{hh}:0.5"], seed=3)
    assert mix.report.per_source == {std: 2, hh: 1}
    seeds = {json.dumps(load_preferences(f"{std}:1", seed=s)[0]) for s in range(10)}
    assert len(seeds) > 1  # the subset depends on the seed
    up = load_preferences(f"{std}:7", seed=0)  # more than the source holds: repeats
    assert len(up) == 7 and up[:3] == load_preferences(std)


def test_split_eval_deterministic():
    recs = load_preferences([str(FIX / "standard.jsonl"), str(FIX / "hh_rlhf.jsonl")])
    train, held = split_eval(recs, 0.4, seed=0)
    assert len(held) == 2 and len(train) == 3
    assert (train, held) == split_eval(recs, 0.4, seed=0)
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, recs))
    # Independent of the order of the records.
    train2, held2 = split_eval(list(reversed(recs)), 0.4, seed=0)
    assert sorted(map(json.dumps, held2)) == sorted(map(json.dumps, held))
    assert len(split_eval(recs, 1, seed=0)[1]) == 1


# ----------------------------------------------------------------------------------------------------
# Bad input: stop with file, line and field named, or skip and count


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


GOOD = '{"prompt": "p", "chosen": "c", "rejected": "r"}\n'


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"prompt": "p", "chosen": "c", "rejected": ', r"bad\.jsonl:2: malformed JSON"),
        ('{"prompt": "p", "chosen": "c"}', r"bad\.jsonl:2: missing field 'rejected'"),
        ('{"prompt": "p", "chosen": 3, "rejected": "r"}', r"bad\.jsonl:2: field 'chosen' must be text"),
        (
            '{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}',
            r"bad\.jsonl:2: field 'chosen' message 0 'content' must be text",
        ),
        ("[1, 2]", r"bad\.jsonl:2: expected an object"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, line, pattern):
    path = write(tmp_path, "bad.jsonl", GOOD + line + "\n" + GOOD)
    with pytest.raises(DataError, match=pattern):
        load_preferences(path)


def test_skip_bad_rows_counts_and_prints(tmp_path, capsys):
    path = write(tmp_path, "bad.jsonl", GOOD + "{oops\n" + GOOD + '{"prompt": "p"}\n')
    recs = load_preferences(path, skip_bad_rows=True)
    assert len(recs) == 2 and recs.report.bad_rows == 2
    out = capsys.readouterr().out
    assert "skipped 2 bad rows" in out and "bad.jsonl:2" in out and "bad.jsonl:4" in out


def test_unknown_and_undetectable_format(tmp_path):
    with pytest.raises(DataError, match="unknown format 'dpo'"):
        load_preferences(str(FIX / "standard.jsonl"), format="dpo")
    path = write(tmp_path, "x.jsonl", '{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:1: cannot detect the preference format.*question"):
        load_preferences(path)
    with pytest.raises(DataError, match="unsupported file type"):
        load_preferences(write(tmp_path, "x.txt", "hello"))


def test_bad_shp_and_oasst_rows(tmp_path):
    path = write(
        tmp_path,
        "s.jsonl",
        '{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 2, "score_A": 1, "score_B": 1}\n',
    )
    with pytest.raises(DataError, match=r"s\.jsonl:1: field 'labels' must be 0 or 1"):
        load_preferences(path)
    path = write(tmp_path, "o.jsonl", '{"message_id": "m", "parent_id": null, "role": "bot", "text": "t"}\n')
    with pytest.raises(DataError, match=r"o\.jsonl:1: field 'role' must be 'prompter' or 'assistant'"):
        load_preferences(path)


def test_csv_message_cells_and_json_variants(tmp_path):
    conv = tmp_path / "conv.csv"
    conv.write_text(
        "prompt,chosen,rejected\n"
        '"[{""role"": ""user"", ""content"": ""hi""}]",'
        '"[{""role"": ""assistant"", ""content"": ""hello""}]",'
        '"[{""role"": ""assistant"", ""content"": ""go away""}]"\n'
    )
    (rec,) = load_preferences(str(conv))
    assert rec == {"prompt": [msg("user", "hi")], "chosen": [msg("assistant", "hello")],
                   "rejected": [msg("assistant", "go away")]}  # fmt: skip
    columns = write(
        tmp_path,
        "cols.json",
        json.dumps({"prompt": ["a", "b"], "chosen": [" x", " y"], "rejected": [" z", " w"]}),
    )
    assert [r["chosen"] for r in load_preferences(columns)] == [" x", " y"]
    wrapped = write(
        tmp_path, "wrapped.json", json.dumps({"data": [{"prompt": "a", "chosen": " x", "rejected": " z"}]})
    )
    assert len(load_preferences(wrapped)) == 1
    lines = write(tmp_path, "lines.json", GOOD + GOOD)  # JSON lines under a .json name
    assert len(load_preferences(lines)) == 2
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "a_train.jsonl").write_text(GOOD)
    (directory / "b_test.jsonl").write_text(GOOD + GOOD)
    assert len(load_preferences(str(directory))) == 3
    assert len(load_preferences(str(directory), split="test")) == 2
    with pytest.raises(DataError, match="holds no rows"):
        load_preferences(write(tmp_path, "empty.jsonl", "\n"))


# ----------------------------------------------------------------------------------------------------
# Encodings, roles, mixed formats, where each record came from


def test_invalid_utf8_names_file_and_line_or_is_skipped(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(GOOD.encode() + b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}\n' + GOOD.encode())
    with pytest.raises(
        DataError, match=r"bad\.jsonl:2: not valid UTF-8 \(byte 0xff at byte 14 of the line\)"
    ):
        load_preferences(str(p))
    recs = load_preferences(str(p), skip_bad_rows=True)
    assert len(recs) == 2 and recs.report.bad_rows == 1 and recs.where == [f"{p}:1", f"{p}:3"]
    # A whole-file format names the line too.
    j = tmp_path / "bad.json"
    j.write_bytes(b'[{"prompt": "p", "chosen": "c", "rejected": "r"},\n{"prompt": "\xc3"}]')
    with pytest.raises(DataError, match=r"bad\.json:2: not valid UTF-8"):
        load_preferences(str(j))


@pytest.mark.parametrize(
    "name, text",
    [
        ("bom.jsonl", GOOD * 2),
        ("bom.json", "[" + GOOD + "," + GOOD + "]"),
        ("bom.csv", "prompt,chosen,rejected\np,c,r\np,c,r\n"),
    ],
)
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, text):
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    recs = load_preferences(str(p))
    assert [r["prompt"] for r in recs] == ["p", "p"]


def test_an_unknown_role_names_file_and_line(tmp_path):
    row = '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "asistant", "content": "a"}], '
    row += '"rejected": [{"role": "assistant", "content": "b"}]}\n'
    good = row.replace("asistant", "assistant")
    path = write(tmp_path, "roles.jsonl", good + row)
    with pytest.raises(DataError, match=r"roles\.jsonl:2: field 'chosen' message 0 has role 'asistant'"):
        load_preferences(path)
    assert len(load_preferences(path, skip_bad_rows=True)) == 1


CONV = '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}], '
CONV += '"rejected": [{"role": "assistant", "content": "b"}]}\n'


@pytest.mark.parametrize("first, other, kinds", [(GOOD, CONV, "message lists.*has text"),
                                                 (CONV, GOOD, "text.*has message lists")])  # fmt: skip
def test_a_file_mixing_text_and_message_rows_names_the_first_row_that_differs(tmp_path, first, other, kinds):
    path = write(tmp_path, "mixed.jsonl", first + first + other + first + other)
    with pytest.raises(DataError, match=rf"mixed\.jsonl:3: this row's .* are {kinds}"):
        load_preferences(path)


def test_records_know_where_they_came_from_through_mixtures_and_splits(tmp_path):
    lines = "".join(f'{{"prompt": "p{i}", "chosen": "c", "rejected": "r"}}\n' for i in range(1, 7))
    a = write(tmp_path, "a.jsonl", lines)  # prompt p<i> on line i
    b = write(tmp_path, "b.jsonl", "\n" + GOOD)  # a blank first line: its record is on line 2

    def located(part):
        return all(w == (f"{b}:2" if r["prompt"] == "p" else f"{a}:{r['prompt'][1:]}")
                   for r, w in zip(part, part.where, strict=True))  # fmt: skip

    recs = load_preferences([a + ":3", b + ":2"], seed=0)  # a subset of a, b repeated
    assert len(recs) == 5 and located(recs)
    train, held = split_eval(recs, 2, seed=0)
    assert len(held) == 2 and located(train) and located(held)


@pytest.mark.parametrize("amount", ["-5", "-0.5", "+3", "1e3"])
def test_a_bad_amount_is_named_not_sent_to_the_hub(amount):
    """Smaller messages of issue 31: `path:-5` said the hub is unreachable; a source name never has a
    numeric-looking ':' suffix, so it is an amount, refused with the valid forms."""
    std = str(FIX / "standard.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{std}:{amount}: the amount after ':' must be")):
        load_preferences(f"{std}:{amount}")
    with pytest.raises(DataError, match=r"a count \(:100\) or a fraction \(:0\.5\)"):
        parse_source_spec(f"a.jsonl:{amount}")
