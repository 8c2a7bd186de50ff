"""jdpo.scoring.generate: the KV cache equals full recomputation, parity with transformers' generate,
stopping, ragged batches, one compiled decode step, sharding, chat prompts, the sampler and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_model, tiny_hf_config
from helpers_tokenizer import make_tokenizer

from jdpo.models import ModelConfig, Transformer, from_pretrained, save_pretrained
from jdpo.scoring.generate import Generator, SamplingParams, read_prompts, sample_logits, step_cache_size

V = 320  # the test BPE tokenizer has 300 ids; a little room on top like real vocabularies
# gemma2's window of 3 is far below the prompt + generated length, on alternating local/global layers.
CONFIGS = {family: tiny_hf_config(family, vocab_size=V) for family in ("llama", "gemma2", "qwen3")}
# The 2025-26 families (issue 28): per-layer windows and RoPE kinds, post-norms, fused projections.
_LOCAL_GLOBAL = ["sliding_attention", "full_attention"]
CONFIGS.update(
    gemma3_text=tiny_hf_config(
        "gemma2",
        model_type="gemma3_text",
        vocab_size=V,
        layer_types=_LOCAL_GLOBAL,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    olmo3=tiny_hf_config(
        "llama",
        model_type="olmo3",
        vocab_size=V,
        sliding_window=3,
        layer_types=_LOCAL_GLOBAL,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    smollm3=tiny_hf_config("llama", model_type="smollm3", vocab_size=V, no_rope_layers=[0, 1]),
    phi3=tiny_hf_config("llama", model_type="phi3", vocab_size=V, sliding_window=4),
    # mixtures of experts (issue 29): a dense layer among the MoE ones, a sliding window on every layer
    qwen3_moe=tiny_hf_config(
        "qwen3",
        model_type="qwen3_moe",
        vocab_size=V,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        mlp_only_layers=[0],
    ),
    mixtral=tiny_hf_config(
        "llama", model_type="mixtral", vocab_size=V, num_local_experts=4, sliding_window=4
    ),
    gpt_oss=tiny_hf_config(
        "llama",
        model_type="gpt_oss",
        vocab_size=V,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=3,
    ),
)
PROMPTS = [np.array([1, 17, 99, 4, 250, 31, 77], np.int32), np.array([1, 5], np.int32), np.arange(1, 12)]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


def tiny_model(name: str, *, scan_layers: bool = False, seed: int = 0) -> Transformer:
    """A model of CONFIGS[name] with numpy-random weights N(0, 0.2^2) (`helpers.random_model`)."""
    return random_model(ModelConfig.from_hf(CONFIGS[name]), seed=seed, scale=0.2, scan_layers=scan_layers)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llama_dir(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gen")
    save_pretrained(llama, path, tokenizer=make_tokenizer(chat_template="chatml"))
    return path


def _full_logits(model, prompts, tokens_BxN):
    """Logits of every generated step by one full forward (no cache): right-padded rows in segment 1."""
    rows = [np.concatenate([p, t]) for p, t in zip(prompts, tokens_BxN, strict=True)]
    T = max(map(len, rows))
    ids, seg = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)], seg[b, : len(r)] = r, 1
    logits = np.asarray(nnx.jit(lambda m, i, s: m(i, None, s))(model, ids, seg))
    N = tokens_BxN.shape[1]
    return np.stack([logits[b, len(p) - 1 : len(p) - 1 + N] for b, p in enumerate(prompts)])


@pytest.mark.parametrize(
    "name,scan",
    # the unscanned gemma2 and gemma3_text are slow (5-6 s each): their scanned cases run the same cache
    [("llama", False), pytest.param("gemma2", False, marks=pytest.mark.slow), ("qwen3", False),
     ("gemma2", True), pytest.param("gemma3_text", False, marks=pytest.mark.slow), ("gemma3_text", True),
     ("olmo3", True),
     ("smollm3", True), ("phi3", False), ("qwen3_moe", False), ("mixtral", True), ("gpt_oss", False)],
)  # fmt: skip
def test_cache_equals_full_recomputation(name, scan):
    model = tiny_model(name, scan_layers=scan)
    gen = Generator(model, stop_ids=[], pad_id=0)
    out = gen.generate_ids(PROMPTS, GREEDY, return_logits=True)
    full = _full_logits(model, PROMPTS, out.tokens)
    np.testing.assert_allclose(out.logits, full, atol=2e-5, rtol=0)
    # Greedy: every token is the argmax of the recomputed logits of its step.
    np.testing.assert_array_equal(out.tokens, full.argmax(-1))
    assert (out.lengths == GREEDY.max_new_tokens).all() and not out.finished.any()


def test_ragged_batch_equals_one_by_one(llama):
    gen = Generator(llama, stop_ids=[], pad_id=0)
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.95, seed=3)
    batch = gen.generate_ids(PROMPTS, sampled, return_logits=True)
    for b, p in enumerate(PROMPTS):
        one = gen.generate_ids([p], sampled, return_logits=True, rows=[b])
        np.testing.assert_array_equal(one.tokens[0], batch.tokens[b])  # per-prompt PRNG streams
        np.testing.assert_allclose(one.logits[0], batch.logits[b], atol=1e-5, rtol=0)
    again = gen.generate_ids(PROMPTS, sampled)
    np.testing.assert_array_equal(again.tokens, batch.tokens)  # deterministic for a seed
    other = gen.generate_ids(PROMPTS, SamplingParams(**{**sampled.__dict__, "seed": 4}))
    assert (other.tokens != batch.tokens).any()


def test_stop_token_ends_a_row_and_pads_it(llama):
    free = Generator(llama, stop_ids=[], pad_id=0).generate_ids(PROMPTS, GREEDY)
    stop = int(free.tokens[0, 2])  # row 0 produces this token at step 2 (maybe earlier too)
    out = Generator(llama, stop_ids=[stop], pad_id=0).generate_ids(PROMPTS, GREEDY)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(free.tokens[b] == stop)
        n = hits[0] + 1 if len(hits) else GREEDY.max_new_tokens
        assert out.lengths[b] == n and out.finished[b] == bool(len(hits))
        np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
        assert (out.tokens[b, n:] == 0).all()
    assert out.finished[0] and out.lengths[0] <= 3


def test_one_compiled_decode_step_for_every_token(llama):
    gen = Generator(llama, stop_ids=[], pad_id=0)
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
    streamed = list(gen.stream_ids(PROMPTS[0], sampling))
    assert len(streamed) == 12
    assert step_cache_size(gen, sampling) == 1
    streamed += list(gen.stream_ids(PROMPTS[2], sampling))  # another prompt of the same bucket
    assert step_cache_size(gen, sampling) == 1
    looped = gen.generate_ids([PROMPTS[0]], sampling)
    assert streamed[:12] == looped.tokens[0].tolist()


def test_sharded_generation_equals_one_device(llama_dir):
    from jdpo.parallel.sharding import make_mesh

    assert jax.device_count() == 8
    one = Generator.from_pretrained(llama_dir, stop_ids=[], pad_id=0)
    mesh = make_mesh(2, 2, 2)
    sharded = Generator.from_pretrained(llama_dir, mesh=mesh, stop_ids=[], pad_id=0)
    assert len(sharded.params["layers"][0]["mlp"]["up_proj"]["kernel"][...].sharding.device_set) == 8
    sampling = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=1)  # logits and PRNG
    a = one.generate_ids(PROMPTS, sampling, return_logits=True)
    b = sharded.generate_ids(PROMPTS, sampling, return_logits=True)  # 3 rows padded to 4 over 2 x 2
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)


# gemma3: a window of 4 on the local layer, far below prompt + generated length, and each kind of layer
# with its own RoPE base (the global one scaled).
_HF_GENERATE = {
    "llama": dict(eos_token_id=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, eos_token_id=113),  # one row stops early
    "gemma3_text": dict(
        head_dim=8,
        sliding_window=4,
        layer_types=_LOCAL_GLOBAL,
        query_pre_attn_scalar=8,
        final_logit_softcapping=5.0,
        tie_word_embeddings=False,
        eos_token_id=22,  # a token the greedy rows reach: one row stops early
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
}


@pytest.mark.parametrize("family", list(_HF_GENERATE))
def test_matches_transformers_generate(tmp_path, family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(
        family, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
        pad_token_id=0, **_HF_GENERATE[family],
    )  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model, _ = from_pretrained(tmp_path)
    eos = _HF_GENERATE[family]["eos_token_id"]
    gen = Generator(model, stop_ids=[eos], pad_id=0)
    prompts = [np.array([1, 17, 99, 4, 50, 31, 77]), np.array([1, 5, 9]), np.array([1, 64, 3, 8, 21])]
    N, B, T = 8, len(prompts), 7
    out = gen.generate_ids(prompts, SamplingParams(max_new_tokens=N, temperature=0.0), return_logits=True)

    ids = np.zeros((B, T), np.int64)  # transformers' own left padding
    mask = np.zeros((B, T), np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :], mask[b, T - len(p) :] = p, 1
    with torch.no_grad():
        res = hf.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
            max_new_tokens=N, eos_token_id=eos, pad_token_id=0, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    hf_tokens = res.sequences[:, T:].numpy()  # pad after EOS, like ours; may stop before N when all finished
    hf_logits = np.stack([x.numpy() for x in res.logits], axis=1)  # [B, N', V], before any processing
    n = hf_tokens.shape[1]
    np.testing.assert_array_equal(out.tokens[:, :n], hf_tokens)
    assert (out.tokens[:, n:] == 0).all()
    assert out.finished.any() and out.lengths.max() > 3  # EOS and a longer row are both exercised
    for b in range(B):
        np.testing.assert_allclose(
            out.logits[b, : out.lengths[b]], hf_logits[b, : out.lengths[b]], atol=1e-4, rtol=0
        )


def test_chat_prompts_use_the_template_with_one_bos(llama):
    tok = make_tokenizer(chat_template="chatml_bos")  # the template writes BOS itself
    gen = Generator(llama, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert set(gen.stop_ids) >= {tok.eos_token_id, im_end}
    messages = [{"role": "user", "content": "hello there"}]
    (ids,) = gen.encode_prompts([messages])
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    (plain,) = Generator(llama, make_tokenizer()).encode_prompts(["hello there"])
    assert plain.tolist() == make_tokenizer()("hello there")["input_ids"]  # text: the tokenizer's one BOS

    out = gen.generate([messages, "The quick brown"], SamplingParams(max_new_tokens=5, temperature=0.0))
    assert [o["prompt"] for o in out] == [messages, "The quick brown"]
    for o in out:
        assert len(o["tokens"]) <= 5 and o["completion"] == tok.decode(o["tokens"], skip_special_tokens=True)
    pieces = "".join(gen.stream("The quick brown", SamplingParams(max_new_tokens=5, temperature=0.0)))
    assert pieces == out[1]["completion"]


def test_chat_template_kwargs_and_row_options_reach_the_prompt(llama):
    from helpers_chat_templates import chat_tokenizer

    tok = chat_tokenizer("qwen3")
    messages = [{"role": "user", "content": "hello there"}]
    off = Generator(llama, tok, chat_template_kwargs={"enable_thinking": False})
    (ids,) = off.encode_prompts([messages])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    (row_on,) = off.encode_prompts([messages], options=[{"chat_template_kwargs": {"enable_thinking": True}}])
    assert tok.decode(row_on).endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in off.stop_ids
    out = off.generate([messages], SamplingParams(max_new_tokens=2, temperature=0.0), options=[{}])
    assert len(out[0]["tokens"]) <= 2


@pytest.mark.parametrize("template", [None, "chatml", "chatml_bos"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_encode_prompts_are_the_prompt_ids_training_sees(llama, template, add_bos):
    from jdpo.data import encode_prompts, tokenize_preferences

    tok = make_tokenizer(chat_template=template, add_bos=add_bos)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    long = "The quick brown fox jumps over the lazy dog. " * 6
    prompts = ["12+35=", long, user("hello there"), user(long), [{"role": "system", "content": "Be brief."}]]
    records = [{"prompt": p, "chosen": " yes", "rejected": " no"} for p in prompts]
    gen = Generator(llama, tok)
    for max_prompt_length in (None, 8):
        pairs, _ = tokenize_preferences(records, tok, max_prompt_length=max_prompt_length)
        got = gen.encode_prompts(prompts, max_prompt_length=max_prompt_length)
        assert [g.tolist() for g in got] == [p.tolist() for p in pairs.prompt_ids]
        assert [g.tolist() for g in got] == [
            p.tolist() for p in encode_prompts(tok, prompts, max_prompt_length=max_prompt_length)
        ]
    with pytest.raises(TypeError, match="prompt 0: a prompt is a string or a list"):
        gen.encode_prompts([("user", "hi")])


def test_sampler_filters():
    logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 256, np.float32)))
    keys = jax.random.split(jax.random.key(0), 256)
    greedy = sample_logits(logits, keys, temperature=0.0, top_k=0, top_p=1.0)
    assert (np.asarray(greedy) == 0).all()
    top2 = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=2, top_p=1.0))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=0, top_p=0.7))  # 0.5 + 0.3 >= 0.7
    assert set(nucleus.tolist()) == {0, 1}
    assert set(np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=0, top_p=0.4)).tolist()) == {0}
    free = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=0, top_p=1.0))
    assert set(free.tolist()) == {0, 1, 2, 3} and abs((free == 0).mean() - 0.5) < 0.1
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_read_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "a+b="}) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]})
    )
    assert read_prompts(tmp_path / "p.jsonl") == ["a+b=", [{"role": "user", "content": "x"}]]
    (tmp_path / "p.txt").write_text("first line\n\nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == ["first line", "second"]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")


def test_cli_generate(llama_dir, tmp_path, capsys):
    from jdpo.cli import main

    assert main(["generate", "--model", str(llama_dir), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    streamed = capsys.readouterr().out
    (tmp_path / "prompts.txt").write_text("hello\nThe quick brown fox\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(llama_dir), "--prompts", str(tmp_path / "prompts.txt")]
    assert main([*args, "--max-new-tokens", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "The quick brown fox"]
    assert streamed == rows[0]["completion"] + "\n"


def test_mesh_argument_names_any_axis(capsys):
    import argparse

    from jdpo.commands.cli_inference import mesh_arg

    parser = argparse.ArgumentParser()
    shape = lambda value: dict(mesh_arg(value, parser).shape)  # noqa: E731
    assert shape("1,-1,1") == dict(data=1, fsdp=8, tensor=1, expert=1, context=1)
    assert shape("1,2,1,4") == dict(data=1, fsdp=2, tensor=1, expert=1, context=4)
    assert shape("2,1,1,expert=4") == dict(data=2, fsdp=1, tensor=1, expert=4, context=1)
    assert shape("1,1,1,2,expert=2") == dict(data=1, fsdp=1, tensor=1, expert=2, context=2)
    bad = {
        "1,1,expert=2": "2 positional sizes",
        "expert=2,1,1,1": "come after",
        "1,1,1,router=2": "no mesh axis 'router'",
        "1,1,1,data=2": "the data axis is given twice",
    }
    for value, why in bad.items():
        with pytest.raises(SystemExit):
            mesh_arg(value, parser)
        assert why in capsys.readouterr().err
