"""The GPU check of jdpo's accelerator paths, in one go, on one NVIDIA GPU with no network:

    python experiments/device/gpu_check.py OUT_DIR             # on the GPU machine (< 8 minutes)
    python experiments/device/gpu_check.py OUT_DIR --dry-run   # tiny shapes on the CPU (what CI runs)

On a machine whose Python already has jax (CUDA), flax, optax, orbax-checkpoint, transformers,
safetensors and torch, it installs jdpo without dependencies (`pip install --no-deps
--no-build-isolation -e .`: no network for a build environment either; the dry run skips it), then:

  0. environment: jax / jaxlib / flax / transformers / torch versions (jax may be newer than jdpo's
     pin), the devices;
  1. logit parity with `transformers` (PyTorch, on the GPU when torch sees one) for tiny random llama,
     qwen2 and gemma2 models, float32 and bfloat16, with the kernel `model.attention: auto` picks
     (pallas_gpu for llama / qwen2; gemma2 soft-caps, so blocked) and with xla;
  2. the GPU kernel (`pallas_gpu`) and the blocked kernel against dense attention (xla, float32),
     values and gradients, on packed rows of hh-rlhf-like segments, float32 and bfloat16; and the
     forward + backward time of each kernel;
  2b. jdpo's flash kernel for a context-ring chunk pair (`jdpo.models.flash_gpu`, what
     `model.attention: pallas_gpu` runs with `mesh.context` > 1) compiled by Triton (interpret=False):
     one GPU is one device, so no context mesh; instead the ring's work on one device, the second half
     of each row's queries against both key chunks (the diagonal call from offset 0, the earlier chunk
     fully visible from offset L, separate query and key segment ids), merged by log-sum-exp, each
     call's backward given the merged out / lse, against dense float32 attention, values and gradients,
     float32 and bfloat16, plain and with a window and soft-capped scores; and the forward + backward
     time of the kernel on the diagonal against jax's `pallas_gpu` kernel (mha) on the same chunk;
  3. `jdpo bench` (a subprocess each, so that peak device memory is per bench) on a random
     Qwen2.5-0.5B-shaped model, bfloat16 compute, packed rows of 4096 tokens of hh-rlhf-like lengths:
     step time, non-pad tokens/s, MFU against the GPU's published bf16 dense peak (H100 / H200 SXM:
     989 TFLOP/s), peak device memory next to the `jdpo plan` estimate, compile time;
  4. the same bench with `model.attention: xla` for the ratio (at fewer rows per step, and the kernel
     again at those rows, when `jdpo plan` says the dense kernel's probabilities do not fit).

Every result goes to OUT_DIR (env.json, parity.json, kernels.json, bench_*.json with each bench's log,
summary.json) and one summary table is printed at the end and written to OUT_DIR/summary.md. Exit
status 0 when every check passed, 1 otherwise (the table says which).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments" / "bench"))  # assets.py: tokenizer and hh-like records
# This checkout's jdpo even if the install fails (the summary says so): the checks still run.
sys.path.insert(0, str(REPO))

#: Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B-Instruct), random weights. Tagged llama, so
#: without Qwen2's q / k / v biases (1,152 parameters a layer; the FLOPs are the same): transformers 5's
#: AutoTokenizer gives a qwen2 checkpoint its Qwen2 tokenizer class whatever tokenizer.json holds, which
#: breaks the benchmark's word-level tokenizer (experiments/bench/assets.py).
QWEN_05B = dict(
    family="llama", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
    num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
    max_position_embeddings=32768,
)  # fmt: skip
TINY_QWEN = dict(QWEN_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16)  # fmt: skip

# Pass thresholds. float32 on a GPU may run its matmuls in TF32 (XLA's and Triton's default), so the
# float32 bounds allow ~1e-3 relative error; bfloat16 has 8 bits of mantissa.
PARITY_TOL = {"float32": 2e-2, "bfloat16": 0.25}  # max |logit difference| (logits of tiny models are O(1))
KERNEL_TOL = {"float32": 1e-2, "bfloat16": 3e-2}  # max |error| / max |reference|, values and gradients


class Budget:
    """Wall-clock budget of the whole check (the GPU machine's session is short)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def install(out: Path) -> dict:
    """jdpo into this Python without touching its dependencies (or the network)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(REPO)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    (out / "install.log").write_text(p.stdout + p.stderr)
    return {"command": " ".join(cmd), "returncode": p.returncode, "tail": (p.stdout + p.stderr)[-2000:]}


def environment() -> dict:
    import flax
    import jax
    import jaxlib

    env = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    }
    for name in ("transformers", "torch", "optax", "orbax.checkpoint"):
        try:
            module = __import__(name, fromlist=["__version__"])
            env[name] = getattr(module, "__version__", "?")
        except Exception as e:  # reported, not fatal: the checks that need it say so
            env[name] = f"missing ({type(e).__name__})"
    try:
        import torch

        env["torch_cuda"] = bool(torch.cuda.is_available())
    except Exception:
        env["torch_cuda"] = False
    if jax.default_backend() == "gpu":
        env["gpu_platform_version"] = jax.devices()[0].client.platform_version
    return env


# -- 1. parity with transformers ---------------------------------------------------------------------

PARITY_FAMILIES = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "gemma2": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
        query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
}  # fmt: skip


def parity(out: Path, *, dry_run: bool, families: tuple[str, ...] = tuple(PARITY_FAMILIES)) -> list[dict]:
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jdpo.models import ModelOptions, from_pretrained

    device = "cuda" if torch.cuda.is_available() else "cpu"
    T = 40 if dry_run else 256  # > the pallas_gpu tile of 128 on the GPU: several tiles per row
    lengths = (T, T * 2 // 3, T // 3)  # right padding
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                max_position_embeddings=512)  # fmt: skip
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 256, (len(lengths), T)).astype(np.int64)
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    rows = []
    for family in families:
        overrides = PARITY_FAMILIES[family]
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(family, **base, **overrides)
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.05 * torch.randn_like(p))
        path = out / "parity_models" / family
        hf.save_pretrained(path)
        for dtype in ("float32", "bfloat16"):
            model_t = hf.to(device=device, dtype=getattr(torch, dtype))
            with torch.no_grad():
                ref = (
                    model_t(
                        input_ids=torch.from_numpy(ids).to(device),
                        attention_mask=torch.from_numpy(mask).to(device),
                    )
                    .logits.float()
                    .cpu()
                    .numpy()
                )
            for attention in ("auto",) if dry_run else ("auto", "xla"):  # auto is blocked on a CPU
                options = ModelOptions(
                    dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), attention=attention
                )
                model, _ = from_pretrained(path, options=options)
                got = model(jnp.asarray(ids, jnp.int32), segment_ids_BxT=jnp.asarray(mask, jnp.int32))
                diff = float(np.abs(np.asarray(got, np.float32) - ref)[mask.astype(bool)].max())
                rows.append({
                    "family": family, "dtype": dtype, "attention": attention,
                    "kernel": model.options.attention, "max_abs_logit_diff": diff,
                    "tol": PARITY_TOL[dtype], "ok": diff <= PARITY_TOL[dtype], "torch_device": device,
                })  # fmt: skip
    (out / "parity.json").write_text(json.dumps(rows, indent=2) + "\n")
    del hf, model_t
    if device == "cuda":
        torch.cuda.empty_cache()  # the benches' processes need the memory
    return rows


# -- 2. the GPU kernel against dense attention ------------------------------------------------------


def hh_segments(B: int, T: int, seed: int = 0, shrink: int = 1):
    """[B, T] segment ids of packed rows of hh-rlhf-like pairs (prompt + chosen, prompt + rejected),
    greedily filled, padding (0) at the end of each row; lengths divided by `shrink` (the dry run's
    short rows)."""
    import numpy as np
    from assets import synthetic_hh_lengths

    p, c, r = (np.maximum(x // shrink, 1) for x in synthetic_hh_lengths(64 * B, seed=seed))
    seg = np.zeros((B, T), np.int32)
    pairs = iter(zip(p.tolist(), c.tolist(), r.tolist(), strict=True))
    for b in range(B):
        t, s = 0, 1
        for pk, ck, rk in pairs:
            if t + 2 * pk + ck + rk > T:
                break
            for n in (pk + ck, pk + rk):
                seg[b, t : t + n] = s
                t, s = t + n, s + 1
    return seg


def _median_time(fn, *args, n: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def kernels(out: Path, *, dry_run: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdpo.models import AttentionMask
    from jdpo.models.attention import blocked_attention
    from jdpo.models.pallas_gpu import pallas_gpu_attention

    B, T, N, K, H = (2, 128, 4, 2, 16) if dry_run else (4, 4096, 14, 2, 64)  # Qwen2.5-0.5B's heads
    block = 32 if dry_run else 128
    seg = jnp.asarray(hh_segments(B, T, shrink=8 if dry_run else 1))
    real = (np.asarray(seg) > 0)[:, :, None, None]
    if real.mean() < 0.5 or int(np.asarray(seg).max()) < 4:  # a check over padding would check nothing
        raise RuntimeError(
            f"hh_segments: {real.mean():.0%} real positions in {int(np.asarray(seg).max())} segments"
        )
    mask = AttentionMask(seg)
    scale = H**-0.5
    keys = jax.random.split(jax.random.key(0), 4)
    q32, k32, v32 = (
        jax.random.normal(kk, (B, T, n, H), jnp.float32) for kk, n in zip(keys, (N, K, K), strict=False)
    )
    w = jax.random.normal(keys[3], (B, T, N, H), jnp.float32) * real  # cotangent on real positions only

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=scale, implementation="xla")

    impls = {
        "pallas_gpu": lambda q, k, v: pallas_gpu_attention(q, k, v, mask, scale=scale, block=block),
        "blocked": lambda q, k, v: blocked_attention(q, k, v, mask, scale=scale),
        "xla": dense,
    }

    def value_and_grads(fn):
        def loss(q, k, v):
            o = fn(q, k, v)
            return jnp.sum(o.astype(jnp.float32) * w), o

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    def rel(a, b, where=None):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if where is not None:
            a, b = a * where, b * where
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    compiled = {name: value_and_grads(impl) for name, impl in impls.items()}  # jit: one per input dtype
    rows = []
    # The reference: dense attention in float32 of the very inputs (bfloat16 inputs rounded first).
    for dtype in ("float32", "bfloat16"):
        q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
        (_, ref_out), ref_g = compiled["xla"](*(x.astype(jnp.float32) for x in (q, k, v)))
        for name in ("pallas_gpu", "blocked"):
            (_, o), g = compiled[name](q, k, v)
            errs = {
                "values": rel(o, ref_out, real),
                **{f"d{x}": rel(a, b) for x, a, b in zip("qkv", g, ref_g, strict=True)},
            }
            row = {"kernel": name, "dtype": dtype, "shape": f"B={B} T={T} N={N} K={K} H={H}", **errs}
            row["tol"] = KERNEL_TOL[dtype]
            row["ok"] = bool(all(np.isfinite(e) and e <= KERNEL_TOL[dtype] for e in errs.values()))
            rows.append(row)
    # Forward + backward time of each kernel at these shapes, bfloat16.
    q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    timing = {}
    for name in impls:
        try:
            timing[name] = _median_time(compiled[name], q, k, v, n=2 if dry_run else 5)
        except Exception as e:  # the dense kernel may not fit at some shapes: say so, keep the rest
            timing[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    result = {"checks": rows, "fwd_bwd_seconds_bf16": timing, "segments_per_row": int(np.asarray(seg).max())}
    (out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def pair_kernel(out: Path, *, dry_run: bool) -> dict:
    """Stage 2b (module docstring): {"checks": rows like `kernels`', "fwd_bwd_seconds_bf16": {...}}."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdpo.models import AttentionMask, flash_gpu
    from jdpo.models.pallas_gpu import pallas_gpu_attention

    B, T, N, K, H = (1, 64, 4, 2, 16) if dry_run else (4, 4096, 14, 2, 64)
    L, tile = T // 2, 16 if dry_run else 64
    interpret = jax.default_backend() != "gpu"
    seg = jnp.asarray(hh_segments(B, T, shrink=8 if dry_run else 1))
    ids_q, ids_k = seg[:, L:], seg
    scale = H**-0.5
    keys = jax.random.split(jax.random.key(1), 4)
    q32 = jax.random.normal(keys[0], (B, N, L, H), jnp.float32)
    k32, v32 = (jax.random.normal(kk, (B, K, T, H), jnp.float32) for kk in keys[1:3])
    real = (np.asarray(ids_q) > 0)[:, None, :, None]
    w = jax.random.normal(keys[3], (B, N, L, H), jnp.float32) * real

    def dense(q, k, v, softcap, window):  # the second half's queries against the whole row
        kk, vv = (jnp.repeat(x, N // K, axis=1) for x in (k, v))
        s = jnp.einsum("bnth,bnsh->bnts", q, kk, precision="highest") * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        qp, kp = L + jnp.arange(L), jnp.arange(T)
        vis = (ids_q[:, :, None] == ids_k[:, None, :]) & (kp[None, :] <= qp[:, None])[None]
        if window is not None:
            vis &= (qp[:, None] - kp[None, :] < window)[None]
        s = jnp.where(vis[:, None], s, -1e30)
        p = jnp.where(vis[:, None], jax.nn.softmax(s, axis=-1), 0.0)
        return jnp.einsum("bnts,bnsh->bnth", p, vv, precision="highest")

    def pair(q, k, v, softcap, window):
        """(out, dq, dk, dv) of the two calls merged as the ring merges them."""
        kw = dict(softcap=softcap, scale=scale, interpret=interpret)
        calls = [  # (key chunk, keys' ids, mask)
            (slice(0, L), dict(offset=L, causal=window is not None, window=window)),
            (slice(L, T), dict(offset=0, causal=True, window=window)),
        ]
        parts = [
            flash_gpu.forward(q, k[:, :, sl], v[:, :, sl], ids_q, ids_k[:, sl], block_q=tile, block_k=tile,
                              **kw, **m)
            for sl, m in calls
        ]  # fmt: skip
        lse = jnp.logaddexp(parts[0][1], parts[1][1])
        o = sum(p[0].astype(jnp.float32) * jnp.exp(p[1] - lse)[..., None] for p in parts)
        grads = [
            flash_gpu.backward(q, k[:, :, sl], v[:, :, sl], ids_q, ids_k[:, sl], o.astype(q.dtype), lse,
                               w.astype(q.dtype), block_q=min(tile, 32), block_k=min(tile, 32), **kw, **m)
            for sl, m in calls
        ]  # fmt: skip
        dq = grads[0][0] + grads[1][0]
        dk, dv = (jnp.concatenate([grads[0][i], grads[1][i]], axis=2) for i in (1, 2))
        return o, dq, dk, dv

    def rel(a, b, where=None):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if where is not None:
            a, b = a * where, b * where
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    rows = []
    for softcap, window in ((None, None), (50.0, L // 2 + 7)):
        ref_fn = jax.jit(
            lambda q, k, v, softcap=softcap, window=window: jax.vjp(
                lambda q, k, v: dense(q, k, v, softcap, window), q, k, v
            )[1](w)
        )
        got_fn = jax.jit(functools.partial(pair, softcap=softcap, window=window))
        for dtype in ("float32", "bfloat16"):
            q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
            f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
            ref_out, ref_g = dense(*f32, softcap, window), ref_fn(*f32)
            o, *g = got_fn(q, k, v)
            errs = {
                "values": rel(o, ref_out, real),
                **{f"d{x}": rel(a, b) for x, a, b in zip("qkv", g, ref_g, strict=True)},
            }
            what = "window+softcap" if window else "plain"
            row = {
                "kernel": f"flash_gpu pair {what}",
                "dtype": dtype,
                "shape": f"B={B} L={L} N={N} K={K} H={H}",
            }
            row.update(errs, tol=KERNEL_TOL[dtype])
            row["ok"] = bool(all(np.isfinite(e) and e <= KERNEL_TOL[dtype] for e in errs.values()))
            rows.append(row)

    # Forward + backward time on the diagonal chunk, bfloat16: jdpo's kernel against jax's.
    diag = seg[:, L:]
    q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32[:, :, L:], v32[:, :, L:]))
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # jax's kernel: [B, T, heads, H]
    wt = w.astype(jnp.bfloat16)

    def timed(fn, *args):
        loss = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2)))
        return _median_time(loss, *args, n=2 if dry_run else 5)

    timing = {}
    impls = {
        "flash_gpu_diagonal": (
            lambda q, k, v: flash_gpu.flash_attention(
                q, k, v, diag, diag, scale=scale, block_q=tile, block_k=tile, bwd_block_q=min(tile, 32),
                bwd_block_k=min(tile, 32), interpret=interpret,
            ) * wt,
            (q, k, v),
        ),
        "pallas_gpu_mha_diagonal": (
            lambda q, k, v: pallas_gpu_attention(
                q, k, v, AttentionMask(diag), scale=scale, block=tile, interpret=interpret
            ),
            (qt, kt, vt),
        ),
    }  # fmt: skip
    for name, (fn, args) in impls.items():
        try:
            timing[name] = timed(fn, *args)
        except Exception as e:
            timing[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    result = {"checks": rows, "fwd_bwd_seconds_bf16": timing}
    (out / "pair_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# -- 3, 4. jdpo bench -------------------------------------------------------------------------------


def bench_assets(out: Path, *, dry_run: bool, pairs: int) -> dict:
    """A random Qwen2.5-0.5B-shaped model (tiny in the dry run) with a word-level tokenizer of its
    vocabulary, and `pairs` hh-rlhf-like pairs (experiments/bench/assets.py)."""
    import assets as bench_assets_lib  # experiments/bench/assets.py

    from jdpo.models import ModelConfig, init_model, save_pretrained

    shape = TINY_QWEN if dry_run else QWEN_05B
    d = out / "bench_assets"
    model_dir, data = d / "model", d / f"train_{pairs}.jsonl"
    tok = bench_assets_lib.make_tokenizer(shape["vocab_size"])
    if not data.exists():
        d.mkdir(parents=True, exist_ok=True)
        records = bench_assets_lib.make_records(pairs, 0, vocab_size=shape["vocab_size"])
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
    if not (model_dir / "config.json").exists():
        config = ModelConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **shape,
        )
        save_pretrained(init_model(config, seed=0), model_dir, tokenizer=tok)
    return {"model": model_dir, "data": data}


def bench_overrides(paths: dict, *, dry_run: bool, rows: int, attention: str) -> list[str]:
    row_length, max_length = (256, 128) if dry_run else (4096, 512)
    over = {
        "model.path": paths["model"], "data.train": paths["data"], "model.attention": attention,
        "model.dtype": "float32" if dry_run else "bfloat16", "model.param_dtype": "float32",
        "model.scan_layers": "true", "model.remat": "none",
        "data.max_length": max_length, "data.max_prompt_length": max_length // 2,
        "data.row_length": row_length,
        "train.batch_rows": rows, "train.grad_accum": 1, "mesh.fsdp": 1,
    }  # fmt: skip
    return [x for k, v in over.items() for x in (f"--{k}", str(v))]


def planned_bytes(overrides: list[str], num_devices: int = 1) -> int:
    """`jdpo plan`'s per-device total for a bench's settings, for the GPU (auto -> pallas_gpu)."""
    from jdpo import config as C
    from jdpo.commands import plan

    cfg = C.load_config(None, overrides)
    p = plan.plan_memory(plan.read_model_config(cfg.model.path), cfg, num_devices=num_devices, backend="gpu")
    return p.total


def run_bench(out: Path, name: str, overrides: list[str], *, steps: int, warmup: int, timeout: float) -> dict:
    """`jdpo bench` in its own process (its peak device memory is its own); its JSON result, or why not."""
    json_path, log_path = out / f"bench_{name}.json", out / f"bench_{name}.log"
    cmd = [sys.executable, "-c", "import sys; from jdpo.cli import main; sys.exit(main())", "bench",
           "--steps", str(steps), "--warmup", str(warmup), "--json", str(json_path), *overrides]  # fmt: skip
    # The bench's own allocator (this process runs with the platform allocator, see `main`), and most of
    # the device for it: the dense kernel needs the room.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")
    }
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.92"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
        log_path.write_text(p.stdout + p.stderr)
        status = "ok" if p.returncode == 0 and json_path.exists() else f"exit {p.returncode}"
    except subprocess.TimeoutExpired as e:
        log_path.write_text(f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s\n")
        status = f"timed out after {timeout:.0f} s"
    result = json.loads(json_path.read_text()) if status == "ok" else {}
    tail = log_path.read_text().strip().splitlines()[-3:]
    return {"name": name, "status": status, "wall_s": time.monotonic() - t0, "log_tail": tail, **result}


def gpu_memory_bytes() -> int | None:
    """Memory of GPU 0 (torch's view: this process runs jax with the platform allocator, whose
    memory_stats may be empty)."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:
        pass
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


#: The dense kernel's bench runs at the most rows whose `jdpo plan` total is within this share of the
#: device (the plan leaves out XLA's temporaries, which the [B, N, T, T] scores make large).
DENSE_SHARE = 0.5


def benches(out: Path, *, dry_run: bool, budget: Budget) -> list[dict]:
    rows = 2 if dry_run else 8
    steps, warmup = (2, 1) if dry_run else (6, 1)
    pairs = 64 if dry_run else 800  # > (warmup + steps) x rows x ~12 pairs per 4096-token row
    paths = bench_assets(out, dry_run=dry_run, pairs=pairs)
    device_bytes = None if dry_run else (gpu_memory_bytes() or 80 * 2**30)
    main = bench_overrides(paths, dry_run=dry_run, rows=rows, attention="auto")
    plans = {"auto": planned_bytes(main)}
    runs = [("auto", main)]
    # The dense kernel keeps N x T float32 probabilities per token and layer: at fewer rows if it must.
    ratio_rows = rows
    while True:
        dense = bench_overrides(paths, dry_run=dry_run, rows=ratio_rows, attention="xla")
        plans[f"xla_{ratio_rows}rows"] = planned_bytes(dense)
        fits = dry_run or plans[f"xla_{ratio_rows}rows"] <= DENSE_SHARE * device_bytes
        if fits or ratio_rows == 1:
            break
        ratio_rows //= 2
    if ratio_rows != rows:
        runs.append((f"auto_{ratio_rows}rows", bench_overrides(paths, dry_run=dry_run, rows=ratio_rows,
                                                               attention="auto")))  # fmt: skip
    runs.append(("xla" if ratio_rows == rows else f"xla_{ratio_rows}rows", dense))
    results = []
    for i, (name, over) in enumerate(runs):
        timeout = budget.left() / (len(runs) - i) if not dry_run else 600
        r = run_bench(out, name, over, steps=steps, warmup=warmup, timeout=timeout)
        r["rows"] = rows if name == "auto" else ratio_rows
        results.append(r)
    (out / "benches.json").write_text(json.dumps({"plans": plans, "runs": results}, indent=2) + "\n")
    return results


# -- the summary ------------------------------------------------------------------------------------


def _gib(x) -> str:
    return "n/a" if not x else f"{x / 2**30:.2f} GiB"


def summary_rows(env: dict, parity_rows: list[dict], kernel_result: dict, bench_rows: list[dict]) -> list:
    """(check, result, ok) rows of the summary table."""
    rows = [
        ("jax", f"{env.get('jax')} (jaxlib {env.get('jaxlib')}), {', '.join(env.get('devices', []))}", True)
    ]
    if "install" in env:
        rows.append(("pip install --no-deps -e .", f"exit {env['install']['returncode']}",
                     env["install"]["returncode"] == 0))  # fmt: skip
    for r in parity_rows:
        diff = (
            f"max |logit diff| {r['max_abs_logit_diff']:.2e} (tol {r['tol']:g}, torch on {r['torch_device']})"
        )
        rows.append((f"parity {r['family']} {r['dtype']} {r['attention']}->{r['kernel']}", diff, r["ok"]))
    for r in kernel_result.get("checks", []):
        errs = ", ".join(f"{k} {r[k]:.1e}" for k in ("values", "dq", "dk", "dv"))
        rows.append(
            (f"kernel {r['kernel']} {r['dtype']} vs dense", f"{errs} (rel., tol {r['tol']:g})", r["ok"])
        )
    timing = kernel_result.get("fwd_bwd_seconds_bf16", {})
    if timing:
        text = ", ".join(
            f"{k} {v * 1e3:.1f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in timing.items()
        )
        rows.append(("attention fwd+bwd bf16", text, True))
    for r in bench_rows:
        if r["status"] != "ok":
            rows.append((f"bench {r['name']}", f"{r['status']}: {' / '.join(r['log_tail'])}", False))
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        rows.append((
            f"bench {r['name']} ({r.get('attention', '?')}, {r['rows']}x{r['row_length']})",
            f"step {r['step_time'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, MFU {mfu} "
            f"(peak {r['peak_flops'] or 0:.3g}), compile {r['compile_s']:.1f} s, "
            f"peak mem {_gib(r.get('peak_memory_bytes'))} vs plan {_gib(r.get('plan_bytes'))}",
            True,
        ))  # fmt: skip
    ok = {r["name"]: r for r in bench_rows if r["status"] == "ok"}
    for name, r in ok.items():
        if name.startswith("xla"):
            kernel = ok.get("auto" if name == "xla" else "auto" + name[3:])
            if kernel:
                rows.append((f"ratio {kernel['name']} / {name}",
                             f"{r['step_time'] / kernel['step_time']:.2f}x faster step", True))  # fmt: skip
    return rows


def format_table(rows: list) -> str:
    width = max(len(c) for c, _, _ in rows)
    lines = [f"{'check':<{width}}  ok    result", "-" * (width + 60)]
    lines += [f"{c:<{width}}  {'yes' if ok else 'NO ':<4}  {r}" for c, r, ok in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="Directory for every result (created).")
    ap.add_argument("--dry-run", action="store_true", help="Tiny shapes on the CPU; no install.")
    ap.add_argument("--no-install", action="store_true", help="Use the jdpo already importable.")
    ap.add_argument("--budget-s", type=float, default=450.0, help="Wall-clock budget of the whole check.")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:  # this process gives device memory back when it is done with it: the benches need it
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    install_result = None if args.dry_run or args.no_install else install(out)
    env = environment()
    if install_result is not None:
        env["install"] = install_result
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(f"jax {env['jax']} on {env['devices']}", flush=True)
    if not args.dry_run and env["backend"] != "gpu":
        print(f"no GPU: jax's backend is {env['backend']}; use --dry-run for the CPU check", file=sys.stderr)
        return 1

    parity_rows, kernel_result, bench_rows = [], {}, []
    t0 = time.monotonic()
    parity_rows = parity(out, dry_run=args.dry_run)
    print(f"parity done in {time.monotonic() - t0:.1f} s", flush=True)
    t0 = time.monotonic()
    kernel_result = kernels(out, dry_run=args.dry_run)
    print(f"kernels done in {time.monotonic() - t0:.1f} s", flush=True)
    t0 = time.monotonic()
    try:
        pair = pair_kernel(out, dry_run=args.dry_run)
    except Exception as e:  # a Triton lowering failure is a result: report it, keep the benches
        nan = float("nan")
        error = f"{type(e).__name__}: {str(e)[:2000]}"
        row = dict(kernel="flash_gpu pair", dtype="-", values=nan, dq=nan, dk=nan, dv=nan, tol=0.0, ok=False)
        pair = {"checks": [{**row, "error": error}]}
        (out / "pair_kernel.json").write_text(json.dumps(pair, indent=2) + "\n")
        print(f"pair kernel failed: {pair['checks'][0]['error']}", flush=True)
    kernel_result = {
        "checks": kernel_result["checks"] + pair["checks"],
        "fwd_bwd_seconds_bf16": {
            **kernel_result["fwd_bwd_seconds_bf16"],
            **pair.get("fwd_bwd_seconds_bf16", {}),
        },
    }
    print(f"pair kernel done in {time.monotonic() - t0:.1f} s", flush=True)
    bench_rows = benches(out, dry_run=args.dry_run, budget=budget)
    rows = summary_rows(env, parity_rows, kernel_result, bench_rows)
    table = format_table(rows)
    (out / "summary.md").write_text("```\n" + table + "\n```\n")
    (out / "summary.json").write_text(
        json.dumps([dict(check=c, result=r, ok=ok) for c, r, ok in rows], indent=2)
    )
    print(table)
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
