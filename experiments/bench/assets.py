"""Benchmark assets built in-process (no network): hh-rlhf-shaped synthetic preference pairs, a
32k-word tokenizer, and a small random Llama in Hugging Face format.

    python experiments/bench/assets.py --out runs/bench_assets --pairs 128

The tokenizer is word-level (one token per whitespace-separated word "w<i>", BOS prepended like Llama,
EOS "</s>"), so the token counts of every prompt and completion are exactly the lengths drawn from
`jdpo.data.batching.synthetic_hh_lengths` (lognormal, prompts median ~110 tokens, completions ~50),
and jdpo and TRL tokenise every pair to the same ids. The model is the same checkpoint for both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 32000

#: The benchmark model: ~50M parameters (34M in matmuls, half of it the unembedding), vocab 32k.
MODEL = dict(hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8, num_kv_heads=8)

MAX_LENGTH = 512  # prompt + one completion
MAX_PROMPT_LENGTH = 256


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


def make_records(n: int, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> list[dict[str, str]]:
    """n text pairs whose token counts (with BOS on the prompt, EOS on each completion) follow the
    hh-rlhf-like lengths, already within MAX_LENGTH / MAX_PROMPT_LENGTH (neither trainer truncates)."""
    from jdpo.data.batching import synthetic_hh_lengths

    p, c, r = synthetic_hh_lengths(n, seed=seed, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
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


def build(out: str | Path, pairs: int, *, seed: int = 0) -> dict[str, Path]:
    """Write model/ (config, safetensors, tokenizer) and train_<pairs>.jsonl under `out` (model reused)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"train_{pairs}.jsonl"
    if not data.exists():
        with open(data, "w") as f:
            for rec in make_records(pairs, seed):
                f.write(json.dumps(rec) + "\n")
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        from jdpo.models import ModelConfig, init_model, save_pretrained

        tok = make_tokenizer()
        config = ModelConfig(
            family="llama",
            vocab_size=VOCAB_SIZE,
            head_dim=MODEL["hidden_size"] // MODEL["num_heads"],
            rms_norm_eps=1e-5,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **MODEL,
        )
        save_pretrained(init_model(config, seed=seed), model_dir, tokenizer=tok)
    return {"model": model_dir, "data": data}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_assets")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(a.out, a.pairs, seed=a.seed))
