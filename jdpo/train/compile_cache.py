"""XLA's persistent compilation cache for a run: a rerun, a resume or a second run of the same program
loads its compiled executables from disk instead of compiling them again.

JAX keeps one cache directory per process (`jax_compilation_cache_dir`), fixed by the first compilation
that reads it. So the first run of a process decides: `enable` sets the directory only when nothing
(the `JAX_COMPILATION_CACHE_DIR` environment variable, the user's own `jax.config.update`, an earlier
run in this process) has set one, and says which directory is in use. Executables are cached only when
they took longer to compile than `jax_persistent_cache_min_compile_time_secs` (JAX's default, 1 s), so
small programs cost no disk. Entries are keyed by the program, the devices, the backend version and the
compile options; a hit is the executable a fresh compilation would have produced, so results are
bit-identical with or without it.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)

#: `train.compile_cache` values that turn the cache off.
OFF = ("none", "off")


def directory(setting: str, output_dir) -> str | None:
    """The directory `train.compile_cache` names: '' -> `<output_dir>/../.jdpo_xla_cache` (beside the
    reference cache, so runs of one project share it); 'none' -> None."""
    if setting.lower() in OFF:
        return None
    return str(setting or (output_dir.parent / ".jdpo_xla_cache"))


def enable(setting: str, output_dir) -> str | None:
    """Point JAX's persistent compilation cache at the run's directory unless one is already set; returns
    the directory in use (None: off)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    wanted = directory(setting, output_dir)
    if wanted is None:
        return None
    jax.config.update("jax_compilation_cache_dir", wanted)
    log.info("XLA compilation cache: %s", wanted)
    return wanted
