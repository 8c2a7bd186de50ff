"""Unpaired records (prompt / completion / label) in every file format, the pair -> unpaired split, the
mismatched KL completions, the class checks and the unpaired batch kind."""

import csv
import json
import logging

import numpy as np
import pytest
from helpers_batch import unpack_batch

from jdpo.data import DataError, load_preferences, make_batch, split_eval
from jdpo.data.unpaired import check_classes, kl_mismatch_order, split_pairs, to_examples, tokenize_unpaired

ROWS = [
    {"prompt": "2+2=", "completion": "4", "label": True},
    {"prompt": "3+5=", "completion": "9", "label": False},
    {"prompt": "1+1=", "completion": "2", "label": True},
]


def write_rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_unpaired_records_in_every_file_format(tmp_path, suffix):
    path = write_rows(tmp_path / f"u{suffix}", ROWS)
    recs = load_preferences(path)
    assert recs.report.formats[path] == "unpaired"
    assert list(recs) == ROWS


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_conversational_unpaired_records(tmp_path, suffix):
    user = [{"role": "user", "content": "2+2="}]
    rows = [
        {"prompt": user, "completion": [{"role": "assistant", "content": "4"}], "label": True},
        # the completion may repeat the prompt turns (UltraFeedback style): they are stripped
        {"prompt": user, "completion": [*user, {"role": "assistant", "content": "5"}], "label": False},
    ]
    recs = load_preferences(write_rows(tmp_path / f"c{suffix}", rows))
    assert recs[0] == rows[0]
    assert recs[1] == {"prompt": user, "completion": [{"role": "assistant", "content": "5"}], "label": False}


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"prompt": "p", "completion": "c"}', r"bad\.jsonl:2: missing field 'label'"),
        ('{"prompt": "p", "completion": "c", "label": 1}', r"bad\.jsonl:2: field 'label' must be true or"),
        ('{"prompt": "p", "completion": "c", "label": "yes"}', r"bad\.jsonl:2: field 'label' must be true"),
        ('{"prompt": "p", "completion": "c", "label": null}', r"bad\.jsonl:2: field 'label' must be true"),
    ],
)
def test_bad_labels_are_named(tmp_path, line, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=pattern):
        load_preferences(str(path))


def test_bad_label_in_csv_names_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion,label\np,c,true\np,d,maybe\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: field 'label' must be true or false.*got 'maybe'"):
        load_preferences(str(path))


def test_paired_data_splits_into_unpaired_records():
    pairs = [{"prompt": "a", "chosen": "good a", "rejected": "bad a"},
             {"prompt": "b", "chosen": "good b", "rejected": "bad b"}]  # fmt: skip
    out, labels = split_pairs([*pairs, {"prompt": "c", "completion": "meh", "label": False}])
    assert out == [
        {"prompt": "a", "completion": "good a"},
        {"prompt": "a", "completion": "bad a"},
        {"prompt": "b", "completion": "good b"},
        {"prompt": "b", "completion": "bad b"},
        {"prompt": "c", "completion": "meh"},
    ]
    assert labels.tolist() == [True, False, True, False, False]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 9, 16])
def test_kl_mismatch_order_is_shift_by_one(n):
    order = kl_mismatch_order(n)
    assert sorted(order.tolist()) == list(range(n))  # a permutation: the KL completions are the group's own
    assert np.all(order != np.arange(n)), "an example keeps its own completion"
    # TRL's rotation: the KL completions are [c[n-1], c[0], ..., c[n-2]]; prompt i gets completion i - 1.
    completions = [f"c{i}" for i in range(n)]
    assert [completions[j] for j in order] == [completions[-1]] + completions[:-1]
    assert np.array_equal(order, (np.arange(n) - 1) % n)
    if n >= 3:  # for n = 2 the only mismatch (the swap) is also the reversal
        assert not np.array_equal(order, np.arange(n)[::-1]), "a reversal"


def test_kl_mismatch_order_refuses_fewer_than_two():
    for n in (1, 0, -3):
        with pytest.raises(ValueError, match="n >= 2"):
            kl_mismatch_order(n)
    for n in (2.0, True, "4"):
        with pytest.raises(ValueError, match="must be an int"):
            kl_mismatch_order(n)


def test_kl_mismatch_order_is_a_light_top_level_export():
    # The pairing rule lives in the data package; `jdpo.kl_mismatch_order` still loads no model stack.
    import subprocess
    import sys

    import jdpo

    code = (
        "import sys, jdpo; jdpo.kl_mismatch_order; "
        "print([m for m in ('flax', 'transformers', 'torch', 'optax', 'orbax') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert jdpo.kl_mismatch_order is kl_mismatch_order
    assert "kl_mismatch_order" in jdpo.__all__


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_kl_completions_are_the_shift_by_one_mismatches(n):
    recs = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(n)]
    examples, labels = to_examples(recs, seed=3)
    own = [int(e["chosen"][1:]) for e in examples]
    assert sorted(own) == list(range(n))  # every example once, shuffled
    for i, e in enumerate(examples):
        assert e["prompt"] == f"p{own[i]}"
        assert e["rejected"] == f"c{own[(i - 1) % n]}"  # prompt i with completion (i - 1) mod n
        assert e["rejected"] != e["chosen"]  # odd n too: nobody keeps its own completion
        assert labels[i] == (own[i] % 2 == 0)
    with pytest.raises(DataError, match="at least 2"):
        to_examples(recs[:1], seed=0)


def test_one_class_refused_for_kto_and_ratio_warning(caplog):
    with pytest.raises(ValueError, match=r"tr data has only desirable examples \(3 desirable, 0"):
        check_classes(np.ones(3, bool), loss_type="kto", desirable_weight=1, undesirable_weight=1, split="tr")
    check_classes(np.ones(3, bool), loss_type="bco", desirable_weight=1, undesirable_weight=1, split="tr")
    labels = np.array([True] * 2 + [False] * 6)
    with caplog.at_level(logging.WARNING):
        assert check_classes(labels, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                             split="train") == (2, 6)  # fmt: skip
    assert "(1 * 2) / (1 * 6) = 0.333 is outside [1, 4/3]" in caplog.text
    assert "dpo.desirable_weight to 3-4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_classes(labels, loss_type="kto", desirable_weight=3.5, undesirable_weight=1.0, split="train")
    assert caplog.text == ""


def test_split_eval_of_unpaired_records():
    recs = [{"prompt": f"p{i}", "completion": "c", "label": bool(i % 2)} for i in range(20)]
    train, held = split_eval(recs, 0.25, seed=0)
    assert len(held) == 5 and len(train) == 15
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_unpaired_batch_kind_packs_completion_and_kl_segments():
    from helpers_tokenizer import make_tokenizer

    recs = [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": i % 3 != 0} for i in range(5)]
    pairs, _ = tokenize_unpaired(recs, make_tokenizer(), seed=0, max_length=16, max_prompt_length=8)
    assert len(pairs) == 5 and pairs.labels is not None
    batch = make_batch(pairs, [[0, 1], [2, 3, 4], []], row_length=64, max_pairs_per_row=3)
    assert batch.labels.tolist() == [[int(pairs.labels[0]), int(pairs.labels[1]), 0],
                                     [int(pairs.labels[2]), int(pairs.labels[3]), int(pairs.labels[4])],
                                     [0, 0, 0]]  # fmt: skip
    slots = unpack_batch(batch)
    for s in slots:  # segment 2k+1: prompt + own completion; 2k+2: prompt + the mismatched completion
        k = s["pair_id"]
        p = pairs.prompt_ids[k]
        assert s["chosen"].tolist() == [*p, *pairs.chosen_ids[k]]
        assert s["rejected"].tolist() == [*p, *pairs.rejected_ids[k]]
    assert pairs.rejected_ids[1].tolist() == pairs.chosen_ids[0].tolist()  # example 1's KL = example 0's
    # labels are part of the fingerprint (the reference cache and the data position are keyed on it)
    import dataclasses

    flipped = dataclasses.replace(pairs, labels=~pairs.labels)
    assert flipped.fingerprint() != pairs.fingerprint()
