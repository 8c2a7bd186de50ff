"""`jdpo bench`: how fast a config trains here, measured the way a run would see it.

    result = run_bench(cfg, steps=10, warmup=2, out_json="bench.json")
    print(format_bench(result))

What is measured, in this order, in one process:
  1. the machine's peak: on CPU the measured float32 matmul rate (`flops.measured_cpu_peak_flops`,
     taken in this run, before anything else loads the cores); on GPU/TPU the published peak;
  2. set-up (`train.Trainer`), which runs the reference pass once into a fresh cache directory (its
     time includes compiling the forward), then the reference pass again, warm: `ref_pass_s`;
  3. compile time of the train step: `lower` + `compile`, timed alone (AOT, so the timed steps run
     the very executable that was compiled);
  4. `warmup` untimed steps, then `steps` timed steps. Each timed step is what the trainer's loop
     does: build the host batch (packing, reference look-up), transfer, run, block until ready;
     `step_time` is its median, `device_step_time` the median of the run + block part alone.

Throughput counts pairs (valid pair slots) and computed tokens of the timed steps (`flops.token_counts`,
as the train records count them: non-pad row slots, so a shared prompt once). MFU credits model
FLOPs only (`flops.train_flops`: 6 x matmul params per computed token plus attention over the keys the
mask lets each query see, a branch's shared prompt included; no padding, no remat recomputation, no
attention to masked keys; a LoRA run 4 x the frozen
matmul params, no weight gradient, plus 6 x its adapters). The "head on scored"
MFU is stricter: the D x V unembedding is credited only on scored (completion, `loss_mask` > 0)
tokens, the only positions DPO needs logits for and the only ones jdpo projects; everything else is
credited as in `mfu`. The "incl. reference" figures add the reference pass amortised over the run:
its time and its forward FLOPs over every pair once, spread over the run's steps (one epoch by
default).

Peak memory: `memory_stats()["peak_bytes_in_use"]` of the device on GPU/TPU; on CPU the process's
peak RSS (everything: Python, data, XLA). XLA's own view of the train step (arguments + outputs +
temporaries of the compiled executable) is reported next to it, and the `jdpo plan` estimate.
"""

from __future__ import annotations

import json
import logging
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jdpo import config as C
from jdpo.commands import plan
from jdpo.commands.plan import human
from jdpo.models.kernels import tile_of
from jdpo.report.flops import (
    TokenCounts,
    computed_attention_keys,
    forward_flops,
    matmul_params,
    measured_cpu_peak_flops,
    token_counts,
    total_peak_flops,
    train_flops,
)
from jdpo.report.metrics import si_number
from jdpo.scoring.forward import over_split
from jdpo.train import refcache
from jdpo.train import trainer as train

log = logging.getLogger(__name__)


def _peak_memory_bytes() -> tuple[int, str]:
    """(bytes, what) of peak memory: the device's peak on accelerators, else this process's peak RSS."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), f"{dev.device_kind} peak_bytes_in_use"
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def bench_config(cfg, *, work_dir: str | Path):
    """The config as benchmarked: outputs and a fresh reference cache under `work_dir` (so the
    reference pass is measured, not loaded), no console / TensorBoard, no export."""

    work_dir = Path(work_dir)
    return C.replace(
        cfg,
        **{
            "train.output_dir": str(work_dir / "run"),
            "dpo.cache_dir": str(work_dir / "refcache"),
            "logging.console": False,
            "logging.tensorboard": False,
            "logging.wandb": False,
            "train.export": False,
        },
    )


def host_info() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model and count (XLA:CPU's speed differs between processors of
    the same class; results are compared by it), Python and jax versions."""
    import os
    import platform

    import jax

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def run_bench(
    cfg, *, steps: int = 10, warmup: int = 2, out_json: str | Path | None = None, mesh=None
) -> dict[str, Any]:
    """Benchmark training `cfg` (see the module docstring); returns the result dict (also written to
    `out_json` when given)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    platform = jax.default_backend()
    peak_s = _measure_peak(platform)

    with tempfile.TemporaryDirectory(prefix="jdpo-bench-") as work:
        c = bench_config(cfg, work_dir=work)
        t0 = time.perf_counter()
        tr = train.Trainer(c, mesh=mesh)
        setup_s = time.perf_counter() - t0
        hf_cfg = tr.model_config.to_hf()
        peak = total_peak_flops(list(tr.mesh.devices.flat))
        window = tr.model_config.sliding_window
        kernel, block = tr.attention
        tile = tile_of(kernel, block, tr.data.layout.row_length)

        ref_first_s, ref_s, ref = _reference_pass(tr, window)

        compile_s, xla_bytes, step_times, device_times, counts, computed_keys, state, m = _timed_steps(
            tr, steps, warmup, kernel=kernel, tile=tile, window=window
        )
        tr.state = state
        loss = float(m["loss"])
        peak_mem, peak_what = _peak_memory_bytes()

    # Every count above is this host's rows (the reference pass included): summed over the processes.
    counts, ref = counts.over_processes(), ref.over_processes()
    tokens, keys, scored, pairs = counts.tokens, counts.attended_keys, counts.scored, counts.pairs
    computed_keys *= jax.process_count()  # the kernel's work, for its ratio to the credited keys
    step_time = statistics.median(step_times)
    total_time = step_time * steps  # the median step, so a hiccup from a neighbour does not count
    lora = tr.lora_params()
    flops = train_flops(hf_cfg, tokens=tokens, attended_keys=keys, lora_params=lora)
    flops_sh = train_flops(hf_cfg, tokens=tokens, attended_keys=keys, head_tokens=scored, lora_params=lora)
    result: dict[str, Any] = {
        "platform": platform,
        "device": jax.devices()[0].device_kind,
        "host": host_info(),
        "num_devices": int(tr.mesh.devices.size),
        "model_params": tr.model_config.num_params(),
        "matmul_params": matmul_params(hf_cfg),
        "dtype": str(np.dtype(tr.dtype)),
        "attention": kernel,
        "attention_tile": tile,
        "batch_rows": c.train.batch_rows,
        "grad_accum": c.train.grad_accum,
        "row_length": tr.data.layout.row_length,
        "max_pairs_per_row": tr.data.layout.max_pairs_per_row,
        "num_pairs": len(tr.data.train_pairs),
        "steps_per_epoch": tr.data.steps_per_epoch,
        "total_steps": tr.data.total_steps,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "peak_flops": peak,
        "peak_flops_source": "measured f32 matmul" if platform == "cpu" else "published bf16 dense",
        "peak_measure_s": peak_s,
        "setup_s": setup_s,
        "ref_pass_first_s": ref_first_s,
        "ref_pass_s": ref_s,
        "compile_s": compile_s,
        "step_time": step_time,
        "step_time_min": min(step_times),
        "step_time_max": max(step_times),
        "device_step_time": statistics.median(device_times),
        "step_times": step_times,
        "pairs_per_step": pairs / steps,
        "pairs_per_s": pairs / total_time,
        "tokens_per_s": tokens / total_time,
        "tokens_per_step": tokens / steps,
        "padding_fraction": counts.padding_fraction,
        "train_flops_per_step": flops / steps,
        # The kernel's attention work against the credited (visible) pairs (>= 1: the tiles it
        # computes beyond them; 1 would be a kernel that computes only the credited pairs).
        "attention_keys_credited": keys,
        "attention_keys_computed": computed_keys,
        "attention_computed_per_credited": computed_keys / keys if keys else None,
        "mfu": flops / (total_time * peak) if peak else None,
        "mfu_scored_head": flops_sh / (total_time * peak) if peak else None,
        "final_loss": loss,
        "peak_memory_bytes": peak_mem,
        "peak_memory_what": peak_what,
        "xla_step_bytes": xla_bytes,
    }
    if ref_s is not None:
        result.update(
            _amortised_reference(
                tr, hf_cfg, ref, ref_s, flops, flops_sh, pairs, tokens, steps, step_time, peak
            )
        )
    result["plan_bytes"] = _plan_bytes(tr, c, platform)
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _measure_peak(platform: str) -> float:
    """First, while the cores are quiet: the denominator of MFU (cached; reused for the mesh). Seconds."""
    t0 = time.perf_counter()
    if platform == "cpu":
        measured_cpu_peak_flops()
    return time.perf_counter() - t0


def _reference_pass(tr, window):
    """The reference pass again, warm (compiled): what the pass costs per run, without compile.
    Returns (first pass seconds from the cache manifest, warm seconds, its TokenCounts)."""
    if tr.config.dpo.reference != "cached":
        return None, None, TokenCounts()
    manifest = json.loads(
        (tr.reference.cache_dir / tr.reference.keys["train"] / refcache.MANIFEST).read_text()
    )
    ref_first_s = float(manifest["seconds"])
    batches = list(tr.data.one_pass(tr.data.train_pairs))
    ref = token_counts(batches, sliding_window=window, sliding_layers=tr.model_config.sliding_layers)
    t0 = time.perf_counter()
    # A LoRA run's forward takes the adapters with the frozen base (`Trainer.logprobs`).
    params = tr.state.params if tr.state.base is None else (tr.state.params, tr.state.base)
    over_split(tr.steps.forward, params, batches, len(tr.data.train_pairs), mesh=tr.mesh)
    ref_s = time.perf_counter() - t0
    return ref_first_s, ref_s, ref


def _timed_steps(tr, steps: int, warmup: int, *, kernel: str, tile: int, window):
    """Compile the step ahead of time, run `warmup` steps, then time `steps` of them."""
    # Compile, alone and ahead of time; the timed steps run this executable.
    batch, host = tr.next_step_batches()
    t0 = time.perf_counter()
    compiled = tr.steps.train_step.lower(tr.state, batch).compile()
    compile_s = time.perf_counter() - t0
    xla_bytes = None
    try:
        ma = compiled.memory_analysis()
        xla_bytes = int(
            ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )  # fmt: skip
    except Exception:  # not every backend reports it
        pass

    state = tr.state
    for i in range(warmup):
        if i:
            batch, host = tr.next_step_batches()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    step_times, device_times = [], []
    counts, computed_keys = TokenCounts(), 0
    for i in range(steps):
        t0 = time.perf_counter()
        if warmup or i:
            batch, host = tr.next_step_batches()
        t1 = time.perf_counter()
        state, m = compiled(state, batch)
        m = jax.device_get(m)
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        device_times.append(t2 - t1)
        counts += token_counts(host, sliding_window=window, sliding_layers=tr.model_config.sliding_layers)
        for b in host:
            computed_keys += computed_attention_keys(
                kernel, b["segment_ids"], tile=tile, sliding_window=window
            )
    return compile_s, xla_bytes, step_times, device_times, counts, computed_keys, state, m


def _amortised_reference(tr, hf_cfg, ref, ref_s, flops, flops_sh, pairs, tokens, steps, step_time, peak):
    """The reference pass amortised over the run: its time and its forward FLOPs spread over its steps."""
    ref_tokens, ref_keys, ref_scored = ref.tokens, ref.attended_keys, ref.scored
    run_steps = tr.data.total_steps
    ref_flops = forward_flops(hf_cfg, tokens=ref_tokens, attended_keys=ref_keys)
    ref_flops_sh = forward_flops(hf_cfg, tokens=ref_tokens, attended_keys=ref_keys, head_tokens=ref_scored)
    t_run = step_time * run_steps + ref_s
    per_step_pairs, per_step_tokens = pairs / steps, tokens / steps
    return {
        "ref_tokens": ref_tokens,
        "ref_flops": ref_flops,
        "ref_tokens_per_s": ref_tokens / ref_s if ref_s else None,
        "pairs_per_s_incl_ref": per_step_pairs * run_steps / t_run,
        "tokens_per_s_incl_ref": per_step_tokens * run_steps / t_run,
        "mfu_incl_ref": ((flops / steps) * run_steps + ref_flops) / (t_run * peak) if peak else None,
        "mfu_scored_head_incl_ref": (
            ((flops_sh / steps) * run_steps + ref_flops_sh) / (t_run * peak) if peak else None
        ),
    }


def _plan_bytes(tr, c, platform: str) -> int | None:
    """`jdpo plan`'s estimate for this run's mesh (a cross-check, never a reason to lose the measurements)."""
    try:
        shape = dict(tr.mesh.shape)
        on_mesh = C.replace(c, **{f"mesh.{k}": shape.get(k, 1) for k in ("data", "fsdp", "tensor")})
        p = plan.plan_memory(
            tr.model_config,
            on_mesh,
            num_devices=int(tr.mesh.devices.size),
            on_cpu=platform == "cpu",
            backend=platform,
        )
        return p.total
    except Exception as e:  # the plan is a cross-check, never a reason to lose the measurements
        log.warning("memory plan failed: %s", e)
        return None


def format_bench(r: dict[str, Any]) -> str:
    """The console table of a `run_bench` result."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def sec(x):
        return "n/a" if x is None else f"{x:.2f} s"

    rows = [
        ("device", f"{r['device']} x {r['num_devices']} ({r['platform']}), {r['dtype']}"),
        ("host", f"{r['host']['cpu_model']}, {r['host']['cpus']} CPUs, jax {r['host']['jax']}"),
        ("model", f"{r['model_params']:,} params ({r['matmul_params']:,} in matmuls)"),
        (
            "batch",
            f"{r['batch_rows']} rows x {r['row_length']} tokens x {r['grad_accum']} accum, "
            f"<= {r['max_pairs_per_row']} pairs/row; {r['num_pairs']:,} pairs, "
            f"{r['steps_per_epoch']:.1f} steps/epoch",
        ),  # fmt: skip
        ("peak FLOP/s", f"{si_number(r['peak_flops'] or 0)}FLOP/s ({r['peak_flops_source']})"),
        ("reference pass", f"{sec(r['ref_pass_s'])} warm, {sec(r['ref_pass_first_s'])} with compile"),
        ("compile", sec(r["compile_s"])),
        (
            "step time",
            f"{r['step_time'] * 1e3:.1f} ms median of {r['timed_steps']} "
            f"(min {r['step_time_min'] * 1e3:.1f}, max {r['step_time_max'] * 1e3:.1f}; "
            f"device {r['device_step_time'] * 1e3:.1f})",
        ),  # fmt: skip
        ("pairs/s", f"{r['pairs_per_s']:.2f} ({r['pairs_per_step']:.1f} pairs/step)"),
        (
            "tokens/s",
            f"{si_number(r['tokens_per_s'])} computed (a shared prompt once)"
            + (f", {r['tokens_per_step']:,.0f} a step" if "tokens_per_step" in r else ""),
        ),
        ("MFU", pct(r["mfu"])),
        (
            "MFU, head on scored",
            f"{pct(r['mfu_scored_head'])} (the unembedding credited on completion tokens only)",
        ),
        ("padding", pct(r["padding_fraction"])),
    ]
    if r.get("attention"):
        ratio = r.get("attention_computed_per_credited")
        work = "n/a" if ratio is None else f"{ratio:.2f}x"
        rows.append((
            "attention",
            f"{r['attention']}, {r['attention_tile']}-position tiles: computes {work} the credited "
            "(query, key) pairs",
        ))  # fmt: skip
    if "pairs_per_s_incl_ref" in r:
        rows += [
            (
                "pairs/s incl. ref",
                f"{r['pairs_per_s_incl_ref']:.2f} (reference pass amortised over {r['total_steps']} steps)",
            ),  # fmt: skip
            ("tokens/s incl. ref", f"{si_number(r['tokens_per_s_incl_ref'])}"),
            # One line for both: a separate "head on scored" key would widen the whole table's key column.
            (
                "MFU incl. ref",
                f"{pct(r['mfu_incl_ref'])}, head on scored {pct(r['mfu_scored_head_incl_ref'])}",
            ),
        ]
    mem = f"{human(r['peak_memory_bytes'])} ({r['peak_memory_what']})"
    if r.get("xla_step_bytes"):
        mem += f"; XLA step buffers {human(r['xla_step_bytes'])}"
    if r.get("plan_bytes"):
        mem += f"; jdpo plan {human(r['plan_bytes'])}"
    rows.append(("peak memory", mem))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
