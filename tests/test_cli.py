"""The `jdpo` command: help generated from the config, errors, dispatch, presets, fast import."""

import sys
from pathlib import Path

import pytest
from helpers import modules_imported_by

from jdpo import cli
from jdpo import config as C
from jdpo.report import metrics as M

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
PRESETS = sorted(EXPERIMENTS.glob("*.yaml"))


def _run(capsys, *argv):
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit becomes the code."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_help_lists_every_field_with_default_and_help(capsys):
    code, out, _ = _run(capsys, "train", "--help")
    assert code == 0
    flat = " ".join(out.split())  # argparse wraps long help lines
    for name, _type, default, help_text in C.field_help():
        assert f"--{name}" in out, name
        assert " ".join(help_text.split()[:4]) in flat, name
        assert f"(default: {cli.format_default(default)})" in flat, name
    for section, scls in C.sections().items():
        assert f"\n{section}:\n" in out and " ".join(scls.__doc__.split()) in flat


def test_top_level_help_lists_commands(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for command in ("train", "demo", "plot"):
        assert command in out


def test_unknown_subcommand(capsys):
    code, _, err = _run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err


def test_unknown_field_names_the_closest(capsys):
    code, _, err = _run(capsys, "train", "--dpo.betaa", "0.2")
    assert code == 2 and "unknown field 'dpo.betaa'; did you mean 'dpo.beta'?" in err
    code, _, err = _run(capsys, "train", "--nosection.x", "1")
    assert code == 2 and "unknown field 'nosection'" in err


def test_bad_value_and_bad_option(capsys):
    code, _, err = _run(capsys, "train", "--dpo.beta", "high")
    assert code == 2 and "dpo.beta: expected a number, got 'high'" in err
    code, _, err = _run(capsys, "train", "oops")
    assert code == 2 and "expected --section.field VALUE" in err
    code, _, err = _run(capsys, "plot", "somewhere", "--dpo.beta", "1")
    assert code == 2 and "unrecognized arguments" in err


def test_print_config_layers_preset_and_overrides(capsys, tmp_path):
    import yaml

    preset = EXPERIMENTS / "gpu_single.yaml"
    code, out, _ = _run(
        capsys, "train", "--print-config", "--config", str(preset), "--dpo.beta=0.3", "--data.train", "a,b"
    )
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["dpo"]["beta"] == 0.3 and resolved["data"]["train"] == ["a", "b"]
    assert resolved["model"]["dtype"] == "bfloat16"  # from the preset
    (tmp_path / "c.yaml").write_text(out)
    assert C.load_config(tmp_path / "c.yaml") == C.load_config(
        preset, ["--dpo.beta", "0.3", "--data.train", "a,b"]
    )


def test_train_dispatches_the_resolved_config(capsys, monkeypatch, tmp_path):
    import types

    seen = []
    fake = types.ModuleType("jdpo.train.trainer")
    fake.run = lambda cfg: seen.append(cfg) or types.SimpleNamespace(stop_reason="completed")
    monkeypatch.setitem(sys.modules, "jdpo.train.trainer", fake)
    monkeypatch.setattr("jdpo.train.trainer", fake, raising=False)
    code, _, _ = _run(capsys, "train", "--train.max_steps", "3", "--train.output_dir", str(tmp_path))
    assert code == 0 and len(seen) == 1
    assert seen[0].train.max_steps == 3 and seen[0].train.output_dir == str(tmp_path)


def test_a_preempted_train_says_so_and_exits_143(capsys, monkeypatch):
    """A SIGTERM-stopped run is not mistaken for a finished one: it says where it checkpointed and
    exits with 128 + SIGTERM."""
    import types

    fake = types.ModuleType("jdpo.train.trainer")
    fake.run = lambda cfg: types.SimpleNamespace(
        stop_reason="sigterm", step=7, checkpoint_dir="out/checkpoints"
    )
    monkeypatch.setitem(sys.modules, "jdpo.train.trainer", fake)
    monkeypatch.setattr("jdpo.train.trainer", fake, raising=False)
    code, out, _ = _run(capsys, "train")
    assert code == cli.EXIT_PREEMPTED == 143
    assert "SIGTERM: checkpointed at step 7 in out/checkpoints" in out


def test_a_negative_number_reaches_the_validator(capsys):
    code, _, err = _run(capsys, "train", "--optim.learning_rate", "-1e-3")
    assert code == 2 and "optim.learning_rate must be > 0, got -0.001" in err
    code, _, err = _run(capsys, "train", "--train.max_steps", "-2")
    assert code == 2 and "train.max_steps must be >= 0" in err


def test_demo_dispatches_with_only_the_given_options(capsys, monkeypatch, tmp_path):
    import types

    calls = []
    fake = types.ModuleType("jdpo.demo")
    fake.run_demo = lambda **kwargs: calls.append(kwargs)
    fake.RECIPES = ("offline", "online")
    monkeypatch.setitem(sys.modules, "jdpo.demo", fake)
    monkeypatch.setattr("jdpo.demo", fake, raising=False)
    # run_demo writes its own plots; the command passes only what was given (run_demo's defaults rule).
    code, _, _ = _run(capsys, "demo", "--output-dir", str(tmp_path), "--steps", "3")
    assert code == 0 and calls == [{"output_dir": str(tmp_path), "plot": True, "steps": 3}]
    code, _, _ = _run(capsys, "demo", "--output-dir", str(tmp_path), "--no-plot", "--seed", "1")
    assert code == 0 and calls[1] == {"output_dir": str(tmp_path), "plot": False, "seed": 1}
    code, _, _ = _run(capsys, "demo", "--output-dir", str(tmp_path), "--recipe", "online")
    assert code == 0 and calls[2] == {"output_dir": str(tmp_path), "plot": True, "recipe": "online"}
    code, _, err = _run(capsys, "demo", "--recipe", "sideways")
    assert code == 2 and "invalid choice: 'sideways'" in err and len(calls) == 3


def test_plot_command(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, _, err = _run(capsys, "plot", str(tmp_path))
    assert code == 2 and "metrics.jsonl does not exist" in err
    with M.MetricsLogger(tmp_path, console=False, tensorboard=False, is_main=True) as lg:
        lg.log(1, {M.LOSS: 0.69, M.REWARDS_ACCURACIES: 0.5})
        lg.log(2, {M.LOSS: 0.60, M.REWARDS_ACCURACIES: 0.75})
    code, out, _ = _run(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "png"))
    assert code == 0
    written = {Path(line).name for line in out.split()}
    assert written == {"loss.png", "accuracy.png", "summary.png"}
    assert all((tmp_path / "png" / name).stat().st_size > 0 for name in written)


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"demo", "cpu_small", "gpu_single", "tpu_pod"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_parses(preset):
    import yaml

    cfg = C.load_config(preset)  # unknown fields or bad values raise ConfigError
    assert isinstance(cfg, C.Config)
    # Every field the file sets is a real field and the value survives parsing as written.
    raw = yaml.safe_load(preset.read_text())
    for section, values in raw.items():
        for name, value in values.items():
            parsed = getattr(getattr(cfg, section), name)
            if isinstance(value, bool) and isinstance(parsed, str):  # an auto / true / false setting
                value = str(value).lower()
            assert parsed == (tuple(value) if isinstance(value, list) else value), f"{section}.{name}"


def test_cli_import_is_light():
    """`jdpo --help` must not pay for JAX / the trainer / matplotlib."""
    out = modules_imported_by("import jdpo.cli", ("jax", "flax", "matplotlib", "jdpo.train.trainer"))
    assert out.strip() == "[]"


def _train_raising(monkeypatch, error):
    import types

    def run(cfg):
        raise error

    fake = types.ModuleType("jdpo.train.trainer")
    fake.run = run
    monkeypatch.setitem(sys.modules, "jdpo.train.trainer", fake)
    monkeypatch.setattr("jdpo.train.trainer", fake, raising=False)


def test_an_input_error_is_one_message_and_exit_2_and_debug_shows_the_traceback(capsys, monkeypatch):
    from jdpo.data import DataError

    monkeypatch.delenv("JDPO_DEBUG", raising=False)
    _train_raising(monkeypatch, DataError("data/x.jsonl:4: malformed JSON (Expecting value at column 1)"))
    code, _, err = _run(capsys, "train")
    assert (
        code == 2
        and err == "jdpo train: error: data/x.jsonl:4: malformed JSON (Expecting value at column 1)\n"
    )
    with pytest.raises(DataError, match="x.jsonl:4"):
        cli.main(["train", "--debug"])
    monkeypatch.setenv("JDPO_DEBUG", "1")
    with pytest.raises(DataError, match="x.jsonl:4"):
        cli.main(["train"])
    monkeypatch.delenv("JDPO_DEBUG")
    _train_raising(monkeypatch, KeyError("a bug"))  # not an input error: it keeps its traceback
    with pytest.raises(KeyError):
        cli.main(["train"])


def test_every_input_error_is_one_family(monkeypatch):
    """Bad data, config, model config.json, model weights, checkpoints and a locked run directory all
    reach the command line's one-message exit."""
    from jdpo.data import DataError
    from jdpo.errors import UserError
    from jdpo.models import CheckpointError
    from jdpo.models.families import ModelConfigError
    from jdpo.train.checkpoint import DamagedCheckpointError
    from jdpo.train.runlock import RunLockedError

    for error in (DataError, C.ConfigError, ModelConfigError, CheckpointError, DamagedCheckpointError,
                  RunLockedError):  # fmt: skip
        assert issubclass(error, UserError)


@pytest.mark.parametrize(
    ("argv", "status"),
    # The error is one main returns (not argparse's SystemExit, which exits the ordinary way).
    # user_error is slow (15 s): the exit status of a user error is covered fast by the in-process tests.
    [
        (["train", "--print-config", "--dpo.beta", "0.3"], 0),
        pytest.param(["train", "--data.train", "a.jsonl"], 2, marks=pytest.mark.slow),
    ],
    ids=["returns", "user_error"],
)
def test_the_console_script_ends_with_main_s_status_its_output_whole_and_exit_handlers_run(argv, status):
    """`jdpo` (cli.entry) skips the interpreter's teardown: nothing written to a pipe is lost, the exit
    handlers run, and the status is main's."""
    import subprocess

    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('exit handler ran', file=sys.stderr))\n"
        f"sys.argv = ['jdpo', *{argv!r}]\n"
        "from jdpo.cli import entry\n"
        "entry()\n"
        "raise SystemExit('entry returned')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == status, p.stderr
    assert p.stderr.rstrip().endswith("exit handler ran")
    if status == 0:
        import yaml

        assert yaml.safe_load(p.stdout)["dpo"]["beta"] == 0.3  # the whole config, through a pipe
    else:
        assert "jdpo train: error: model.path is empty" in p.stderr and p.stdout == ""


# slow (12 s): SIGTERM in the loop is covered fast by tests/test_train.py.
@pytest.mark.slow
def test_sigterm_before_the_training_loop_says_so_and_exits_143(tmp_path):
    """Issue 31, smaller messages: SIGTERM while the run loads (before the loop's own handler) ended the
    process with status 143 and no message."""
    import subprocess

    script = (
        "import os, signal, time, sys\n"
        "from jdpo import cli\n"
        "from jdpo.train import trainer\n"
        "def run(cfg):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "trainer.run = run\n"
        "sys.exit(cli.main(['train', '--train.output_dir', sys.argv[1], '--model.path', sys.argv[1]]))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120, env=env)  # fmt: skip
    assert p.returncode == 143, (p.returncode, p.stderr[-2000:])
    assert "jdpo train: SIGTERM outside the training loop (while loading, preparing or exporting)" in p.stderr
