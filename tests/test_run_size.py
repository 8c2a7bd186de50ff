"""An absurd row length is refused before the model loads (issue 31, item 13): the run's `jdpo plan`
estimate against one device's memory, named with both numbers (and the model's positions when
data.max_length is past them); past the positions alone is a warning. Nothing was loaded."""

import json
import shutil

import pytest
from helpers import tiny_config

from jdpo.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    from jdpo.train import trainer

    monkeypatch.setattr(trainer, "run", lambda *a, **k: pytest.fail("the run started before the size check"))


def _train(capsys, model, data, out, *extra):
    argv = ["train", "--model.path", str(model), "--data.train", str(data), "--train.output_dir", str(out)]
    code = main([*argv, *extra])
    return code, capsys.readouterr().err


def test_an_absurd_max_length_is_refused_with_the_plan_and_the_positions(
    assets, tmp_path, capsys, no_loading
):
    # A row of 2e8 tokens: no host's memory holds its activations (the estimate is against this host).
    argv = ["--data.max_length", "100000000"]
    code, err = _train(capsys, assets.model_dir, assets.train_path, tmp_path / "run", *argv)
    assert code == 2, err
    assert "jdpo plan estimates " in err and "rows of 200000000 tokens per device), more than the " in err
    assert (
        "; data.max_length 100000000 is above the 512 positions of the model (max_position_embeddings in"
        in err
    )


def test_a_max_length_past_the_positions_alone_warns(assets, tmp_path, caplog):
    import logging

    from jdpo.commands import plan

    cfg = tiny_config(assets, **{"data.max_length": 1024, "data.max_prompt_length": 8})
    with caplog.at_level(logging.WARNING, logger="jdpo"):
        assert plan.check_run_size(cfg, num_devices=8) is None
    assert "data.max_length 1024 is above the 512 positions of the model" in caplog.text
    assert "set data.max_length <= 512 unless the model is meant to" in caplog.text


def test_a_run_beyond_the_device_memory_is_refused_with_the_plan(
    assets, tmp_path, capsys, no_loading, monkeypatch
):
    from jdpo.commands import plan

    model = tmp_path / "long"
    shutil.copytree(assets.model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1 << 30}))
    monkeypatch.setattr(plan, "device_memory", lambda name=None: ("a 1 GiB test device", 1 << 30))
    code, err = _train(capsys, model, assets.train_path, tmp_path / "run", "--data.max_length", "1000000")
    assert code == 2, err
    assert (
        "jdpo plan estimates " in err and "rows of 2000000 tokens per device), more than the 1.00 GiB" in err
    )
    assert "of a 1 GiB test device: lower data.max_length, data.row_length or train.batch_rows" in err
    # The same run at its usual size fits the same device: the check refuses only what would not.
    assert plan.check_run_size(tiny_config(assets, **{"model.path": str(model)}), num_devices=8) is None
