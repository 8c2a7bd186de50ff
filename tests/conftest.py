"""Test setup: 8 simulated CPU devices (to exercise sharding) before JAX runs anything, one persistent
compilation cache per test process, and the session-wide tiny task. The shared helpers behind the
fixtures are in helpers.py."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Most tests compile the same few programs of the same tiny model (a train step, a reference pass): one
# XLA cache for this worker, caching every program however fast it compiled, serves them all, and is
# inherited by the runs the tests start as subprocesses (`jdpo.train.compile_cache` leaves a set one alone).
# Fresh per session, so no test depends on an earlier session's entries.
_XLA_CACHE = tempfile.mkdtemp(prefix="jdpo-tests-xla-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny a+b task (sums up to 19 + 19, 40 held out) with a random tiny model (hidden 32, 2 layers,
    vocab 128), built once per session. Modules that need another size override `assets` with their own
    `helpers.build_tiny_assets`."""
    from helpers import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("train_assets"), max_operand=19, eval_pairs=40)
