"""First start vs second start of an offline run's data stage, with the tokenised-data cache
(`jdpo.train.token_cache`), on a synthetic mix of text and chat pairs.

    python experiments/bench/token_cache.py --pairs 200000 --out runs/bench_token_cache

Builds in --out (no network): a byte-level BPE tokenizer (8k vocabulary, trained here) with a ChatML
template, and two JSONL files of --pairs / 2 pairs each: text pairs (prompt, chosen, rejected) and chat
pairs (message lists), with the uniform length mix of `assets.draw_lengths` (prompts ~33 words,
completions ~41). Then times `OfflineData.load` (read, tokenise, split off 1% for eval, lay out) three
times in this process: without the cache (`data.token_cache: false`), the first start (tokenise and
write the entry) and the second start (read the verified entry), and prints the seconds, the entry's
size on disk and the data files' size, also as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from assets import draw_lengths  # noqa: E402

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what can more said about "
    "time will up out into two some could them other than then now only its these may first any new like "
    "answer question model data train sample reward policy value prompt token sequence batch layer"
).split()


def tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 40)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=8000, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=["<|im_start|>", "<|im_end|>"])  # fmt: skip
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def write_data(out: Path, pairs: int) -> list[Path]:
    rng = np.random.default_rng(1)
    p, c, r = draw_lengths(pairs, 1, "uniform")
    words = lambda n: " ".join(rng.choice(WORDS, int(n)))  # noqa: E731
    half = pairs // 2
    text, chat = out / "text.jsonl", out / "chat.jsonl"
    with open(text, "w") as f:
        for i in range(half):
            f.write(json.dumps({"prompt": words(p[i]), "chosen": " " + words(c[i]), "rejected": " " + words(r[i])}) + "\n")
    with open(chat, "w") as f:
        for i in range(half, pairs):
            turn = lambda role, n: [{"role": role, "content": words(n)}]  # noqa: E731
            f.write(json.dumps({"prompt": turn("user", p[i]), "chosen": turn("assistant", c[i]),
                                "rejected": turn("assistant", r[i])}) + "\n")  # fmt: skip
    return [text, chat]


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_token_cache"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import shutil

    import jax

    from jdpo import config as jconfig
    from jdpo.parallel.sharding import make_mesh
    from jdpo.train import token_cache
    from jdpo.train.run_data import OfflineData

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    t0 = time.perf_counter()
    tok = tokenizer(args.out / "tokenizer")
    files = write_data(args.out, args.pairs)
    print(f"assets: {args.pairs} pairs in {time.perf_counter() - t0:.1f} s", flush=True)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cache = args.out / "refcache"

    def start(**overrides) -> tuple[float, OfflineData]:
        cfg = jconfig.replace(jconfig.Config(), **{
            "model.path": str(args.out / "tokenizer"), "data.train": [str(f) for f in files],
            "data.eval_fraction": 0.01, "data.max_length": 256, "data.max_prompt_length": 128, **overrides,
        })  # fmt: skip
        t = time.perf_counter()
        data = OfflineData.load(cfg, tok, mesh=mesh, shared_prompt=False, cache_dir=cache)
        return time.perf_counter() - t, data

    plain, _ = start(**{"data.token_cache": False})
    first, a = start()
    second, b = start()
    assert not a.tokens_reused and b.tokens_reused and len(a.train_pairs) == len(b.train_pairs)
    result = {
        "pairs": args.pairs,
        "train_pairs": len(b.train_pairs),
        "eval_pairs": len(b.eval_pairs),
        "no_cache_s": round(plain, 2),
        "first_start_s": round(first, 2),
        "second_start_s": round(second, 2),
        "speedup": round(first / second, 1),
        "cache_bytes": size(cache / token_cache.SUBDIR),
        "data_bytes": sum(size(f) for f in files),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
