"""Benchmark assets built in-process (no network): synthetic preference pairs of two length mixes, a
32k-word tokenizer, and small random Llamas in Hugging Face format.

    python experiments/bench/assets.py --out runs/bench_assets --pairs 128 [--lengths hh|uniform]
        [--model-size 50m|20m]

The tokenizer is word-level (one token per whitespace-separated word "w<i>", BOS prepended like Llama,
EOS "</s>"), so the token counts of every prompt and completion are exactly the drawn lengths, and jdpo
and TRL tokenise every pair to the same ids. The length mixes (`LENGTHS`):
  - hh: `synthetic_hh_lengths`, chat-like with a long tail (lognormal, prompts
    median ~110 tokens, completions ~50), max_length 512;
  - uniform: short and even, prompts uniform in [17, 49] tokens (mean 33), completions in [25, 57]
    (mean 41), max_length 256.
The model sizes (`MODELS`): 50m (hidden 512, 6 layers: 52.0M parameters) and 20m (hidden 256, 4
layers: 19.6M), both vocab 32k with an untied unembedding; moe20m: 20m with each MLP replaced by 8
Mixtral experts of half its width, top-2 (the same active size, 4 x the MLP parameters). The model is
the same checkpoint for both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 32000

#: The benchmark models, vocab 32k. 50m: 52.0M parameters (35.7M in matmuls, 16.4M of it the
#: unembedding); 20m: 19.6M (11.4M in matmuls, 8.2M the unembedding).
MODELS = {
    "50m": dict(hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8, num_kv_heads=8),
    "20m": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4),
    # A mixture of experts with 20m's active size: 8 experts of 344, top-2 (2 x 344 = 688 per token).
    "moe20m": dict(hidden_size=256, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=4,
                   family="mixtral", num_experts=8, experts_per_token=2, moe_intermediate_size=344,
                   norm_topk_prob=True),  # fmt: skip
}

#: (max_length: prompt + one completion, max_prompt_length) per length mix.
LENGTHS = {"hh": (512, 256), "uniform": (256, 128)}


def synthetic_hh_lengths(
    n: int, seed: int = 0, max_length: int = 512, max_prompt_length: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt_N, chosen_N, rejected_N) token counts shaped like Anthropic hh-rlhf under a Llama-style
    tokenizer: lognormal, prompts median ~110 tokens with a long multi-turn tail, completions median
    ~50; truncated as the tokeniser would (prompt from the left, completions to max_length)."""
    rng = np.random.default_rng(seed)
    p = np.minimum(np.ceil(rng.lognormal(np.log(110), 0.9, n)), max_prompt_length).astype(np.int64)
    c = np.ceil(rng.lognormal(np.log(50), 0.9, n)).astype(np.int64)
    r = np.ceil(rng.lognormal(np.log(50), 0.9, n)).astype(np.int64)
    room = max_length - p
    return p, np.minimum(c, room), np.minimum(r, room)


def draw_lengths(n: int, seed: int, lengths: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, chosen, rejected) token counts of n pairs of the `lengths` mix, BOS and EOS included."""
    max_length, max_prompt_length = LENGTHS[lengths]
    if lengths == "hh":
        return synthetic_hh_lengths(n, seed=seed, max_length=max_length, max_prompt_length=max_prompt_length)
    rng = np.random.default_rng([seed, 2])
    return rng.integers(17, 50, n), rng.integers(25, 58, n), rng.integers(25, 58, n)


def make_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Word-level transformers fast tokenizer: <pad>=0, <s>=1, </s>=2, <unk>=3, then w0, w1, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(vocab_size - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_records(
    n: int, seed: int = 0, vocab_size: int = VOCAB_SIZE, lengths: str = "hh"
) -> list[dict[str, str]]:
    """n text pairs whose token counts (with BOS on the prompt, EOS on each completion) follow the
    `lengths` mix, already within its max lengths (neither trainer truncates)."""
    p, c, r = draw_lengths(n, seed, lengths)
    rng = np.random.default_rng([seed, 1])
    n_words = vocab_size - len(SPECIALS)

    def words(k: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, n_words, max(k, 1)))

    records = []
    for pk, ck, rk in zip(p.tolist(), c.tolist(), r.tolist(), strict=True):
        # BOS and EOS are tokens too: pk - 1 prompt words, ck - 1 completion words.
        prompt, chosen, rejected = words(pk - 1), " " + words(ck - 1), " " + words(rk - 1)
        while rejected == chosen:
            rejected = " " + words(rk - 1)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def build(
    out: str | Path, pairs: int, *, seed: int = 0, lengths: str = "hh", model_size: str = "50m"
) -> dict[str, Path]:
    """Write model_<size>/ (config, safetensors, tokenizer) and train_<lengths>_<pairs>.jsonl under
    `out` (both reused when present)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"train_{lengths}_{pairs}.jsonl"
    if not data.exists():
        with open(data, "w") as f:
            for rec in make_records(pairs, seed, lengths=lengths):
                f.write(json.dumps(rec) + "\n")
    model_dir = out / f"model_{model_size}"
    if not (model_dir / "config.json").exists():
        from jdpo.models import ModelConfig, init_model, save_pretrained

        tok = make_tokenizer()
        sizes = dict(MODELS[model_size])
        config = ModelConfig(
            family=sizes.pop("family", "llama"),
            vocab_size=VOCAB_SIZE,
            head_dim=MODELS[model_size]["hidden_size"] // MODELS[model_size]["num_heads"],
            rms_norm_eps=1e-5,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **sizes,
        )
        save_pretrained(init_model(config, seed=seed), model_dir, tokenizer=tok)
    return {"model": model_dir, "data": data}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_assets")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", choices=sorted(LENGTHS), default="hh")
    ap.add_argument("--model-size", choices=sorted(MODELS), default="50m")  # moe20m: the MoE bench
    a = ap.parse_args()
    print(build(a.out, a.pairs, seed=a.seed, lengths=a.lengths, model_size=a.model_size))
