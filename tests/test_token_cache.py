"""jdpo.train.token_cache: a run's tokenised splits are stored once and reused by the next start, never
for another key; a damaged entry is found and rebuilt."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from helpers import one_device
from helpers_chat_templates import QWEN3_STYLE
from helpers_tokenizer import make_tokenizer

from jdpo import config as jconfig
from jdpo.train import cache_entry, token_cache
from jdpo.train.run_data import OfflineData


def rows(n, offset=0):
    turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return [{"prompt": turn("user", f"{i}+{i}="), "chosen": turn("assistant", str(2 * i)),
             "rejected": turn("assistant", str(2 * i + 1))} for i in range(offset, offset + n)]  # fmt: skip


@pytest.fixture
def run(tmp_path):
    """(write a data file, the config of a run on it, the tokenizer) in tmp_path."""
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows(40)))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows(8, offset=100)))

    def config(**overrides):
        base = {"model.path": str(tmp_path), "data.train": [str(train)], "data.eval": [str(held)],
                "data.max_length": 64, "data.max_prompt_length": 32, "train.batch_rows": 4}  # fmt: skip
        return jconfig.replace(jconfig.Config(), **{**base, **overrides})

    return train, config, make_tokenizer(QWEN3_STYLE)


def load(config, tokenizer, cache):
    return OfflineData.load(config, tokenizer, mesh=one_device(), shared_prompt=False, cache_dir=cache)


def same_pairs(a, b):
    for part in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert [x.tolist() for x in getattr(a, part)] == [x.tolist() for x in getattr(b, part)]
    np.testing.assert_array_equal(a.source_index, b.source_index)


def test_second_start_reuses_the_tokenised_splits(run, tmp_path):
    _, config, tok = run
    cache = tmp_path / "refcache"
    first = load(config(), tok, cache)
    assert not first.tokens_reused
    (entry,) = (cache / token_cache.SUBDIR).iterdir()
    again = load(config(), tok, cache)
    assert again.tokens_reused
    same_pairs(again.train_pairs, first.train_pairs)
    same_pairs(again.eval_pairs, first.eval_pairs)
    assert again.layout == first.layout and again.total_steps == first.total_steps
    assert again.train_pairs.fingerprint() == first.train_pairs.fingerprint()
    manifest = json.loads((entry / cache_entry.MANIFEST).read_text())
    assert manifest["splits"]["train"]["pairs"] == len(first.train_pairs) == 40
    assert manifest["ingredients"]["chat_template_kwargs"] == {}
    # Unpaired losses keep their labels; resumable setting off: nothing is written.
    kto = config(**{"dpo.loss_type": "kto"})
    a, b = load(kto, tok, cache), load(kto, tok, cache)
    assert b.tokens_reused and np.array_equal(a.train_pairs.labels, b.train_pairs.labels)
    off = tmp_path / "off"
    assert not load(config(**{"data.token_cache": False}), tok, off).tokens_reused and not off.exists()


def test_any_key_change_is_another_entry(run, tmp_path):
    train, config, tok = run
    cache = tmp_path / "refcache"
    load(config(), tok, cache)
    changes = [
        (config(**{"data.max_length": 48}), tok),
        (config(**{"data.max_prompt_length": 16}), tok),
        (config(**{"data.chat_template_kwargs": "{enable_thinking: false}"}), tok),
        (config(**{"train.seed": 1, "data.eval": [], "data.eval_fraction": 0.1}), tok),
        (config(**{"data.train": [f"{train}:20"]}), tok),
        (config(), make_tokenizer(QWEN3_STYLE.replace("<|im_start|>assistant", "<|im_start|>bot"))),
    ]
    for cfg, tokenizer in changes:
        assert not load(cfg, tokenizer, cache).tokens_reused, cfg
    assert len(list((cache / token_cache.SUBDIR).iterdir())) == 1 + len(changes)
    # The data file's content, not its name: the same path rewritten is another entry.
    train.write_text("".join(json.dumps(r) + "\n" for r in rows(39)))
    changed = load(config(), tok, cache)
    assert not changed.tokens_reused and len(changed.train_pairs) == 39
    # A hub dataset name has no content here to key on: not cached.
    assert token_cache.ingredients(config(**{"data.train": ["someone/some-dataset"]}), tok) is None


def test_a_damaged_entry_is_found_and_rebuilt(run, tmp_path, caplog):
    _, config, tok = run
    cache = tmp_path / "refcache"
    first = load(config(), tok, cache)
    (entry,) = (cache / token_cache.SUBDIR).iterdir()
    arrays = entry / cache_entry.ARRAYS
    raw = arrays.read_bytes()
    arrays.write_bytes(raw[: len(raw) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="jdpo.train.token_cache"):
        rebuilt = load(config(), tok, cache)
    assert not rebuilt.tokens_reused and "checksum" in caplog.text
    same_pairs(rebuilt.train_pairs, first.train_pairs)
    assert load(config(), tok, cache).tokens_reused  # the rebuilt entry replaced the damaged one
    # Arrays rewritten with a matching checksum but other ids: the pairs' fingerprints tell.
    manifest = json.loads((entry / cache_entry.MANIFEST).read_text())
    with np.load(arrays) as z:
        tampered = dict(z)
    tampered["train_chosen_ids"] = tampered["train_chosen_ids"] + 1
    key = manifest.pop("key")
    manifest.pop("sha256")
    buf = io.BytesIO()
    np.savez(buf, **tampered)
    cache_entry.save_entry(entry, buf.getvalue(), {**manifest, "key": key}, replace=True)
    splits, problem = token_cache.load(entry, key)
    assert splits is None and "do not give the 40 pairs" in problem
    assert not load(config(), tok, cache).tokens_reused
    assert token_cache.load(entry, key)[0] is not None


def test_a_directory_source_is_keyed_by_every_file_in_it(tmp_path):
    """A `datasets` directory (or a directory of data files) is hashed file by file with relative paths."""
    d = tmp_path / "saved"
    (d / "train").mkdir(parents=True)
    (d / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (d / "train" / "data-00000-of-00001.arrow").write_bytes(b"rows")
    first = token_cache.source_fingerprint(str(d))
    assert first == token_cache.source_fingerprint(str(d))
    (d / "train" / "data-00000-of-00001.arrow").write_bytes(b"other rows")
    second = token_cache.source_fingerprint(str(d))
    assert second != first
    (d / "train" / "data-00000-of-00001.arrow").rename(d / "train" / "data.arrow")  # same bytes, other name
    assert token_cache.source_fingerprint(str(d)) not in (first, second, None)
    assert token_cache.source_fingerprint("someone/hub-dataset") is None
