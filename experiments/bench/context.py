"""Context parallelism on 8 simulated CPU devices: XLA's memory of the compiled train step per device and
the step time, one packed row of T tokens split over C devices (`mesh.context`), all-gather vs ring.

    python experiments/bench/context.py --lengths 8192 16384 32768 --contexts 1 4 8 --out results/context.json

The step is the policy's forward and backward on one row (`pair_logprobs`, the gradient of the summed
log-probs of its pairs): a small llama (D 64, 2 layers, 4 query / 2 kv heads of 16, vocab 256),
float32, remat none, the blocked kernel. The row holds 4 pairs (8 segments of T / 8 tokens, half of each
scored), so attention is long-range and causal. Context C runs on the first C devices (data = fsdp =
tensor = 1): the memory per device is what one device of C holds of the same row. The time is the
median of `--steps` steps after one warm-up; on a 2-core machine the C simulated devices share 2 cores,
so the time ratio measures the added work (collectives, the balanced layout's exchanges, the ring's
steps), not a parallel speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jdpo.data.batch import Batch  # noqa: E402
from jdpo.models import ModelConfig, ModelOptions, Transformer  # noqa: E402
from jdpo.parallel.sharding import make_mesh  # noqa: E402
from jdpo.scoring.forward import pair_logprobs  # noqa: E402

MODEL = dict(
    model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1 << 20,
)  # fmt: skip


def one_row(T: int, pairs: int = 4) -> Batch:
    """One row of `pairs` pairs: 2 x pairs segments of T / (2 pairs) tokens, the second half scored."""
    rng = np.random.default_rng(0)
    seg_len = T // (2 * pairs)
    ids = rng.integers(3, 256, (1, T)).astype(np.int32)
    seg = np.repeat(np.arange(1, 2 * pairs + 1, dtype=np.int32), seg_len)[None]
    pos = np.tile(np.arange(seg_len, dtype=np.int32), 2 * pairs)[None]
    targets = np.where(np.roll(seg, -1) == seg, np.roll(ids, -1), 0).astype(np.int32)
    mask = ((pos >= seg_len // 2) & (targets > 0)).astype(np.float32)
    return Batch(ids, pos, seg, targets, mask, np.arange(pairs, dtype=np.int32)[None])


def measure(T: int, C: int, how: str, steps: int) -> dict:
    options = ModelOptions(attention="blocked", context_attention=how, context=C)
    model = Transformer(ModelConfig.from_hf(MODEL), options=options, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params, batch):
        out = pair_logprobs(nnx.merge(graphdef, params), batch)
        return jnp.sum(out["chosen"] - out["rejected"])

    mesh = make_mesh(context=C, devices=jax.devices()[:C])
    batch = one_row(T)
    with jax.set_mesh(mesh):
        batch = batch.on_mesh(mesh)
        step = jax.jit(jax.value_and_grad(loss))
        t0 = time.perf_counter()
        compiled = step.lower(params, batch).compile()
        compile_s = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        jax.block_until_ready(compiled(params, batch))
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, batch))
            times.append(time.perf_counter() - t0)
    return {
        "row_length": T, "context": C, "how": how if C > 1 else "-",
        "temp_bytes": int(ma.temp_size_in_bytes),
        "peak_bytes": int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes),
        "step_s": statistics.median(times), "compile_s": compile_s,
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--contexts", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    for T in args.lengths:
        base = None
        for C in args.contexts:
            for how in ("all_gather", "ring") if C > 1 else ("all_gather",):
                r = measure(T, C, how, args.steps)
                base = base or r
                r["time_ratio"] = r["step_s"] / base["step_s"]
                r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
                rows.append(r)
                print(
                    f"T={T:>6} context={C} {r['how']:>10}: peak {r['peak_bytes'] / 2**20:8.1f} MiB/device "
                    f"(temp {r['temp_bytes'] / 2**20:8.1f}), step {r['step_s']:7.2f} s "
                    f"(x{r['time_ratio']:.2f}), compile {r['compile_s']:.1f} s",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
