"""Tokenisation: the prompt / completion boundary, BOS / EOS counts, truncation, drops, report, speed, and
prompts alone (`encode_prompts`, for generation) getting the ids a record's prompt gets."""

import time

import numpy as np
import pytest
from helpers_tokenizer import make_tokenizer, save_tokenizer

from jdpo.data import encode_prompts, end_of_turn_id, tokenize_preferences

TEXT = [
    {"prompt": "hello world, the answer is", "chosen": " forty two.", "rejected": " the lazy dog."},
    # A boundary where BPE would merge across it: "hel" | "lo world" tokenised together gives "hello".
    {"prompt": "hel", "chosen": "lo world", "rejected": "lo there"},
    {"prompt": "Human: how do I bake bread?\n\nAssistant:", "chosen": " Mix flour.", "rejected": " Wait."},
]


def msg(role, content):
    return {"role": role, "content": content}


CHAT = [
    {
        "prompt": [msg("system", "Be brief."), msg("user", "hello world")],
        "chosen": [msg("assistant", "hello there")],
        "rejected": [msg("assistant", "the quick brown fox")],
    },
    {
        "prompt": [msg("user", "hi"), msg("assistant", "hello"), msg("user", "the answer?")],
        "chosen": [msg("assistant", "forty two")],
        "rejected": [msg("assistant", "lazy")],
    },
]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", [None, "chatml", "chatml_bos"])
def test_boundary_prompt_plus_completion_is_what_the_model_sees(template):
    tok = make_tokenizer(template)
    records = TEXT + (CHAT if template else [])
    pairs, report = tokenize_preferences(records, tok)
    assert report.pairs_kept == len(records)
    for k, rec in enumerate(records):
        p, c, r = (
            pairs[k]["prompt_ids"].tolist(),
            pairs[k]["chosen_ids"].tolist(),
            pairs[k]["rejected_ids"].tolist(),
        )
        # Each part re-tokenises to itself: no token spans the boundary.
        for part in (p, c, r):
            text = tok.decode(part)
            assert ids(tok, text) == part, text
        if isinstance(rec["chosen"], str):
            # Text: the sequence decodes to BOS + prompt + completion + EOS, nothing lost or merged.
            assert tok.decode(p + c) == "<s>" + rec["prompt"] + rec["chosen"] + "</s>"
            assert p[1:] == ids(tok, rec["prompt"]) and c[:-1] == ids(tok, rec["chosen"])
        else:
            # Chat: prompt + completion is the template's rendering of the whole conversation (minus the
            # whitespace after the final end-of-turn token, which is never generated).
            full = tok.apply_chat_template(rec["prompt"] + rec["chosen"], tokenize=False)
            # BOS is added by the tokenizer (not in the text) unless the template writes it.
            assert tok.decode(p + c).removeprefix("<s>") == full.removeprefix("<s>").rstrip()
            assert (
                tok.decode(p + r).removeprefix("<s>")
                == tok.apply_chat_template(rec["prompt"] + rec["rejected"], tokenize=False)
                .removeprefix("<s>")
                .rstrip()
            )
    # The hel|lo case: the completion starts a new token although "hello" is one token in the vocab.
    assert tok.convert_ids_to_tokens(pairs[1]["chosen_ids"].tolist())[0] != "hello"
    assert ids(tok, "hello")[0] not in pairs[1]["prompt_ids"]


@pytest.mark.parametrize("template", [None, "chatml", "chatml_bos"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_bos_and_eos_counts(template, add_bos):
    tok = make_tokenizer(template, add_bos=add_bos)
    records = TEXT + (CHAT if template else [])
    pairs, _ = tokenize_preferences(records, tok)
    bos, eos, end_turn = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    for k, rec in enumerate(records):
        p, c, r = (pairs[k][n].tolist() for n in ("prompt_ids", "chosen_ids", "rejected_ids"))
        # Exactly one BOS when the tokenizer adds one or the template writes one; none otherwise.
        want_bos = add_bos or (template == "chatml_bos" and isinstance(rec["chosen"], list))
        assert (p + c).count(bos) == (p + r).count(bos) == int(want_bos)
        assert (p[0] == bos) == want_bos
        for comp in (c, r):
            if isinstance(rec["chosen"], str):
                assert comp[-1] == eos and comp.count(eos) == 1
            else:
                # Chat: the template's end-of-turn token closes the completion; no extra EOS.
                assert comp[-1] == end_turn and comp.count(end_turn) == 1 and eos not in comp
                assert end_turn not in p[-3:]  # the prompt ends with the assistant header


def test_messages_without_template_render_as_plain_turns():
    tok = make_tokenizer(None)
    pairs, _ = tokenize_preferences(CHAT[:1], tok)
    text = tok.decode(pairs[0]["prompt_ids"].tolist() + pairs[0]["chosen_ids"].tolist())
    assert text == "<s>Be brief.\n\nHuman: hello world\n\nAssistant: hello there</s>"


def test_autotokenizer_from_checkpoint_dir(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(save_tokenizer(tmp_path, "chatml_bos"))
    a, _ = tokenize_preferences(CHAT, tok)
    b, _ = tokenize_preferences(CHAT, make_tokenizer("chatml_bos"))
    assert a.fingerprint() == b.fingerprint()


def test_truncation_rules():
    tok = make_tokenizer()
    long_prompt = " ".join(["hello world"] * 20)
    rec = {"prompt": long_prompt, "chosen": " the quick brown fox jumps over the lazy dog", "rejected": " no"}
    full, _ = tokenize_preferences([rec], tok)
    p_full, c_full, r_full = (full[0][n].tolist() for n in ("prompt_ids", "chosen_ids", "rejected_ids"))
    pairs, report = tokenize_preferences([rec], tok, max_length=24, max_prompt_length=10)
    p, c, r = (pairs[0][n].tolist() for n in ("prompt_ids", "chosen_ids", "rejected_ids"))
    # Prompt: cut from the left to 10 tokens, keeping its BOS and its end.
    assert len(p) == 10 and p[0] == tok.bos_token_id and p[1:] == p_full[-9:]
    # Completions: cut from the right to max_length - prompt.
    assert len(p) + len(c) == 24 and c == c_full[:14]
    assert r == r_full  # short enough already, keeps its EOS
    assert report.prompts_truncated == 1 and report.completions_truncated == 1
    # No room at all for a completion -> dropped and counted.
    pairs, report = tokenize_preferences([rec], tok, max_length=24)
    assert len(pairs) == 0 and sum(report.dropped.values()) == 1
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_preferences([rec], tok, max_length=10, max_prompt_length=10)


def test_drops_and_report():
    tok = make_tokenizer()
    recs = [
        {"prompt": "a", "chosen": " b", "rejected": " c"},
        {"prompt": "a", "chosen": " same", "rejected": " same"},
        {"prompt": "a", "chosen": "  ", "rejected": " x"},
        {"prompt": [msg("user", "a")], "chosen": [], "rejected": [msg("assistant", "b")]},
        # Identical once truncated to the shared first tokens.
        {"prompt": "a", "chosen": " hello world one", "rejected": " hello world two"},
    ]
    pairs, report = tokenize_preferences(recs, tok, max_length=4)
    assert len(pairs) == 1 and pairs.source_index.tolist() == [0]
    assert report.pairs_read == 5 and report.pairs_kept == 1
    assert report.dropped["chosen == rejected"] == 1 and report.dropped["empty completion"] == 2
    assert report.dropped["chosen == rejected after tokenisation / truncation"] == 1
    p, c, r = pairs.lengths()
    assert report.tokens == int(2 * p.sum() + c.sum() + r.sum())
    text = str(report)
    assert "tokenised 1 of 5 pairs" in text and "empty completion" in text and "p50=" in text


def test_tokenising_10k_pairs_is_fast():
    tok = make_tokenizer("chatml")
    rng = np.random.default_rng(0)
    words = np.array("the quick brown fox jumps over lazy dog hello world answer bread".split())
    text = lambda n: " ".join(words[rng.integers(0, len(words), n)])  # noqa: E731
    recs = [
        {"prompt": text(30), "chosen": " " + text(15), "rejected": " " + text(12)} for _ in range(5000)
    ] + [
        {
            "prompt": [msg("user", text(30))],
            "chosen": [msg("assistant", text(15))],
            "rejected": [msg("assistant", text(9))],
        }
        for _ in range(5000)
    ]
    t0 = time.time()
    pairs, report = tokenize_preferences(recs, tok, max_length=256)
    elapsed = time.time() - t0
    assert report.pairs_kept >= 9990
    assert elapsed < 20, f"{elapsed:.1f}s for 10k pairs"  # ~2 s alone; generous for a shared 2-core box


@pytest.mark.parametrize("template", [None, "chatml"])
def test_sentencepiece_style_completions_tokenise_as_in_context(template):
    # With a dummy-prefix tokenizer "hello" alone is "▁hello", but after the prompt's "\n" it is "hello";
    # completions must get the in-context tokens, or the model is scored on text it never sees.
    tok = make_tokenizer(template, metaspace=True)
    records = [TEXT[0], TEXT[2]] + (CHAT if template else [])
    pairs, _ = tokenize_preferences(records, tok)
    for k, rec in enumerate(records):
        p, c = pairs[k]["prompt_ids"].tolist(), pairs[k]["chosen_ids"].tolist()
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
        if isinstance(rec["chosen"], str):
            assert ids(tok, rec["prompt"] + rec["chosen"]) == p[1:] + c[:-1]
        else:
            full = tok.apply_chat_template(rec["prompt"] + rec["chosen"], tokenize=False).rstrip()
            assert ids(tok, full) == p[1:] + c
            assert not tok.convert_ids_to_tokens(c)[0].startswith("▁")  # no dummy prefix mid-sequence


def test_chat_template_errors_name_the_record_or_are_skipped():
    from jdpo.data import DataError

    strict = (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = make_tokenizer(strict)
    bad = {
        "prompt": [msg("robot", "beep")],
        "chosen": [msg("assistant", "a")],
        "rejected": [msg("assistant", "b")],
    }
    with pytest.raises(DataError, match="record 1: the chat template failed.*unknown role robot"):
        tokenize_preferences([CHAT[0], bad], tok)
    pairs, report = tokenize_preferences([CHAT[0], bad], tok, skip_bad_rows=True)
    assert len(pairs) == 1 and report.dropped["chat template error"] == 1 and "record 1" in str(report)


LONG = "The quick brown fox jumps over the lazy dog. " * 6
PROMPTS = [
    "hello world, the answer is",
    "hel",
    "",
    LONG,
    "Human: how do I bake bread?\n\nAssistant:",
    [msg("user", "hello there")],
    [msg("system", "Be brief."), msg("user", "hello world")],
    [msg("user", "hi"), msg("assistant", "hello"), msg("user", "the answer?")],
    [msg("user", LONG)],
    [],
]


def bos_is_eos_tokenizer():
    """GPT-2 style: one token is both BOS and EOS, and the tokenizer adds neither."""
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer("chatml", add_bos=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = base.chat_template
    return tok


TOKENIZERS = {
    f"{t}-{'bos' if b else 'nobos'}{'-spm' if m else ''}": (
        lambda t=t, b=b, m=m: make_tokenizer(t, add_bos=b, metaspace=m)
    )
    for t in (None, "chatml", "chatml_bos")
    for b in (True, False)
    for m in (False, True)
} | {"bos_is_eos": bos_is_eos_tokenizer}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("max_prompt_length", [None, 1, 6])
def test_encode_prompts_gives_the_prompt_ids_of_tokenize_preferences(name, max_prompt_length):
    tok = TOKENIZERS[name]()
    records = [{"prompt": p, "chosen": " forty two.", "rejected": " lazy."} for p in PROMPTS]
    pairs, report = tokenize_preferences(records, tok, max_prompt_length=max_prompt_length)
    assert report.pairs_kept == len(records)
    got = encode_prompts(tok, PROMPTS, max_prompt_length=max_prompt_length)
    assert all(g.dtype == np.int32 for g in got)
    assert [g.tolist() for g in got] == [p.tolist() for p in pairs.prompt_ids]
    for p, g in zip(PROMPTS, got, strict=True):
        assert encode_prompts(tok, [p], max_prompt_length=max_prompt_length)[0].tolist() == g.tolist()
    if max_prompt_length is not None:
        assert report.prompts_truncated > 0 and max(map(len, got)) == max_prompt_length
        full = encode_prompts(tok, PROMPTS)
        for f, g in zip(full, got, strict=True):
            # Longer prompts keep their end (and their BOS).
            has_bos = int(bool(len(f)) and f[0] == tok.bos_token_id)
            keep = max_prompt_length - has_bos
            want = (
                f.tolist()
                if len(f) <= max_prompt_length
                else f[:has_bos].tolist() + f[len(f) - keep :].tolist()
            )
            assert g.tolist() == want


@pytest.mark.parametrize("template", [None, "chatml", "chatml_bos"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_encode_prompts_bos_and_template_rules(template, add_bos):
    tok = make_tokenizer(template, add_bos=add_bos)
    bos = tok.bos_token_id
    text, chat = encode_prompts(tok, ["hello there", [msg("user", "hello there")]])
    assert text.tolist() == [bos] * add_bos + ids(tok, "hello there")  # text as is
    if template:
        rendered = tok.apply_chat_template(
            [msg("user", "hello there")], tokenize=False, add_generation_prompt=True
        )
        want = ids(tok, rendered)
        assert chat.tolist() == ([bos] + want if add_bos and want[0] != bos else want)
    else:
        assert tok.decode(chat.tolist()).removeprefix("<s>") == "\n\nHuman: hello there\n\nAssistant:"
    assert chat.tolist().count(bos) == int(add_bos or template == "chatml_bos")  # exactly one BOS


def test_encode_prompts_names_bad_prompts():
    tok = make_tokenizer("chatml")
    with pytest.raises(TypeError, match="prompt 1: a prompt is a string or a list of .*messages, got int"):
        encode_prompts(tok, ["fine", 42])
    with pytest.raises(TypeError, match="got dict \\(a preference record\\? pass its 'prompt'\\)"):
        encode_prompts(tok, [{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(
        TypeError, match="prompt 0: message 1 must be a dict with 'role' and 'content' strings"
    ):
        encode_prompts(tok, [[msg("user", "hi"), {"role": "assistant"}]])
    strict = (
        "{% for m in messages %}{% if m['role'] == 'robot' %}{{ raise_exception('unknown role') }}{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(
        ValueError, match="prompt 0: the tokenizer's chat template rejected it .*unknown role"
    ):
        encode_prompts(make_tokenizer(strict), [[msg("robot", "beep")]])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        encode_prompts(None, ["hi"])


@pytest.mark.parametrize("template", [None, "chatml", "chatml_bos"])
def test_end_of_turn_id_is_what_chat_completions_end_with(template):
    tok = make_tokenizer(template)
    if template is None:
        assert end_of_turn_id(tok) is None
        return
    pairs, _ = tokenize_preferences(CHAT, tok)
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>") == pairs.chosen_ids[0][-1]


def test_without_a_template_a_role_plain_text_cannot_show_names_file_and_line():
    from jdpo.data import DataError, PreferenceRecords

    tool = {"prompt": [msg("user", "hi"), msg("tool", "42")], "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "b")]}  # fmt: skip
    recs = PreferenceRecords([CHAT[0], tool], where=["d.jsonl:1", "d.jsonl:7"])
    with pytest.raises(DataError, match=r"d\.jsonl:7: role 'tool' has no plain-text form"):
        tokenize_preferences(recs, make_tokenizer(None))
    pairs, report = tokenize_preferences(recs, make_tokenizer(None), skip_bad_rows=True)
    assert len(pairs) == 1 and report.dropped["role without a plain form"] == 1 and "d.jsonl:7" in str(report)


def test_chat_template_errors_name_file_and_line():
    from jdpo.data import DataError, PreferenceRecords

    tok = make_tokenizer("{{ raise_exception('no ' + messages[0]['role']) }}")
    recs = PreferenceRecords(CHAT[:1], where=["d.jsonl:3"])
    with pytest.raises(DataError, match=r"d\.jsonl:3: the chat template failed .*no system"):
        tokenize_preferences(recs, tok)


def test_account_split_counts_what_a_split_lost_and_refuses_an_empty_one():
    from jdpo.data import DataError, account_split

    tok = make_tokenizer()
    recs = [
        {"prompt": "a", "chosen": " b", "rejected": " c"},
        {"prompt": "a", "chosen": " s", "rejected": " s"},
        {"prompt": "hello world " * 4, "chosen": " the quick brown fox", "rejected": " no"},
    ]
    _, report = tokenize_preferences(recs, tok, max_length=8, max_prompt_length=4)
    line = account_split("train", report, too_long=1, row_length=16, source="data.train (t.jsonl)")
    assert line == (
        "train data: 1 of 3 pairs kept; dropped 1 (chosen == rejected), 1 (longer than a row of 16 tokens: "
        "raise data.row_length); truncated 1 prompts (data.max_prompt_length), 1 completion pairs "
        "(data.max_length)"
    )
    _, clean = tokenize_preferences(recs[:1], tok)
    assert account_split("eval", clean, too_long=0, row_length=16, source="data.eval (e.jsonl)") is None
    _, same = tokenize_preferences(recs[1:2], tok)
    with pytest.raises(DataError, match=r"data\.eval \(e\.jsonl\): no pairs left to evaluate on\. eval data: "
                       r"0 of 1 pairs kept; dropped 1 \(chosen == rejected\)"):  # fmt: skip
        account_split("eval", same, too_long=0, row_length=16, source="data.eval (e.jsonl)")
