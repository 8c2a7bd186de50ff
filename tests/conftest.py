"""Test setup: 8 simulated CPU devices (to exercise sharding) before JAX runs anything, and the session-wide
tiny task. The shared helpers behind the fixtures are in helpers.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
