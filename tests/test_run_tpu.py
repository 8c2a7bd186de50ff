"""run_tpu.sh: --help documents every option, --dry-run prints the exact gcloud commands, bad arguments fail
with a clear message before anything runs. No gcloud and no network needed (--dry-run never calls gcloud).

The printed commands are parsed back with `shlex` (and the remote script inside `--command` once more),
so the tests check that the arguments arrive on the workers exactly as given, whatever their quoting.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "run_tpu.sh"
BASE = ["--name", "dpo-pod", "--zone", "us-west4-a"]


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory, monkeypatch):
    """A `gcloud` first on PATH that only fails: no test may ever reach the real one (--dry-run never
    calls it; a test that forgot --dry-run fails instead of touching a cloud project)."""
    stub = tmp_path_factory.mktemp("stub") / "gcloud"
    stub.write_text("#!/bin/sh\necho 'the test called gcloud' >&2\nexit 99\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry(*args: str) -> list[list[str]]:
    """The commands --dry-run prints, each split into its arguments."""
    out = run("--dry-run", *args).stdout  # first: after "--" it would be a jdpo override
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def remote(cmd: list[str]) -> str:
    """The script an ssh command runs on the workers."""
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    return cmd[cmd.index("--command") + 1]


def train_argv(script: str) -> list[str]:
    """The `jdpo train ...` argument vector inside the launch script, as the remote shell will see it."""
    m = re.search(r"setsid nohup (.*?) > jdpo-runs/\S+/train\.log", script)
    assert m, script
    return shlex.split(m.group(1))


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "my tpu config.yaml"  # a space in the name: must survive quoting
    path.write_text("train:\n  max_steps: 10\n")
    return path


def test_help_documents_every_option():
    text = run("--help").stdout
    source = SCRIPT.read_text()
    options = set(re.findall(r"^\s+(--[a-z-]+|-h \| --help)\)", source, re.M)) - {"-h | --help"}
    assert len(options) > 20
    for opt in options:
        assert re.search(rf"^\s+{re.escape(opt)}\b", text, re.M), f"{opt} is not in --help"
    for command in ("create", "setup", "launch", "logs", "status", "stop", "delete"):
        assert re.search(rf"^\s+{command}\s", text, re.M), command
    assert run("-h").stdout == text


def test_create_defaults_the_runtime_version_by_generation():
    (cmd,) = dry("create", *BASE, "--accelerator-type", "v5litepod-16", "--project", "my-proj", "--spot")
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "dpo-pod", "--zone=us-west4-a", "--project=my-proj",
        "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip
    (cmd,) = dry("--create", *BASE, "--accelerator-type", "v6e-32", "--version", "my-runtime")
    assert "--version=my-runtime" in cmd and "--spot" not in cmd


def test_setup_installs_jdpo_tpu_from_a_git_ref_on_every_worker():
    (cmd,) = dry("setup", *BASE, "--git", "https://github.com/org/jdpo", "--ref", "v0.1.0")
    assert "--worker=all" in cmd
    script = remote(cmd)
    assert "python3 -m venv jdpo-venv" in script
    install = next(part for part in script.split(";") if "pip install" in part and "jdpo[tpu]" in part)
    assert shlex.split(install)[-1] == "jdpo[tpu] @ git+https://github.com/org/jdpo@v0.1.0"
    # A new commit with an unchanged version number still replaces the installed jdpo.
    reinstall = next(part for part in script.split(";") if "--force-reinstall" in part)
    assert shlex.split(reinstall)[-3:] == [
        "--force-reinstall",
        "--no-deps",
        "jdpo @ git+https://github.com/org/jdpo@v0.1.0",
    ]
    assert script.rstrip().endswith("jdpo-venv/bin/jdpo --version")


def test_setup_from_a_wheel_copies_it_to_every_worker_first(tmp_path):
    wheel = tmp_path / "jdpo-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    scp, ssh = dry(
        "setup", *BASE, "--wheel", str(wheel), "--venv", "envs/dpo", "--pip-args", "--no-cache-dir"
    )
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [str(wheel), "dpo-pod:jdpo-0.1.0-py3-none-any.whl"] and "--worker=all" in scp
    script = remote(ssh)
    install = next(part for part in script.split(";") if "[tpu]" in part)
    assert shlex.split(install) == [
        "envs/dpo/bin/pip", "install", "--no-cache-dir", "--upgrade", "./jdpo-0.1.0-py3-none-any.whl[tpu]"
    ]  # fmt: skip


def test_launch_passes_config_output_and_overrides_through_quoted(config):
    overrides = ["--dpo.beta", "0.2", "--data.train", "a b.jsonl,$HOME/c.jsonl", "--model.path=/m/it's here"]
    cmds = dry(
        "launch", *BASE, "--config", str(config), "--output-dir", "gs://bucket/runs/x", "--run", "exp1",
        "--env", "HF_HOME=/mnt/hf cache", "--", *overrides,
    )  # fmt: skip
    mkdir, scp, start = cmds
    assert remote(mkdir) == "mkdir -p jdpo-runs/exp1"
    assert scp[5:7] == [str(config), "dpo-pod:jdpo-runs/exp1/my_tpu_config.yaml"]
    for cmd in cmds:
        assert "--worker=all" in cmd and "--zone=us-west4-a" in cmd
    script = remote(start)
    assert train_argv(script) == [
        "env", "HF_HOME=/mnt/hf cache",
        "jdpo-venv/bin/jdpo", "train", "--config", "jdpo-runs/exp1/my_tpu_config.yaml",
        "--train.output_dir", "gs://bucket/runs/x", *overrides,
    ]  # fmt: skip
    # Backgrounded in its own session, every stream redirected (ssh returns at once), pid recorded.
    assert "setsid nohup " in script and "2>&1 < /dev/null &" in script
    assert "echo $! > jdpo-runs/exp1/train.pid" in script


def test_the_launch_script_runs_in_a_real_shell(config, tmp_path):
    """The remote script, run by bash with a fake `jdpo` in the venv: the program receives exactly the
    overrides, detached, with its log and pid file in jdpo-runs/RUN."""
    overrides = ["--data.train", "a b.jsonl,$HOME/c.jsonl", "--x=it's", "--y", '"q"', "--z", "`id`;"]
    (start,) = dry("launch", *BASE, "--remote-config", "/shared/c.yaml", "--", *overrides)
    home = tmp_path / "home"
    fake = home / "jdpo-venv" / "bin" / "jdpo"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$HOME/argv.txt"\n')
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", "-c", remote(start)], cwd=home, env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "started run jdpo" in proc.stdout
    pid = int((home / "jdpo-runs" / "jdpo" / "train.pid").read_text())
    for _ in range(100):
        if (home / "argv.txt").exists() and (home / "argv.txt").read_text().count("\n") >= 10:
            break
        subprocess.run(["sleep", "0.05"])
    assert (home / "argv.txt").read_text().splitlines() == ["train", "--config", "/shared/c.yaml", *overrides]
    assert pid > 0 and (home / "jdpo-runs" / "jdpo" / "train.log").exists()


def test_launch_checks_the_config_with_the_local_jdpo_first(config, monkeypatch):
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "jdpo").exists():
        pytest.skip("the jdpo console script is not installed next to this python")
    monkeypatch.setenv("PATH", f"{venv_bin}:{os.environ['PATH']}")
    args = ["--dry-run", "launch", *BASE, "--config", str(config)]
    proc = run(*args, "--", "--dpo.bta", "0.2", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "the config does not load" in proc.stderr and "did you mean 'dpo.beta'" in proc.stderr
    assert "train --config" in run(*args, "--", "--dpo.beta", "0.2").stdout
    assert run(*args, "--no-validate", "--", "--dpo.bta", "0.2").returncode == 0


def test_logs_status_stop_delete():
    logs, status, stop, delete = dry("logs", "status", "stop", "delete", *BASE, "--run", "r2", "--yes")
    assert "--worker=0" in logs and remote(logs) == "tail -n 200 -F jdpo-runs/r2/train.log"
    assert "--worker=all" in status and "jdpo-runs/r2/train.pid" in remote(status)
    assert "--worker=all" in stop and 'kill -TERM -- "-$pid"' in remote(stop)
    assert delete[4:] == ["delete", "dpo-pod", "--zone=us-west4-a", "--quiet"]
    (stop,) = dry("stop", *BASE, "--force", "--worker", "0-3")
    assert "--worker=0-3" in stop and 'kill -KILL -- "-$pid"' in remote(stop)
    (logs,) = dry("logs", *BASE, "--log-worker", "3")
    assert "--worker=3" in logs
    (delete,) = dry("delete", *BASE)
    assert "--quiet" not in delete  # gcloud asks before deleting


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no command given"),
        (["launch", "--zone", "us-west4-a"], "--name is required"),
        (["launch", "--name", "x"], "--zone is required"),
        (["stop", "--name", "Bad_Name", "--zone", "us-west4-a"], "lowercase letters"),
        (["stop", "--name", "x", "--zone", "europe"], "does not look like a zone"),
        (["frobnicate", *BASE], "unknown argument 'frobnicate'"),
        (["stop", *BASE, "--dpo.beta", "0.2"], "overrides go after '--'"),
        (["create", *BASE], "create needs --accelerator-type"),
        (["create", *BASE, "--accelerator-type", "v99-8"], "give --version"),
        (["setup", *BASE], "setup needs --git URL"),
        (["setup", *BASE, "--git", "u", "--wheel", "w.whl"], "not both"),
        (["setup", *BASE, "--wheel", "/nonexistent.whl"], "does not exist"),
        (["launch", *BASE], "launch needs --config"),
        (["launch", *BASE, "--config", "/nonexistent.yaml"], "does not exist"),
        (["launch", *BASE, "--config"], "--config needs a value"),
        (["launch", *BASE, "--config", "--dry-run"], "--config needs a value"),
        (["launch", *BASE, "--remote-config", "c.yaml", "--output-dir", "runs/x"], "gs:// path"),
        (["launch", *BASE, "--remote-config", "c.yaml", "--env", "1X=2"], "KEY=VALUE"),
        (["stop", *BASE, "--worker", "some"], "expected all"),
        (["stop", "stop", *BASE], "given twice"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(args, message):
    proc = run("--dry-run", *args, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and "--help" in proc.stderr


def test_without_dry_run_gcloud_is_required(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "stop", *BASE], env={"PATH": str(tmp_path)}, capture_output=True, text=True,
        timeout=30, executable=shutil.which("bash"),
    )  # fmt: skip
    assert proc.returncode == 2 and "gcloud is not installed" in proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
