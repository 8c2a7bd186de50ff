"""No command runs code from a model directory (issue 31, item 8).

A model directory whose config.json / tokenizer_config.json `auto_map` points at its own module: `jdpo
train`, `jdpo generate` and `jdpo eval` run as subprocesses with "y" waiting on stdin (what would answer
transformers' "Do you wish to run the custom code? [y/N]"), and the module, which writes a marker file
when imported, is never imported; nothing is asked.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

EVIL = """\
import os, pathlib
pathlib.Path(os.environ["JDPO_TEST_MARKER"]).write_text("imported")
from transformers import PretrainedConfig, PreTrainedTokenizerFast
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _evil_copy(model_dir, dest: Path, *, tokenizer_class=None) -> Path:
    """`model_dir` with an `auto_map` to its own module evil.py in both configs (and, with
    `tokenizer_class`, a tokenizer class that exists only in that module)."""
    shutil.copytree(model_dir, dest)
    (dest / "evil.py").write_text(EVIL)
    for name, auto_map in (
        ("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}),
        ("tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTokenizer"]}),
    ):
        cfg = json.loads((dest / name).read_text())
        cfg["auto_map"] = auto_map
        if tokenizer_class and name == "tokenizer_config.json":
            cfg["tokenizer_class"] = tokenizer_class
        (dest / name).write_text(json.dumps(cfg))
    return dest


def _jdpo(tmp_path, *argv):
    """`jdpo ARGV` in a subprocess with "y" on stdin; returns (completed process, marker path)."""
    marker = tmp_path / "IMPORTED"
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JDPO_TEST_MARKER=str(marker),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),  # where transformers would copy the module to
    )
    p = subprocess.run(
        [sys.executable, "-m", "jdpo.cli", *argv],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    return p, marker


def _assert_not_run(p, marker):
    out = p.stdout + p.stderr
    assert not marker.exists(), out
    assert "Do you wish to run the custom code" not in out, out


# slow (49 s): the refusal of custom code is covered fast by the test below; this runs all three commands.
@pytest.mark.slow
def test_train_generate_eval_never_import_a_model_directorys_module(assets, tmp_path):
    model = _evil_copy(assets.model_dir, tmp_path / "evil")
    out = tmp_path / "run"
    argv = ["train", "--model.path", str(model), "--data.train", str(assets.train_path)]
    argv += ["--train.output_dir", str(out), "--train.max_steps", "1", "--train.batch_rows", "8"]
    argv += ["--data.max_length", "16", "--data.max_prompt_length", "8", "--data.row_length", "48"]
    argv += ["--dpo.cache_dir", str(tmp_path / "refcache"), "--model.dtype", "float32"]
    argv += ["--logging.tensorboard", "false"]
    p, marker = _jdpo(tmp_path, *argv)
    _assert_not_run(p, marker)
    assert p.returncode == 0, p.stderr[-3000:]

    argv = ["generate", "--model", str(model), "--prompt", "1+2=", "--max-new-tokens", "2"]
    p, marker = _jdpo(tmp_path, *argv)
    _assert_not_run(p, marker)
    assert p.returncode == 0, p.stderr[-3000:]

    argv = ["eval", "--model", str(model), "--reference", str(model), "--data", str(assets.eval_path)]
    argv += ["--num-samples", "2", "--max-new-tokens", "2", "--out-dir", str(tmp_path / "eval")]
    p, marker = _jdpo(tmp_path, *argv)
    _assert_not_run(p, marker)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("command", ["train", "generate"])
def test_a_tokenizer_that_exists_only_as_custom_code_is_refused_with_a_message(assets, tmp_path, command):
    model = _evil_copy(assets.model_dir, tmp_path / "evil", tokenizer_class="EvilTokenizer")
    if command == "train":
        argv = ["train", "--model.path", str(model), "--data.train", str(assets.train_path)]
        argv += ["--train.output_dir", str(tmp_path / "run")]
    else:
        argv = ["generate", "--model", str(model), "--prompt", "1+2="]
    p, marker = _jdpo(tmp_path, *argv)
    _assert_not_run(p, marker)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"{model}: its tokenizer exists only as custom code" in p.stderr
    assert "trust_remote_code=False" in p.stderr
