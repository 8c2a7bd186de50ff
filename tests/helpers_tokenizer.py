"""A small real BPE tokenizer for tests, trained here with `tokenizers` (no hub access needed).

    from helpers_tokenizer import make_tokenizer  # tests/ is on sys.path under pytest
    tok = make_tokenizer()                        # byte-level BPE, adds <s> (BOS) like Llama; eos </s>
    tok = make_tokenizer(chat_template="chatml")  # + a ChatML template (<|im_start|> ... <|im_end|>)
    tok = make_tokenizer(chat_template="chatml_bos")  # template text starts with {{ bos_token }}
    tok = make_tokenizer(metaspace=True)          # SentencePiece-style dummy prefix (Llama-2 like)
    path = save_tokenizer(tmp_path, chat_template="chatml")  # a checkpoint dir for AutoTokenizer

Vocabulary: 300 tokens (256 bytes + merges + specials). Special tokens: <pad>=0, <s>=1, </s>=2,
<|im_start|>=3, <|im_end|>=4. Training takes ~50 ms and is cached per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A preference pair has a prompt, a chosen answer and a rejected answer.",
    "Human: how do I bake bread? Assistant: Mix flour, water, salt and yeast, then wait.",
    "Tokenisers merge frequent byte pairs into longer tokens; the boundary matters.",
    "hello world hello there hello again, the answer is forty two.",
    "Please explain why the sky looks blue during the day and red at sunset.",
] * 20

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Like Llama-3 / Gemma: the template writes the BOS token into the text itself.
    "chatml_bos": (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


@functools.cache
def _trained_json(vocab_size: int, metaspace: bool = False) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if metaspace:
        # SentencePiece-like: spaces become "▁" and every text gets a dummy "▁" prefix (Llama-2, Mistral
        # v1), so a completion tokenised alone differs from the same text after a prompt.
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Like Llama: add_special_tokens=True prepends BOS and adds no EOS.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok.to_str()


def make_tokenizer(
    chat_template: str | None = None, *, add_bos: bool = True, metaspace: bool = False, vocab_size: int = 300
):
    """A transformers.PreTrainedTokenizerFast around the trained BPE (see module docstring).

    chat_template: None, a key of CHAT_TEMPLATES, or a Jinja template string.
    add_bos: False gives a tokenizer that adds no BOS (like Qwen) but still has bos/eos tokens.
    metaspace: a SentencePiece-style tokenizer (dummy "▁" prefix) instead of byte-level BPE.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_trained_json(vocab_size, metaspace))
    if not add_bos:
        raw.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        tok.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
    return tok


def save_tokenizer(directory: str | Path, chat_template: str | None = None, **kwargs) -> Path:
    """Write the test tokenizer to `directory` (loadable with transformers.AutoTokenizer)."""
    directory = Path(directory)
    make_tokenizer(chat_template, **kwargs).save_pretrained(directory)
    return directory
