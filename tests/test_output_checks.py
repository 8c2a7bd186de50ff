"""Every output location is checked before anything loads (issue 31, item 11): a location under a file, a
read-only one, and a URL whose fsspec backend is not installed are named with the setting or option, for
jdpo train, jdpo generate --out, jdpo eval --out-dir and jdpo plot --out; nothing was loaded."""

import importlib.util
import json

import pytest

from jdpo.cli import main


def _cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    """Any model, tokenizer or data load fails the test."""
    from jdpo.commands import evaluate
    from jdpo.scoring import generate
    from jdpo.train import trainer

    def loaded(*args, **kwargs):
        pytest.fail("something was loaded before the output location was checked")

    monkeypatch.setattr(trainer, "run", loaded)
    monkeypatch.setattr(generate.Generator, "from_pretrained", loaded)
    monkeypatch.setattr(evaluate, "evaluate", loaded)


def _bad_locations(tmp_path):
    """(a location, what the message says about it)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    yield str(blocker / "out"), f"{blocker} is a file, so nothing can be written under it"
    yield "/sys/jdpo-test/out", "cannot write in /sys"  # sysfs: no file can be made there, even by root
    assert importlib.util.find_spec("gcsfs") is None  # the environment the gs:// case is about
    yield "gs://jdpo-test-bucket/out", "writing gs:// needs the gcsfs package: pip install gcsfs"


def test_train_checks_its_output_locations_first(assets, tmp_path, capsys, no_loading):
    base = ["train", "--model.path", str(assets.model_dir), "--data.train", str(assets.train_path)]
    for where, message in _bad_locations(tmp_path):
        code, err = _cli(capsys, *base, "--train.output_dir", where)
        assert code == 2 and f"train.output_dir {where}: {message}" in err, err
    ok = str(tmp_path / "run")
    for field in ("dpo.cache_dir", "train.compile_cache"):
        where, message = next(_bad_locations(tmp_path))
        code, err = _cli(capsys, *base, "--train.output_dir", ok, f"--{field}", where)
        assert code == 2 and f"{field} {where}: {message}" in err, err


def test_generate_and_eval_check_their_outputs_first(assets, tmp_path, capsys, no_loading):
    model = str(assets.model_dir)
    for where, message in _bad_locations(tmp_path):
        code, err = _cli(
            capsys, "generate", "--model", model, "--prompts", str(assets.eval_path), "--out", where
        )
        assert code == 2 and f"--out {where}: {message}" in err, err
        argv = ["eval", "--model", model, "--reference", model, "--data", str(assets.eval_path)]
        code, err = _cli(capsys, *argv, "--out-dir", where)
        assert code == 2 and f"--out-dir {where}: {message}" in err, err
    code, err = _cli(capsys, "generate", "--model", model, "--prompt", "1+1=", "--out", str(tmp_path))
    assert code == 2 and f"--out {tmp_path} is a directory; give a file path" in err, err


def test_plot_checks_its_output_first(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    for where, message in _bad_locations(tmp_path):
        code, err = _cli(capsys, "plot", str(run), "--out", where)
        assert code == 2 and f"--out {where}: {message}" in err, err
