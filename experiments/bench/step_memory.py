"""What a run's train step holds in memory: XLA's buffer sizes of the compiled step and the process RSS.

    python experiments/bench/step_memory.py --config RUN.yaml [section.field=value ...] [--steps 3]

Builds the run's `Trainer` (tokenizer, data, model, reference pass: the cache in the config is used),
compiles the train step for its first batch and prints XLA's `memory_analysis()` (arguments, outputs,
how much of them is aliased, i.e. updated in place through donation, and the temporary buffers), the
process RSS before and after the compile and after `malloc_trim` (the heap the compiler leaves), and the
RSS after each of `--steps` steps. For the buffer-by-buffer picture add
`XLA_FLAGS=--xla_dump_to=DIR` and read `*train_step*memory-usage-report.txt`.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import time

import jax

from jdpo.config import load_config, replace
from jdpo.report.phases import resident_gib
from jdpo.train.trainer import Trainer

GiB = 2**30


def rss_gib() -> float:
    gib = resident_gib()
    return float("nan") if gib is None else gib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    a = ap.parse_args()
    cfg = replace(load_config(a.config), **dict(o.split("=", 1) for o in a.overrides))
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    print(f"set-up {time.perf_counter() - t0:.1f} s, RSS {rss_gib():.2f} GiB")
    batch, _ = trainer.next_step_batches()
    t0 = time.perf_counter()
    compiled = trainer.steps.train_step.lower(trainer.state, batch).compile()
    print(f"compile {time.perf_counter() - t0:.1f} s, RSS {rss_gib():.2f} GiB")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"after malloc_trim, RSS {rss_gib():.2f} GiB")
    ma = compiled.memory_analysis()
    sizes = {
        "arguments": ma.argument_size_in_bytes,
        "outputs": ma.output_size_in_bytes,
        "aliased": ma.alias_size_in_bytes,
        "temporaries": ma.temp_size_in_bytes,
    }
    print("XLA: " + ", ".join(f"{name} {n / GiB:.3f} GiB" for name, n in sizes.items()))
    state = trainer.state
    for i in range(a.steps):
        t0 = time.perf_counter()
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"step {i + 1}: {time.perf_counter() - t0:.2f} s, RSS {rss_gib():.2f} GiB, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
