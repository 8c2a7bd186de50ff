"""`train.compile_cache`: XLA's persistent compilation cache, on by default beside the run, so a rerun
loads its compiled programs instead of compiling them (`jdpo.train.compile_cache`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from helpers import logged_records, run_config

from jdpo import config as jconfig
from jdpo.report import metrics
from jdpo.train import compile_cache

WORKER = Path(__file__).with_name("fault_worker.py")  # `none`: a whole `train.run` in a fresh process


def _run(cfg, tmp_path, name: str) -> list[dict]:
    path = tmp_path / f"{name}.yaml"
    jconfig.dump(cfg, path)
    # The run picks its own cache: not the test session's (conftest), and every program cached however
    # fast it compiled (JAX's default threshold, 1 s, leaves out everything this tiny model compiles).
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    subprocess.run([sys.executable, str(WORKER), str(path), "none"], env=env, timeout=300, check=True)
    return logged_records(Path(cfg.train.output_dir) / metrics.METRICS_FILE)


# slow (29 s, two whole runs): the setting itself is covered fast by the test below.
@pytest.mark.slow
def test_a_rerun_finds_every_program_in_the_cache_beside_the_run_and_logs_the_same(assets, tmp_path):
    over = {"train.max_steps": 3, "train.eval_every": 2, "dpo.cache_dir": ""}
    first = _run(run_config(assets, tmp_path / "first", **over), tmp_path, "first")
    cache = tmp_path / ".jdpo_xla_cache"  # the default: <output_dir>/../.jdpo_xla_cache
    entries = sorted(os.listdir(cache))
    assert len(entries) >= 3  # at least the reference pass, the train step and the eval step
    second = _run(run_config(assets, tmp_path / "second", **over), tmp_path, "second")
    assert sorted(os.listdir(cache)) == entries  # nothing compiled that was not already there
    assert second == first


def test_an_existing_cache_setting_is_kept_and_none_turns_it_off(tmp_path):
    out = tmp_path / "run"
    assert compile_cache.directory("", out) == str(tmp_path / ".jdpo_xla_cache")
    assert compile_cache.directory("/elsewhere", out) == "/elsewhere"
    assert compile_cache.directory("none", out) is None
    # This process's cache is the test session's (conftest): a run never moves it.
    session = jax.config.jax_compilation_cache_dir
    assert session and compile_cache.enable("", out) == session
    assert jax.config.jax_compilation_cache_dir == session
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert compile_cache.enable("none", out) is None and jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", session)
