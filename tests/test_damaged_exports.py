"""Damaged or moved exports given to `jdpo generate` / `jdpo eval`: a message naming the file and what to
do, never a traceback (issue 31, items 2, 10 and 12)."""

import shutil

import pytest

from jdpo.cli import main


def _cli(capsys, *argv):
    """main(argv) -> (exit code, stderr)."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def _generate(model):
    return ["generate", "--model", str(model), "--prompt", "1+2=", "--max-new-tokens", "2"]


def _eval(model, reference, data, out):
    return ["eval", "--model", str(model), "--reference", str(reference), "--data", str(data),
            "--num-samples", "2", "--max-new-tokens", "2", "--out-dir", str(out)]  # fmt: skip


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_export_without_tokenizer_json_is_named(assets, tmp_path, capsys, command):
    model = tmp_path / "final"
    shutil.copytree(assets.model_dir, model)
    (model / "tokenizer.json").unlink()
    if command == "generate":
        argv = _generate(model)
    else:
        argv = _eval(model, assets.model_dir, assets.eval_path, tmp_path / "eval")
    code, err = _cli(capsys, *argv)
    assert code == 2, err
    assert f"{model}: cannot load its tokenizer: none of tokenizer.json" in err
    assert "copy the tokenizer files" in err
