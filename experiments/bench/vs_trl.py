"""jdpo vs TRL's DPOTrainer, side by side on this CPU: same checkpoint, same pairs, same settings.

    pip install trl            # not a jdpo dependency; installs into this venv on the CPU torch
    python experiments/bench/vs_trl.py --pairs 128 --steps-warmup 2 --out runs/vs_trl

What is the same for both:
  - the checkpoint: a ~50M-parameter random Llama (vocab 32k), built by experiments/bench/assets.py with
    jdpo.models.init_model + save_pretrained, loaded by TRL with AutoModelForCausalLM (float32);
  - the pairs: `--pairs` synthetic hh-rlhf-shaped pairs, tokenised to identical ids by both (a word-level
    tokenizer; the script checks that the non-pad token totals agree), none truncated;
  - one epoch over all the pairs; sigmoid DPO, beta 0.1, AdamW, lr 5e-7 with 10% warm-up, clip 1.0;
  - the reference: precomputed once before training (TRL `precompute_ref_log_probs=True`; jdpo
    `dpo.reference: cached`), reported both without and with its time;
  - 2 CPU threads: torch.set_num_threads(2); XLA uses this machine's 2 cores.
What differs, by design: TRL pads each batch of `--batch-pairs` pairs to its longest sequence
(chosen and rejected of a pair are separate rows); jdpo packs whole pairs into rows of 2 * max_length
tokens, `--rows` rows per step (chosen to give about the same pairs per step; both are reported).

Timing: every optimizer step end to end (data collation / packing, forward, backward, update), the
first `--steps-warmup` steps of each excluded (jdpo's include compilation); throughput = pairs (and
non-pad tokens) of the timed steps / their summed time. jdpo is timed in this process, TRL in a child
process (each framework alone on the cores).
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

BETA, LR, WARMUP_RATIO, MAX_GRAD_NORM, SEED = 0.1, 5e-7, 0.1, 1.0, 0


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


def run_trl(model_dir: str, data: str, *, batch_pairs: int, max_length: int, warmup_steps: int) -> dict:
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
        # TRL 1.16 turns activation checkpointing on by default; jdpo runs without remat here, so TRL
        # gets the same (faster) choice: no recomputation, the memory is there.
        gradient_checkpointing=False,
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
        "step_times": times,
        "timed_steps": len(timed),
        "timed_s": sum(timed),
        "pairs_per_step": timed_pairs / max(len(timed), 1),
        "pairs_per_s": timed_pairs / sum(timed),
        "tokens_per_s": timed_pairs * tokens_per_pair / sum(timed),
        "padding_fraction": 1 - sum(s[1] for s in train_shapes) / max(sum(s[2] for s in train_shapes), 1),
    }


# ------------------------------------------------------------------------------------------------
# jdpo (this process)
# ------------------------------------------------------------------------------------------------


def run_jdpo(model_dir: str, data: str, *, rows: int, max_length: int, max_prompt_length: int,
             warmup_steps: int, row_length: int = 0) -> dict:  # fmt: skip
    import jax

    from jdpo import bench
    from jdpo import config as C

    cfg = C.replace(
        C.Config(),
        **{
            "model.path": model_dir,
            "model.dtype": "float32",
            "model.param_dtype": "float32",
            "data.train": [data],
            "data.max_length": max_length,
            "data.max_prompt_length": max_prompt_length,
            "data.row_length": row_length,
            "dpo.beta": BETA,
            "dpo.reference": "cached",
            "optim.learning_rate": LR,
            "optim.warmup_ratio": WARMUP_RATIO,
            "optim.max_grad_norm": MAX_GRAD_NORM,
            "train.batch_rows": rows,
            "train.seed": SEED,
            "train.num_epochs": 1.0,
        },
    )
    # One epoch: bench's steps + warm-up = the epoch's steps (packing decides how many).
    from transformers import AutoTokenizer

    from jdpo import data as jdata
    from jdpo import train

    tok = AutoTokenizer.from_pretrained(model_dir)
    records = jdata.load_preferences([data])
    pairs, _ = jdata.tokenize_preferences(
        records, tok, max_length=max_length, max_prompt_length=max_prompt_length
    )
    T = row_length or 2 * max_length
    P = train.pairs_per_row(T, [pairs.pair_lengths()])
    epoch_steps = jdata.PreferenceBatches(pairs, rows_per_batch=rows, row_length=T, max_pairs_per_row=P,
                                          seed=SEED).num_batches(0)  # fmt: skip
    r = bench.run_bench(cfg, steps=epoch_steps - warmup_steps, warmup=warmup_steps)
    timed_s = sum(r["step_times"])
    pairs_timed = r["pairs_per_step"] * r["timed_steps"]
    tokens_timed = r["tokens_per_s"] * r["step_time"] * r["timed_steps"]
    r.update(
        {
            "framework": f"jdpo / jax {jax.__version__}",
            "tokens_total": int(pairs.pair_lengths().sum()),
            "steps": epoch_steps,
            "timed_s": timed_s,
            # Summed (not median) step times, exactly as for TRL.
            "pairs_per_s": pairs_timed / timed_s,
            "tokens_per_s": tokens_timed / timed_s,
        }
    )
    return r


def with_reference(r: dict) -> tuple[float, float]:
    """(pairs/s, tokens/s) over the epoch with the reference pass counted: the timed steps' rate
    extended to the whole epoch, plus the reference pass."""
    epoch_s = r["num_pairs"] / r["pairs_per_s"] + (r["ref_pass_s"] or 0.0)
    return r["num_pairs"] / epoch_s, r["tokens_total"] / epoch_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/vs_trl", help="Assets and results directory.")
    ap.add_argument("--pairs", type=int, default=128, help="Train pairs (one epoch over them).")
    ap.add_argument("--batch-pairs", type=int, default=8, help="TRL's per-device batch, in pairs.")
    ap.add_argument("--rows", type=int, default=4, help="jdpo's packed rows per step.")
    ap.add_argument("--row-length", type=int, default=0, help="jdpo's row length (0: 2 * max_length).")
    ap.add_argument("--steps-warmup", type=int, default=2, help="Leading steps left out of the timing.")
    ap.add_argument("--only", choices=["jdpo", "trl"], default=None, help="Run only one side.")
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    from assets import MAX_LENGTH, MAX_PROMPT_LENGTH, build

    out = Path(a.out)
    if a.trl_child:
        paths = build(out, a.pairs)
        r = run_trl(str(paths["model"]), str(paths["data"]), batch_pairs=a.batch_pairs, max_length=MAX_LENGTH,
                    warmup_steps=a.steps_warmup)  # fmt: skip
        (out / "trl.json").write_text(json.dumps(r, indent=2) + "\n")
        return
    if a.only != "jdpo":
        _need_trl()
    paths = build(out, a.pairs)
    results = {}
    if a.only != "trl":
        results["jdpo"] = run_jdpo(
            str(paths["model"]), str(paths["data"]), rows=a.rows, max_length=MAX_LENGTH,
            max_prompt_length=MAX_PROMPT_LENGTH, warmup_steps=a.steps_warmup, row_length=a.row_length,
        )  # fmt: skip
        (out / "jdpo.json").write_text(json.dumps(results["jdpo"], indent=2) + "\n")
    if a.only != "jdpo":
        env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, __file__, "--trl-child", "--out", str(out), "--pairs", str(a.pairs),
               "--batch-pairs", str(a.batch_pairs), "--steps-warmup", str(a.steps_warmup)]  # fmt: skip
        subprocess.run(cmd, check=True, env=env)
        results["trl"] = json.loads((out / "trl.json").read_text())
    report(results, out)


def report(results: dict, out: Path) -> None:
    rows = []
    for name, r in results.items():
        p_ref, t_ref = with_reference(r)
        rows.append((name, r["pairs_per_s"], r["tokens_per_s"], p_ref, t_ref, r["padding_fraction"],
                     r["pairs_per_step"], r["ref_pass_s"], r["timed_steps"]))  # fmt: skip
    head = (f"{'':6}{'pairs/s':>9}{'tok/s':>9}{'pairs/s+ref':>13}{'tok/s+ref':>11}{'padding':>9}"
            f"{'pairs/step':>11}{'ref pass':>10}{'timed':>7}")  # fmt: skip
    lines = [head]
    for n, p, t, pr, tr, pad, pps, ref, ts in rows:
        lines.append(f"{n:6}{p:9.3f}{t:9.1f}{pr:13.3f}{tr:11.1f}{pad:9.1%}{pps:11.1f}{ref:9.1f}s{ts:7d}")
    if "jdpo" in results and "trl" in results:
        j, t = results["jdpo"], results["trl"]
        jr, tr_ = with_reference(j), with_reference(t)
        lines.append(f"ratio jdpo/TRL: pairs/s {j['pairs_per_s'] / t['pairs_per_s']:.2f}x, tokens/s "
                     f"{j['tokens_per_s'] / t['tokens_per_s']:.2f}x; with the reference pass: "
                     f"{jr[0] / tr_[0]:.2f}x, {jr[1] / tr_[1]:.2f}x")  # fmt: skip
        if j.get("tokens_total") and j["tokens_total"] != t["tokens_total"]:
            lines.append(f"WARNING: token totals differ (jdpo {j['tokens_total']}, TRL {t['tokens_total']})")
        if j.get("mfu") is not None:
            lines.append(f"jdpo MFU {j['mfu']:.1%} of the measured matmul peak ({j['peak_flops'] / 1e9:.0f} "
                         f"GFLOP/s), {j['mfu_incl_ref']:.1%} with the reference pass")  # fmt: skip
    from jdpo.bench import host_info

    host = host_info()
    lines.append(f"host: {host['cpu_model']}, {host['cpus']} CPUs, jax {host['jax']}")
    text = "\n".join(lines)
    print(text)
    (out / "vs_trl.txt").write_text(text + "\n")
    (out / "host.json").write_text(json.dumps(host, indent=2) + "\n")


if __name__ == "__main__":
    main()
