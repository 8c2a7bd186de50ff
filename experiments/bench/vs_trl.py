"""jdpo vs TRL's DPOTrainer, side by side on this CPU: same checkpoint, same pairs, same settings.

    pip install trl            # not a jdpo dependency; installs into this venv on the CPU torch
    python experiments/bench/vs_trl.py --pairs 320 --lengths uniform|hh --model-size 20m|50m --out DIR

What is the same for both:
  - the checkpoint: a random Llama (vocab 32k; `--model-size` 20m or 50m, experiments/bench/assets.py),
    built with jdpo.models.init_model + save_pretrained, loaded by TRL with AutoModelForCausalLM (float32);
  - the pairs: `--pairs` synthetic pairs of the `--lengths` mix (uniform: short prompts ~33 tokens and
    completions ~41, max_length 256; hh: chat-like with a long tail, max_length 512), tokenised to identical
    ids by both (a word-level tokenizer; the script checks that the token totals agree), none truncated;
  - one epoch over all the pairs; sigmoid DPO, beta 0.1, AdamW, lr 5e-7 with 10% warm-up, clip 1.0;
  - the reference: precomputed once before training (TRL `precompute_ref_log_probs=True`; jdpo
    `dpo.reference: cached`, a fresh cache);
  - the trained model is saved at the end (TRL `save_model`; jdpo's export to <output_dir>/final);
  - 2 CPU threads: torch.set_num_threads(2); XLA uses this machine's 2 cores.
What differs, by design: TRL pads each batch of `--batch-pairs` pairs to its longest sequence (chosen and
rejected of a pair are separate rows); jdpo packs whole pairs into rows of 2 * max_length tokens, the whole
number of rows per step nearest `--batch-pairs` pairs (`--rows` to set it; both pairs per step are
reported).

Each framework runs as its own process (jdpo: the `jdpo train` command), alone on the cores:
  - end to end: the whole process's wall time, start to exit (imports, model load, tokenisation, the
    reference pass, compilation, every step, the save); jdpo runs twice, the second time finding its
    compiled programs in the XLA compilation cache the first wrote (`train.compile_cache`), as a rerun
    or a resume does;
  - steady state: every optimizer step end to end (collation / packing, forward, backward, update), the
    first `--steps-warmup` of each left out (jdpo's include compilation); pairs (and the tokens each
    computes: a shared prompt once for jdpo, twice for TRL) of those steps / their summed time. jdpo's
    MFU over the same steps (`flops.token_counts`, as its train records count), of the matmul peak the
    run measured; strict: the unembedding credited on scored completion tokens only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from assets import LENGTHS, MODELS, build  # noqa: E402

BETA, LR, WARMUP_RATIO, MAX_GRAD_NORM, SEED = 0.1, 5e-7, 0.1, 1.0, 0


def measured_run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run one whole process; (wall seconds start to exit, its peak RSS in GiB from the kernel's
    accounting of that child alone, `wait4`)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _need_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit(
            "vs_trl.py needs TRL, which is not a jdpo dependency. Install it into this environment:\n"
            "    pip install trl\n"
            "(it uses the torch already installed; check that pip does not pull a CUDA build of torch)"
        )


# ------------------------------------------------------------------------------------------------
# TRL (run in a child process: `vs_trl.py --trl-child ...`)
# ------------------------------------------------------------------------------------------------


def run_trl(model_dir: str, data: str, *, batch_pairs: int, max_length: int, warmup_steps: int,
            gradient_checkpointing: bool = False) -> dict:
    import torch

    torch.set_num_threads(2)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in open(data)]
    ds = datasets.Dataset.from_list(records)  # in memory: no cached reference log-probs from a previous run
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    # The padded batches as the collator makes them: real vs padded token slots.
    shapes: list[tuple[int, int, int]] = []  # (pairs, non-pad tokens, slots) per collated batch

    ref_time = {"s": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **kw):
        t0 = time.perf_counter()
        out = original(self, *a, **kw)
        ref_time["s"] += time.perf_counter() - t0
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())

    args = DPOConfig(
        output_dir=os.environ.get("TMPDIR", "/tmp") + "/jdpo_vs_trl_out",
        per_device_train_batch_size=batch_pairs,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=LR,
        warmup_steps=int(WARMUP_RATIO * -(-len(records) // batch_pairs)),  # as jdpo: int(ratio * steps)
        lr_scheduler_type="cosine",
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=max_length,
        precompute_ref_log_probs=True,
        # TRL 1.16 turns activation checkpointing on by default; jdpo's default is no remat, so TRL
        # gets the same (faster) choice unless --checkpointing asks both sides to recompute.
        gradient_checkpointing=gradient_checkpointing,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=SEED,
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    setup_s = time.perf_counter() - t0

    collate = trainer.data_collator

    def recording(examples):
        out = collate(examples)
        mask = out["attention_mask"]
        shapes.append((len(examples), int(mask.sum()), int(mask.numel())))
        return out

    trainer.data_collator = recording
    prepared = trainer.train_dataset
    n_pairs = len(prepared)
    cols = (prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
    tokens_total = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(*cols, strict=True))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.save_model(args.output_dir + "/final")  # the trained model, as jdpo exports its own
    save_s = time.perf_counter() - t0
    steps = len(step_ends) - 1
    times = [b - a for a, b in zip(step_ends[:-1], step_ends[1:], strict=True)]
    timed = times[warmup_steps:]
    # Pairs per step: full batches except possibly the last one of the epoch.
    per_step_pairs = [min(batch_pairs, n_pairs - i * batch_pairs) for i in range(steps)]
    timed_pairs = sum(per_step_pairs[warmup_steps:])
    tokens_per_pair = tokens_total / n_pairs
    train_shapes = shapes[-steps:] if len(shapes) >= steps else shapes
    return {
        "framework": f"trl {__import__('trl').__version__} / torch {torch.__version__}",
        "num_pairs": n_pairs,
        "tokens_total": tokens_total,
        "steps": steps,
        "setup_s": setup_s,
        "ref_pass_s": ref_time["s"],
        "train_s": train_s,
        "save_s": save_s,
        "step_times": times,
        "timed_steps": len(timed),
        "timed_s": sum(timed),
        "pairs_per_step": timed_pairs / max(len(timed), 1),
        "pairs_per_s": timed_pairs / sum(timed),
        "tokens_per_s": timed_pairs * tokens_per_pair / sum(timed),
        "padding_fraction": 1 - sum(s[1] for s in train_shapes) / max(sum(s[2] for s in train_shapes), 1),
    }


# ------------------------------------------------------------------------------------------------
# jdpo (a `jdpo train` process)
# ------------------------------------------------------------------------------------------------


def jdpo_plan(model_dir: str, data: str, *, rows: int, max_length: int, max_prompt_length: int,
              batch_pairs: int, shared_prompt: bool) -> dict:  # fmt: skip
    """What `jdpo train` will do with these settings, from the same packing code, without a model: the
    rows per step (`rows` 0: the whole number nearest `batch_pairs` pairs per step), and per step the
    pairs and the FLOPs (`flops.train_flops`: all positions through the unembedding, and the strict
    count with the unembedding on the scored completion tokens only)."""
    import numpy as np
    from transformers import AutoTokenizer

    from jdpo import data as jdata
    from jdpo.models import ModelConfig
    from jdpo.report import flops
    from jdpo.data import layout as train

    tok = AutoTokenizer.from_pretrained(model_dir)
    records = jdata.load_preferences([data])
    pairs, _ = jdata.tokenize_preferences(
        records, tok, max_length=max_length, max_prompt_length=max_prompt_length
    )
    T = 2 * max_length
    lengths = pairs.pair_lengths(shared_prompt)
    P = train.pairs_per_row(T, [lengths])
    if rows <= 0:
        rows = max(1, round(batch_pairs * float(np.mean(lengths)) / T))
    batches = jdata.PreferenceBatches(pairs, rows_per_batch=rows, row_length=T, max_pairs_per_row=P,
                                      seed=SEED, num_epochs=1, shared_prompt=shared_prompt)  # fmt: skip
    hf = ModelConfig.from_hf(model_dir).to_hf()
    steps = []
    for b in batches:  # counted as `jdpo train` counts its records (`flops.token_counts`)
        s = flops.token_counts(b)
        steps.append({
            "pairs": s.pairs,
            "tokens": s.tokens,
            "slots": s.slots,
            "flops": flops.train_flops(hf, tokens=s.tokens, attended_keys=s.attended_keys),
            "flops_strict": flops.train_flops(hf, tokens=s.tokens, attended_keys=s.attended_keys,
                                              head_tokens=s.scored),
        })  # fmt: skip
    if sum(s["tokens"] for s in steps) != int(lengths.sum()):  # every packed pair, counted once
        raise RuntimeError("the token count of the batches differs from the packed pairs' lengths")
    # tokens_total: what jdpo's rows hold; tokens_sequences: prompt + completion per sequence (TRL's).
    return {"rows": rows, "row_length": T, "steps": steps, "tokens_total": int(lengths.sum()),
            "tokens_sequences": int(pairs.pair_lengths().sum()), "num_pairs": len(lengths),
            "shared_prompt": shared_prompt}  # fmt: skip


def run_jdpo(model_dir: str, data: str, work: Path, *, plan: dict, max_length: int, max_prompt_length: int,
             warmup_steps: int, xla_cache: Path, overrides: dict | None = None) -> dict:  # fmt: skip
    """One whole `jdpo train` process (fresh output and reference cache; the XLA compilation cache at
    `xla_cache`), timed from its start to its exit; the steady state from its per-step metrics."""
    import shutil

    run = work / "jdpo_run"
    shutil.rmtree(run, ignore_errors=True)
    over = {
        "model.path": model_dir, "model.dtype": "float32", "model.param_dtype": "float32",
        "data.train": data, "data.max_length": max_length, "data.max_prompt_length": max_prompt_length,
        "dpo.beta": BETA, "dpo.reference": "cached", "dpo.cache_dir": run / "refcache",
        "optim.learning_rate": LR, "optim.warmup_ratio": WARMUP_RATIO, "optim.max_grad_norm": MAX_GRAD_NORM,
        "train.batch_rows": plan["rows"], "train.seed": SEED, "train.num_epochs": 1.0, "train.log_every": 1,
        "train.output_dir": run / "out", "train.compile_cache": xla_cache,
        "data.shared_prompt": str(plan["shared_prompt"]).lower(),
        "logging.console": "false", "logging.tensorboard": "false", **(overrides or {}),
    }  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("jdpo")), "train"]
    for k, v in over.items():
        cmd += [f"--{k}", str(v)]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    process_s, peak_rss_gib = measured_run(cmd, env)
    from jdpo.report import metrics

    records = [r for r in metrics.read_metrics(run / "out" / metrics.METRICS_FILE) if "step_time" in r]
    # The run's phases outside its steps (`jdpo.report.phases`): seconds, and the resident GiB at each end.
    from jdpo.report import phases

    setup = {r["what"]: r for r in phases.read(run / "out")}
    steps = plan["steps"]
    if len(records) != len(steps):
        raise RuntimeError(f"jdpo logged {len(records)} steps, the packing plan has {len(steps)}")
    for r, s in zip(records, steps, strict=True):  # the plan is the run's packing
        if abs(r["tokens_per_sec"] * r["step_time"] - s["tokens"]) > 1e-3 * s["tokens"]:
            raise RuntimeError(f"step {r['step']}: jdpo's tokens differ from the packing plan's")
    times = [r["step_time"] for r in records]
    peak = steps[0]["flops"] / (records[0]["mfu"] * times[0])  # the peak the run measured
    timed = slice(warmup_steps, None)
    timed_s = sum(times[timed])
    import jax

    return {
        "framework": f"jdpo / jax {jax.__version__}",
        "num_pairs": plan["num_pairs"],
        "tokens_total": plan["tokens_total"],
        "tokens_sequences": plan["tokens_sequences"],
        "rows": plan["rows"],
        "row_length": plan["row_length"],
        "shared_prompt": plan["shared_prompt"],
        "steps": len(steps),
        "process_s": process_s,
        "peak_rss_gib": peak_rss_gib,
        "step_times": times,
        "timed_steps": len(times[timed]),
        "timed_s": timed_s,
        "pairs_per_step": sum(s["pairs"] for s in steps[timed]) / len(times[timed]),
        "pairs_per_s": sum(s["pairs"] for s in steps[timed]) / timed_s,
        "tokens_per_s": sum(s["tokens"] for s in steps[timed]) / timed_s,
        "padding_fraction": 1 - sum(s["tokens"] for s in steps) / sum(s["slots"] for s in steps),
        "peak_flops": peak,
        "mfu": sum(s["flops"] for s in steps[timed]) / (timed_s * peak),
        "mfu_strict": sum(s["flops_strict"] for s in steps[timed]) / (timed_s * peak),
        "train_s": sum(times),
        "setup": setup,
        "overrides": {k: str(v) for k, v in (overrides or {}).items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/vs_trl", help="Assets and results directory.")
    ap.add_argument("--pairs", type=int, default=320, help="Train pairs (one epoch over them).")
    ap.add_argument("--lengths", choices=sorted(LENGTHS), default="hh", help="The length mix (assets.py).")
    ap.add_argument("--model-size", choices=sorted(MODELS), default="50m", help="The model (assets.py).")
    ap.add_argument("--batch-pairs", type=int, default=8, help="TRL's per-device batch, in pairs.")
    ap.add_argument(
        "--rows",
        type=int,
        default=0,
        help="jdpo's packed rows per step (0: the whole number nearest --batch-pairs pairs).",
    )
    ap.add_argument("--steps-warmup", type=int, default=2, help="Leading steps left out of the steady state.")
    ap.add_argument("--only", choices=["jdpo", "trl"], default=None, help="Run only one side.")
    ap.add_argument("--shared-prompt", choices=["true", "false"], default="true",
                    help="jdpo's data.shared_prompt (true: its auto on this model, kernel).")  # fmt: skip
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out)
    paths = build(out, a.pairs, lengths=a.lengths, model_size=a.model_size)
    max_length, max_prompt_length = LENGTHS[a.lengths]
    if a.trl_child:
        r = run_trl(str(paths["model"]), str(paths["data"]), batch_pairs=a.batch_pairs, max_length=max_length,
                    warmup_steps=a.steps_warmup)  # fmt: skip
        (out / "trl.json").write_text(json.dumps(r, indent=2) + "\n")
        return
    if a.only != "jdpo":
        _need_trl()
    # A plain-layout run (--shared-prompt false) keeps its own jdpo files and report beside the shared run's.
    suffix = "" if a.shared_prompt == "true" else "_plain"
    trl_cmd = [sys.executable, __file__, "--trl-child", "--out", str(out), "--pairs", str(a.pairs),
               "--lengths", a.lengths, "--model-size", a.model_size, "--batch-pairs", str(a.batch_pairs),
               "--steps-warmup", str(a.steps_warmup)]  # fmt: skip
    results = compare(str(paths["model"]), str(paths["data"]), out, only=a.only, rows=a.rows,
                      batch_pairs=a.batch_pairs, steps_warmup=a.steps_warmup, max_length=max_length,
                      max_prompt_length=max_prompt_length, shared_prompt=a.shared_prompt == "true",
                      trl_cmd=trl_cmd, suffix=suffix)  # fmt: skip
    report(results, out, f"{a.lengths} lengths, {a.model_size} model, {a.pairs} pairs", suffix)


def compare(model: str, data: str, out: Path, *, only: str | None, rows: int, batch_pairs: int,
            steps_warmup: int, max_length: int, max_prompt_length: int, shared_prompt: bool,
            trl_cmd: list[str], suffix: str = "", jdpo_overrides: dict | None = None) -> dict:  # fmt: skip
    """The side-by-side runs: jdpo twice (the first compiles into a fresh XLA cache, the rerun finds its
    programs there), then TRL as the child process `trl_cmd` (which writes <out>/trl.json); each one's
    JSON written under `out`. `only`: "jdpo" or "trl" runs one side."""
    results = {}
    if only != "trl":
        plan = jdpo_plan(model, data, rows=rows, max_length=max_length, max_prompt_length=max_prompt_length,
                         batch_pairs=batch_pairs, shared_prompt=shared_prompt)  # fmt: skip
        xla_cache = out / "jdpo_xla_cache"
        import shutil

        shutil.rmtree(xla_cache, ignore_errors=True)  # the first process compiles everything
        for name in ("jdpo", "jdpo_rerun"):  # the rerun finds its programs in the compilation cache
            results[name] = run_jdpo(model, data, out, plan=plan, max_length=max_length,
                                     max_prompt_length=max_prompt_length, warmup_steps=steps_warmup,
                                     xla_cache=xla_cache, overrides=jdpo_overrides)  # fmt: skip
            (out / f"{name}{suffix}.json").write_text(json.dumps(results[name], indent=2) + "\n")
    if only != "jdpo":
        env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
        process_s, peak_rss_gib = measured_run(trl_cmd, env)
        results["trl"] = {**json.loads((out / "trl.json").read_text()), "process_s": process_s,
                          "peak_rss_gib": peak_rss_gib}  # fmt: skip
        (out / f"trl{suffix}.json").write_text(json.dumps(results["trl"], indent=2) + "\n")
    return results


def report(results: dict, out: Path, what: str, suffix: str = "") -> None:
    head = (f"{'':11}{'process':>9}{'peak RSS':>10}{'pairs/s':>9}{'tok/s':>9}{'padding':>9}{'pairs/step':>11}"
            f"{'ref pass':>10}{'steps':>7}{'MFU':>7}{'strict':>8}")  # fmt: skip
    lines = [what, head]
    for n, r in results.items():
        ref = r.get("ref_pass_s")
        mfu = f"{r['mfu']:7.1%}{r['mfu_strict']:8.1%}" if "mfu" in r else ""
        rss = f"{r['peak_rss_gib']:7.2f}GiB" if "peak_rss_gib" in r else ""
        lines.append(f"{n:11}{r['process_s']:8.1f}s{rss:>10}{r['pairs_per_s']:9.3f}{r['tokens_per_s']:9.1f}"
                     f"{r['padding_fraction']:9.1%}{r['pairs_per_step']:11.1f}"
                     f"{'' if ref is None else f'{ref:9.1f}s':>10}{r['steps']:7d}{mfu}")  # fmt: skip
    if "jdpo" in results and "trl" in results:
        j, t = results["jdpo"], results["trl"]
        lines.append(f"jdpo/TRL: end to end (whole process) {t['process_s'] / j['process_s']:.2f}x "
                     f"({t['process_s'] / results['jdpo_rerun']['process_s']:.2f}x rerun); steady state "
                     f"{j['pairs_per_s'] / t['pairs_per_s']:.2f}x pairs/s")  # fmt: skip
        if j["tokens_sequences"] != t["tokens_total"]:
            seq, trl = j["tokens_sequences"], t["tokens_total"]
            lines.append(f"WARNING: token totals differ (jdpo {seq}, TRL {trl})")
        if j["shared_prompt"]:
            lines.append(f"jdpo shares each prompt: {j['tokens_total']} tokens in its rows for "
                         f"{j['tokens_sequences']} in the sequences (tok/s counts the former)")  # fmt: skip
    if "jdpo" in results:
        j = results["jdpo"]
        phase = j.get("setup", {}).get("set-up", {}).get("seconds", {})
        if phase:
            setup_s, first = sum(phase.values()), j["step_times"][0]
            rest = j["process_s"] - setup_s - j["train_s"]
            wrap = j["setup"].get("wrap-up", {}).get("seconds", {})
            lines.append(f"jdpo outside the steps: set-up {setup_s:.1f} s ("
                         + ", ".join(f"{k} {v:.1f}" for k, v in phase.items() if v >= 0.5)
                         + f"), the first step {first:.1f} s (with its compile), after the last step "
                         f"{rest:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in wrap.items())
                         + ", exit)")  # fmt: skip
        if j.get("overrides"):
            lines.append("jdpo settings: " + " ".join(f"{k}={v}" for k, v in j["overrides"].items()))
        lines.append(f"MFU: steady state, of the measured matmul peak "
                     f"({results['jdpo']['peak_flops'] / 1e9:.0f} GFLOP/s); strict: the unembedding "
                     "credited on scored tokens only")  # fmt: skip
    from jdpo.commands.bench import host_info

    host = host_info()
    lines.append(f"host: {host['cpu_model']}, {host['cpus']} CPUs, jax {host['jax']}")
    text = "\n".join(lines)
    print(text)
    (out / f"vs_trl{suffix}.txt").write_text(text + "\n")
    (out / "host.json").write_text(json.dumps(host, indent=2) + "\n")


if __name__ == "__main__":
    main()
