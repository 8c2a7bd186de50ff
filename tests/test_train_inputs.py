"""The Trainer's set-up with bad input: the data is read, validated and accounted for before the model
loads (so each test's model has unreadable weights: an error about them means the data came second),
and the errors are the `jdpo.errors.UserError` family the command line prints as one message."""

from __future__ import annotations

import logging
import shutil

import pytest
from helpers import one_device, run_config

from jdpo.config import ConfigError
from jdpo.data import DataError
from jdpo.errors import UserError
from jdpo.train import trainer as train

ROW = '{"prompt": "1+2=", "chosen": "3", "rejected": "4"}\n'


@pytest.fixture
def broken_model(assets, tmp_path):
    """The tiny model's directory with its weights overwritten: loading them fails."""
    path = tmp_path / "model"
    shutil.copytree(assets.model_dir, path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


def trainer(assets, tmp_path, model, **overrides):
    cfg = run_config(assets, tmp_path / "out", **{"model.path": str(model), **overrides})
    return train.Trainer(cfg, mesh=one_device())


def test_a_bad_line_is_reported_before_the_model_loads(assets, tmp_path, broken_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(ROW + '{"prompt": "1+1=", "chosen": \n')
    with pytest.raises(DataError, match=rf"{bad}:2: malformed JSON"):
        trainer(assets, tmp_path, broken_model, **{"data.train": [str(bad)]})


def test_dropped_pairs_are_counted_and_an_empty_split_says_why(assets, tmp_path, broken_model, caplog):
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "1+2=", "chosen": "3", "rejected": "3"}\n' * 3)
    with pytest.raises(DataError, match=rf"data\.eval \({same}\): no pairs left to evaluate on\. eval data: "
                       r"0 of 3 pairs kept; dropped 3 \(chosen == rejected\)"):  # fmt: skip
        trainer(assets, tmp_path, broken_model, **{"data.eval": [str(same)]})
    with pytest.raises(DataError, match=r"no pairs left to train on"):
        trainer(assets, tmp_path, broken_model, **{"data.train": [str(same)]})
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(same.read_text() + assets.train_path.read_text())
    with (
        caplog.at_level(logging.WARNING, logger="jdpo.train.trainer"),
        pytest.raises(UserError, match="not a readable safetensors file"),
    ):
        trainer(assets, tmp_path, broken_model, **{"data.train": [str(mixed)]})
    n = len(assets.train_path.read_text().splitlines())
    assert f"train data: {n} of {n + 3} pairs kept; dropped 3 (chosen == rejected)" in caplog.text


def test_an_eval_fraction_that_holds_out_nothing_warns_with_the_numbers(
    assets, tmp_path, broken_model, caplog
):
    n = len(assets.train_path.read_text().splitlines())
    with (
        caplog.at_level(logging.WARNING, logger="jdpo.train.trainer"),
        pytest.raises(UserError, match="safetensors"),
    ):
        trainer(assets, tmp_path, broken_model, **{"data.eval": [], "data.eval_fraction": 0.1 / n})
    assert f"data.eval_fraction={0.1 / n:g} of {n} train records holds out 0 of them" in caplog.text


def test_a_mesh_that_does_not_fit_names_the_fields(assets, tmp_path):
    cfg = run_config(assets, tmp_path / "out", **{"mesh.data": 16})
    with pytest.raises(
        ConfigError,
        match=r"mesh\.data=16 mesh\.fsdp=-1 mesh\.tensor=1 mesh\.expert=1 mesh\.context=1: "
        r"8 devices do not divide",
    ):
        train.Trainer(cfg)


def test_a_record_plain_text_cannot_show_names_its_line_or_is_skipped(assets, tmp_path, broken_model, caplog):
    tool = '{"prompt": [{"role": "user", "content": "1+2="}, {"role": "tool", "content": "3"}], '
    tool += '"chosen": [{"role": "assistant", "content": "3"}], '
    tool += '"rejected": [{"role": "assistant", "content": "4"}]}\n'
    conv = tool.replace('"tool"', '"user"')
    data = tmp_path / "chat.jsonl"
    data.write_text(conv + tool + conv.replace("4", "5"))
    with pytest.raises(DataError, match=rf"{data}:2: role 'tool' has no plain-text form"):
        trainer(assets, tmp_path, broken_model, **{"data.train": [str(data)]})
    with (
        caplog.at_level(logging.WARNING, logger="jdpo.train.trainer"),
        pytest.raises(UserError, match="safetensors"),
    ):
        trainer(assets, tmp_path, broken_model, **{"data.train": [str(data)], "data.skip_bad_rows": True})
    assert "train data: 2 of 3 pairs kept; dropped 1 (role without a plain form)" in caplog.text


def test_an_eval_source_the_reader_drops_entirely_says_why(assets, tmp_path, broken_model):
    hh = tmp_path / "hh.jsonl"  # transcripts that end with a Human turn: dropped by the hh-rlhf reader
    hh.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a\\n\\nHuman: b", '
                  '"rejected": "\\n\\nHuman: hi\\n\\nAssistant: c\\n\\nHuman: d"}\n')  # fmt: skip
    why = (
        r"eval data: 0 of 1 pairs kept; dropped 1 \(hh-rlhf: transcript does not end with an Assistant turn\)"
    )
    with pytest.raises(DataError, match=rf"data\.eval \({hh}\): no pairs left to evaluate on\. {why}"):
        trainer(assets, tmp_path, broken_model, **{"data.eval": [str(hh)]})


def test_a_model_directory_without_a_tokenizer_is_named(assets, tmp_path, broken_model):
    from jdpo.models import CheckpointError

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken_model / name).unlink()
    with pytest.raises(CheckpointError, match=rf"model\.path {broken_model}: cannot load its tokenizer"):
        trainer(assets, tmp_path, broken_model)


@pytest.mark.parametrize(
    "n, fraction, advice",
    [(1, 0.5, "1 record cannot be split: give data.eval files"),
     (2, 0.1, "give data.eval_fraction >= 0.5, or data.eval")],
)  # fmt: skip
def test_the_eval_fraction_advice_holds_out_a_record(
    assets, tmp_path, broken_model, caplog, n, fraction, advice
):
    """Smaller messages of issue 31: `eval_fraction 0.5` of one record suggested `>= 0.5`, which holds out
    nothing again; the advice is now a fraction that holds out one record, or data.eval."""
    from jdpo import data as jdata

    rows = assets.train_path.read_text().splitlines()[:n]
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(rows) + "\n")
    over = {"data.train": [str(few)], "data.eval": [], "data.eval_fraction": fraction}
    with (
        caplog.at_level(logging.WARNING, logger="jdpo.train.trainer"),
        pytest.raises(UserError, match="safetensors"),
    ):
        trainer(assets, tmp_path, broken_model, **over)
    assert f"data.eval_fraction={fraction:g} of {n} train records holds out 0 of them" in caplog.text
    assert advice in caplog.text
    if n > 1:  # the advised fraction does hold one out
        records = jdata.load_preferences([str(few)], "auto", seed=0)
        assert len(jdata.split_eval(records, 0.5, seed=0)[1]) == 1  # the old advice, 0.25, held out 0
