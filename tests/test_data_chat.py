"""Today's chat data through real chat templates (tests/helpers_chat_templates.py): template kwargs (run-wide
and per row), tools, tool calls, tool results and reasoning traces. The token ids of prompt + completion are
`apply_chat_template` of the whole conversation, split at the prompt boundary; a template that cannot
render what a row uses is refused naming the row's file and line."""

import json

import pytest
from helpers_chat_templates import chat_tokenizer
from helpers_tokenizer import make_tokenizer

from jdpo.data import encode_prompts, load_preferences, prompt_texts, tokenize_preferences
from jdpo.data.sources import DataError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(city):
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


TOOL_PROMPT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [call("Paris")]},
    {"role": "tool", "name": "get_weather", "content": "sunny"},
]
TOOL_RECORD = {
    "prompt": TOOL_PROMPT,
    "chosen": [{"role": "assistant", "content": "It is sunny.", "reasoning_content": "the tool said sunny"}],
    "rejected": [{"role": "assistant", "content": "It rains.", "reasoning_content": "I guess rain"}],
    "tools": [WEATHER],
}
CALL_RECORD = {  # the completion is the tool call itself
    "prompt": [{"role": "user", "content": "weather in Rome?"}],
    "chosen": [{"role": "assistant", "content": "", "tool_calls": [call("Rome")]}],
    "rejected": [{"role": "assistant", "content": "I do not know."}],
    "tools": [WEATHER],
}
THINK_RECORD = {  # the template's own markup in the content
    "prompt": [{"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}],
    "rejected": [{"role": "assistant", "content": "<think>\nguess\n</think>\n\n5"}],
}


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def full_ids(tok, messages, kwargs):
    return encode(tok, tok.apply_chat_template(messages, tokenize=False, **kwargs))


def assert_split_of_the_whole(tok, rec, pair, kwargs):
    """prompt ids = the generation-prompt render; prompt + completion = the whole conversation's render
    (up to whitespace the template writes after its last special token, which is never generated)."""
    p, c, r = (pair[k].tolist() for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    want_p = encode(tok, tok.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True,
                                                 **kwargs))  # fmt: skip
    assert p == want_p
    for completion, got in ((rec["chosen"], c), (rec["rejected"], r)):
        whole = full_ids(tok, rec["prompt"] + completion, kwargs)
        assert whole[: len(p)] == p
        assert whole[len(p) : len(p) + len(got)] == got
        assert tok.decode(whole[len(p) + len(got) :]).strip() == ""
        assert got[-1] in tok.all_special_ids


@pytest.mark.parametrize("kind", ["qwen3", "llama31"])
def test_tools_tool_calls_and_results_render_through_the_template(kind):
    tok = chat_tokenizer(kind)
    recs = [TOOL_RECORD, CALL_RECORD] + ([THINK_RECORD] if kind == "qwen3" else [])
    if kind == "llama31":  # no reasoning field in this family's template
        recs[0] = {**TOOL_RECORD, "chosen": [{"role": "assistant", "content": "It is sunny."}],
                   "rejected": [{"role": "assistant", "content": "It rains."}]}  # fmt: skip
    pairs, report = tokenize_preferences(recs, tok)
    assert report.pairs_kept == len(recs) and report.template_fallbacks == 0
    for k, rec in enumerate(recs):
        assert_split_of_the_whole(tok, rec, pairs[k], {"tools": rec.get("tools")})
    prompt = tok.decode(pairs[0]["prompt_ids"])
    assert "get_weather" in prompt and "sunny" in prompt  # the definitions, the call and its result
    assert '"Rome"' in tok.decode(pairs[1]["chosen_ids"])  # a tool call as the completion
    if kind == "qwen3":  # reasoning kept in the completion: chosen and rejected differ in it
        assert "the tool said sunny" in tok.decode(pairs[0]["chosen_ids"])
        assert "I guess rain" in tok.decode(pairs[0]["rejected_ids"])
        assert "add them" in tok.decode(pairs[2]["chosen_ids"]) and "guess" in tok.decode(
            pairs[2]["rejected_ids"]
        )


def test_enable_thinking_from_the_run_and_per_row():
    tok = chat_tokenizer("qwen3")
    plain = {k: v for k, v in THINK_RECORD.items()}
    row_off = {**plain, "chosen": [{"role": "assistant", "content": "4"}],
               "rejected": [{"role": "assistant", "content": "5"}]}  # fmt: skip
    # Run-wide off: the prompt ends with the empty think block, the completion is the answer alone.
    pairs, _ = tokenize_preferences([row_off], tok, chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(pairs[0]["prompt_ids"]).endswith("<think>\n\n</think>\n\n")
    assert tok.decode(pairs[0]["chosen_ids"]) == "4<|im_end|>"
    assert_split_of_the_whole(tok, row_off, pairs[0], {"enable_thinking": False})
    # A row's own kwargs win over the run's: the thinking row keeps its reasoning in the completion.
    on_row = {**plain, "chat_template_kwargs": {"enable_thinking": True}}
    pairs, _ = tokenize_preferences([row_off, on_row], tok, chat_template_kwargs={"enable_thinking": False})
    assert not tok.decode(pairs[1]["prompt_ids"]).endswith("</think>\n\n")
    assert "add them" in tok.decode(pairs[1]["chosen_ids"])
    assert_split_of_the_whole(tok, on_row, pairs[1], {"enable_thinking": True})
    # encode_prompts / prompt_texts (generation, online sampling) render the prompt the same way.
    ids = encode_prompts(tok, [row_off["prompt"]], chat_template_kwargs={"enable_thinking": False})
    assert ids[0].tolist() == pairs[0]["prompt_ids"].tolist()
    row_ids = encode_prompts(tok, [on_row["prompt"]], chat_template_kwargs={"enable_thinking": False},
                             options=[on_row])  # fmt: skip
    assert row_ids[0].tolist() == pairs[1]["prompt_ids"].tolist()
    text = prompt_texts(tok, [TOOL_PROMPT], options=[{"tools": [WEATHER]}])[0]
    assert "get_weather" in text and "Weather in a city" in text


def test_reasoning_the_prompt_cannot_continue_is_refused_not_split():
    """Thinking off puts an empty think block in the prompt; a completion with reasoning cannot follow it."""
    tok = chat_tokenizer("qwen3")
    with pytest.raises(DataError, match="record 0: .*not prefix-stable"):
        tokenize_preferences([TOOL_RECORD], tok, chat_template_kwargs={"enable_thinking": False})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_carry_tools_kwargs_and_message_fields_from_files(tmp_path):
    rows = [
        {"prompt": TOOL_PROMPT, "chosen": TOOL_RECORD["chosen"], "rejected": TOOL_RECORD["rejected"],
         "tools": [WEATHER], "chat_template_kwargs": {"enable_thinking": True}},
        # A tool-call turn's content may be null; tools may be a JSON text cell.
        {"prompt": CALL_RECORD["prompt"],
         "chosen": [{"role": "assistant", "content": None, "tool_calls": [call("Rome")]}],
         "rejected": CALL_RECORD["rejected"], "tools": json.dumps([WEATHER])},
    ]  # fmt: skip
    recs = load_preferences(write_jsonl(tmp_path / "tools.jsonl", rows))
    assert recs[0]["tools"] == [WEATHER] and recs[0]["chat_template_kwargs"] == {"enable_thinking": True}
    assert recs[0]["chosen"][0]["reasoning_content"] == "the tool said sunny"
    assert (
        recs[0]["prompt"][2]["tool_calls"] == [call("Paris")]
        and recs[0]["prompt"][3]["name"] == "get_weather"
    )
    assert recs[1]["chosen"][0] == {"role": "assistant", "content": "", "tool_calls": [call("Rome")]}
    assert recs[1]["tools"] == [WEATHER]
    pairs, report = tokenize_preferences(recs, chat_tokenizer("qwen3"))
    assert report.pairs_kept == 2
    bad = [{**rows[1], "tools": {"name": "x"}}]
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'tools' must be a list"):
        load_preferences(write_jsonl(tmp_path / "bad.jsonl", bad))
    bad = [{**rows[1], "chat_template_kwargs": ["enable_thinking"]}]
    with pytest.raises(DataError, match=r"bad2\.jsonl:1: field 'chat_template_kwargs' must be an object"):
        load_preferences(write_jsonl(tmp_path / "bad2.jsonl", bad))


@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_a_template_that_cannot_render_tools_is_refused_naming_the_line(tmp_path, skip_bad_rows):
    plain = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip
    path = write_jsonl(
        tmp_path / "mix.jsonl",
        [
            plain,
            plain,
            {
                **CALL_RECORD,
                "chosen": CALL_RECORD["rejected"],
                "rejected": [{"role": "assistant", "content": "c"}],
            },
        ],
    )
    recs = load_preferences(path)
    chatml = make_tokenizer("chatml")  # renders role and content only
    with pytest.raises(DataError, match=r"mix\.jsonl:3: .*does not render tools"):
        tokenize_preferences(recs, chatml, skip_bad_rows=skip_bad_rows)
    # Reasoning a template drops, and tool calls, are refused the same way; so is a tokenizer without one.
    think = write_jsonl(tmp_path / "think.jsonl", [plain, TOOL_RECORD | {"tools": None}])
    # (ChatML writes a tool turn's content like any other turn: tool results are not refused.)
    with pytest.raises(
        DataError, match=r"think\.jsonl:2: .*does not render tool_calls, reasoning_content \("
    ):
        tokenize_preferences(load_preferences(think), chatml)
    with pytest.raises(DataError, match=r"mix\.jsonl:3: tools need a chat template"):
        tokenize_preferences(recs, make_tokenizer(None))
    with pytest.raises(ValueError, match="prompt 0: .*does not render tools"):
        encode_prompts(chatml, [[{"role": "user", "content": "hi"}]], options=[{"tools": [WEATHER]}])
    # The same rows through a template that renders them are fine.
    tokenize_preferences(recs, chat_tokenizer("llama31"))


def test_data_chat_template_kwargs_setting():
    from jdpo.config import ConfigError, load_config

    cfg = load_config(None, ["--data.chat_template_kwargs", '{"enable_thinking": false}'])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert hash(cfg.data) == hash(
        load_config(None, ["--data.chat_template_kwargs={enable_thinking: false}"]).data
    )
    with pytest.raises(TypeError, match="cannot be changed"):
        cfg.data.chat_template_kwargs["enable_thinking"] = True
    with pytest.raises(ConfigError, match="data.chat_template_kwargs: expected a mapping"):
        load_config(None, ["--data.chat_template_kwargs", "[1, 2]"])
    assert load_config().data.chat_template_kwargs == {}


def test_yaml_mapping_round_trips(tmp_path):
    from jdpo.config import dump, load_config

    (tmp_path / "run.yaml").write_text("data:\n  chat_template_kwargs: {enable_thinking: false, depth: 2}\n")
    cfg = load_config(tmp_path / "run.yaml")
    dump(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False, "depth": 2}


def test_online_and_generate_prompt_rows_carry_their_chat_fields(tmp_path):
    from jdpo.scoring.generate import read_prompts
    from jdpo.train import online

    rows = [{"messages": TOOL_PROMPT, "tools": [WEATHER]},
            {"prompt": "plain"}, {"prompt": [{"role": "user", "content": "2+2?"}],
                                  "chat_template_kwargs": {"enable_thinking": False}}]  # fmt: skip
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    prompts, wheres, options = online.read_prompts(path)
    assert prompts[0][2]["tool_calls"] == [call("Paris")] and options[0] == {"tools": [WEATHER]}
    assert options[1] == {} and options[2] == {"chat_template_kwargs": {"enable_thinking": False}}
    assert read_prompts(path, with_options=True) == (prompts, options)
    # The prompts' ids are those of a record's prompt with the same fields.
    tok = chat_tokenizer("qwen3")
    ids = online._encode(tok, prompts, wheres, 256, options=options)
    assert "get_weather" in tok.decode(ids[0]) and tok.decode(ids[2]).endswith("</think>\n\n")
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: .*does not render tools"):
        online._encode(make_tokenizer("chatml"), prompts, wheres, 256, options=options)


def test_generate_flag_parses_or_defaults_to_the_run(tmp_path):
    import argparse

    from jdpo.commands.cli_inference import chat_template_kwargs
    from jdpo.config import dump, load_config

    parser = argparse.ArgumentParser()
    args = argparse.Namespace(
        chat_template_kwargs='{"enable_thinking": false}', model=str(tmp_path / "final")
    )
    assert chat_template_kwargs(args, parser) == {"enable_thinking": False}
    args.chat_template_kwargs = None
    assert chat_template_kwargs(args, parser) == {}  # not a run's export
    dump(
        load_config(None, ["--data.chat_template_kwargs={enable_thinking: false}"]), tmp_path / "config.yaml"
    )
    assert chat_template_kwargs(args, parser) == {"enable_thinking": False}  # the run's setting
    args.chat_template_kwargs = "[1]"
    with pytest.raises(SystemExit):
        chat_template_kwargs(args, parser)
