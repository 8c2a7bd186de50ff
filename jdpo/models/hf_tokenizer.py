"""The one place jdpo loads a Hugging Face tokenizer: never running code a model directory names.

A checkpoint's `config.json` / `tokenizer_config.json` may carry an `auto_map` pointing at a Python
module in the directory (or on the hub). transformers, left to decide, asks "Do you wish to run the
custom code? [y/N]" on stdin and imports the module on a "y". jdpo passes `trust_remote_code=False`
on every call, so the module is never imported and nothing is asked: a tokenizer whose class
transformers ships loads as that class, one that exists only as custom code is refused with a message.
The model itself never goes through transformers (`jdpo.models.hf` reads config.json and the
safetensors directly).
"""

import os

from transformers import AutoTokenizer

from jdpo.models.hf import CheckpointError

# The files a transformers tokenizer is built from: a directory without any of them has no tokenizer (an
# export whose tokenizer files were lost or never copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def load_tokenizer(path, *, what: str = "model"):
    """`transformers.AutoTokenizer` of the checkpoint directory (or hub id) `path`, with
    `trust_remote_code=False`. `what` names the setting or option `path` came from, for the messages.

    Raises CheckpointError naming `path` when the directory holds no tokenizer file, when its tokenizer
    exists only as custom code (`auto_map`), or when transformers cannot read the files.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{what} {path}: cannot load its tokenizer: none of {', '.join(TOKENIZER_FILES)} is in it; "
            "copy the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) of "
            "the model it was trained from into it"
        )
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise CheckpointError(
                f"{what} {path}: its tokenizer exists only as custom code (the `auto_map` of its "
                "tokenizer_config.json / config.json); jdpo never runs code from a model directory "
                "(trust_remote_code=False): use a checkpoint whose tokenizer class transformers ships"
            ) from None
        raise CheckpointError(
            f"{what} {path}: cannot load its tokenizer ({type(e).__name__}: {_first_line(e)})"
        ) from None
