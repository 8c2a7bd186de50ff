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


@pytest.fixture(scope="module")
def lora_export(assets, tmp_path_factory):
    """A 1-step LoRA run trained with a relative `model.path tiny` (from its own directory): (root, the
    run's final/ adapter directory)."""
    import os

    from helpers import one_device, run_config

    from jdpo.train import trainer as train

    root = tmp_path_factory.mktemp("lora_export")
    shutil.copytree(assets.model_dir, root / "tiny")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        over = {"model.path": "tiny", "lora.rank": 4, "lora.alpha": 8.0, "train.max_steps": 1}
        tr = train.Trainer(run_config(assets, root / "run", **over), mesh=one_device())
        tr.fit()
    finally:
        os.chdir(cwd)
    return root, root / "run" / "final"


def _adapter_config(adapter):
    import json

    return json.loads((adapter / "adapter_config.json").read_text())


def test_a_lora_export_records_the_absolute_base_and_its_fingerprint(lora_export):
    from jdpo.models.adapter_files import base_fingerprint

    root, final = lora_export
    cfg = _adapter_config(final)
    assert cfg["base_model_name_or_path"] == str(root / "tiny")
    assert cfg["jdpo_base_fingerprint"] == base_fingerprint(root / "tiny")


def test_an_adapter_on_a_changed_base_is_refused_naming_both(
    assets, lora_export, tmp_path, capsys, monkeypatch
):
    import json

    import numpy as np
    from safetensors.numpy import load_file, save_file

    root, final = lora_export
    base = tmp_path / "tiny"  # a copy of the base whose weights then change in place
    shutil.copytree(root / "tiny", base)
    adapter = tmp_path / "final"
    shutil.copytree(final, adapter)
    cfg = _adapter_config(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    monkeypatch.chdir(tmp_path)
    assert _cli(capsys, *_generate(adapter))[0] == 0  # the same files: loads
    weights = load_file(base / "model.safetensors")
    key = sorted(weights)[0]
    weights[key] = weights[key] + np.float32(0.01)
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    for argv in (_generate(adapter), _eval(adapter, root / "tiny", assets.eval_path, tmp_path / "e")):
        code, err = _cli(capsys, *argv)
        assert code == 2, err
        assert f"exported on the base {base} with fingerprint {cfg['jdpo_base_fingerprint']}" in err
        assert "the files there now have fingerprint " in err


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"r": 4,',
            "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 9)",
        ),
        ("[1, 2]", "expected a JSON object of adapter settings, got a list"),
        ("lora_alpha", "lora_alpha must be a finite number, got 'sixteen'"),
        ("r", "r must be a positive integer, got 'four'"),
        ("target_modules", "target_modules must be a module name or a list of module names, got 3"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_malformed_adapter_config_is_named_with_the_field(
    assets, lora_export, tmp_path, capsys, text, message, command
):
    import json

    root, final = lora_export
    adapter = tmp_path / "final"
    shutil.copytree(final, adapter)
    bad = {"lora_alpha": "sixteen", "r": "four", "target_modules": 3}
    if text in bad:
        text = json.dumps({**_adapter_config(final), text: bad[text]})
    (adapter / "adapter_config.json").write_text(text)
    if command == "generate":
        argv = _generate(adapter)
    else:
        argv = _eval(adapter, root / "tiny", assets.eval_path, tmp_path / "e")
    code, err = _cli(capsys, *argv)
    assert code == 2, err
    assert f"{adapter / 'adapter_config.json'}: {message}" in err


def test_a_non_finite_init_adapter_is_named(assets, lora_export, tmp_path, capsys):
    """Smaller messages of issue 31: a NaN in lora.init_adapter was reported as a non-finite loss at step
    1, and jdpo generate sampled from it; both now name the adapter file and the tensor."""
    import numpy as np
    from helpers import one_device, run_config
    from safetensors.numpy import load_file, save_file

    from jdpo.models import CheckpointError
    from jdpo.train import trainer as train

    root, final = lora_export
    adapter = tmp_path / "nan_adapter"
    shutil.copytree(final, adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = sorted(weights)[1]
    weights[key][0, 0] = np.nan
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    want = f"{adapter / 'adapter_model.safetensors'}: tensor {key} holds NaN or inf values"
    over = {
        "model.path": str(root / "tiny"),
        "lora.rank": 4,
        "lora.alpha": 8.0,
        "lora.init_adapter": str(adapter),
    }
    with pytest.raises(CheckpointError, match=want.replace(".", r"\.")):
        train.Trainer(run_config(assets, tmp_path / "run", **over), mesh=one_device())
    code, err = _cli(capsys, *_generate(adapter))
    assert code == 2 and want in err, err
