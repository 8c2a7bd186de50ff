"""jdpo.commands.bench: two timed steps on a tiny model write a JSON with every field present and sane. No
timing assertions: speed targets are checked by the benchmarks (experiments/bench), never by tests."""

from __future__ import annotations

import json
import math

import pytest
from helpers import build_tiny_assets, one_device, tiny_config

from jdpo import cli
from jdpo import config as jconfig
from jdpo.commands import bench

FIELDS = {
    "platform", "device", "host", "num_devices", "model_params", "matmul_params", "dtype", "batch_rows",
    "grad_accum", "row_length", "max_pairs_per_row", "num_pairs", "steps_per_epoch", "total_steps",
    "warmup_steps",
    "timed_steps", "peak_flops", "peak_flops_source", "peak_measure_s", "setup_s", "ref_pass_first_s",
    "ref_pass_s", "compile_s",
    "step_time", "step_time_min", "step_time_max", "device_step_time", "step_times", "pairs_per_step",
    "pairs_per_s", "tokens_per_s", "tokens_per_step", "padding_fraction", "train_flops_per_step", "mfu",
    "final_loss",
    "peak_memory_bytes", "peak_memory_what", "xla_step_bytes", "ref_tokens", "ref_flops", "ref_tokens_per_s",
    "pairs_per_s_incl_ref", "tokens_per_s_incl_ref", "mfu_incl_ref", "plan_bytes", "mfu_scored_head",
    "mfu_scored_head_incl_ref", "attention", "attention_tile", "attention_keys_credited",
    "attention_keys_computed", "attention_computed_per_credited",
}  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Smaller than conftest's `assets`: the bench only needs a few steps of train pairs."""
    return build_tiny_assets(tmp_path_factory.mktemp("bench_assets"), max_operand=9, eval_pairs=10)


def bench_config(assets):
    return tiny_config(assets, **{"data.eval": [], "train.batch_rows": 4})


def test_bench_two_steps_writes_sane_json(assets, tmp_path, capsys):
    out = tmp_path / "bench.json"
    r = bench.run_bench(bench_config(assets), steps=2, warmup=1, out_json=out, mesh=one_device())
    saved = json.loads(out.read_text())
    assert set(saved) == FIELDS == set(r)
    for k in ("pairs_per_s", "tokens_per_s", "step_time", "compile_s", "ref_pass_s", "peak_flops",
              "peak_memory_bytes", "pairs_per_s_incl_ref", "tokens_per_s_incl_ref", "train_flops_per_step",
              "ref_flops", "plan_bytes"):  # fmt: skip
        assert saved[k] > 0, k
    assert 0.0 <= saved["padding_fraction"] <= 1.0
    assert 0.0 < saved["mfu"] < 1.5 and 0.0 < saved["mfu_incl_ref"] < 1.5
    # Crediting the unembedding on scored tokens only can only lower the figure (prompts are never scored).
    assert 0.0 < saved["mfu_scored_head"] <= 1.0 and 0.0 < saved["mfu_scored_head_incl_ref"] <= 1.0
    assert (
        saved["mfu_scored_head"] < saved["mfu"] and saved["mfu_scored_head_incl_ref"] < saved["mfu_incl_ref"]
    )
    assert saved["timed_steps"] == len(saved["step_times"]) == 2
    assert saved["num_devices"] == 1 and saved["platform"] == "cpu"
    assert saved["host"]["cpu_model"] and saved["host"]["cpus"] >= 1  # results compare by processor
    assert saved["pairs_per_s_incl_ref"] < saved["pairs_per_s"]  # the reference pass costs time
    assert math.isfinite(saved["final_loss"])
    # The kernel that ran (auto on a CPU: blocked) and its attention work: at least the credited pairs.
    assert (saved["attention"], saved["attention_tile"]) == ("blocked", 64)
    assert saved["attention_keys_computed"] >= saved["attention_keys_credited"] > 0
    table = bench.format_bench(saved)
    for word in ("pairs/s", "tokens/s", "MFU", "MFU, head on scored", "padding", "compile", "reference pass",
                 "peak memory", "blocked, 64-position tiles: computes"):  # fmt: skip
        assert word in table


# slow (12 s): test_bench_two_steps_writes_sane_json runs the bench, tests/test_lora.py LoRA runs
@pytest.mark.slow
def test_bench_of_a_lora_run(assets, tmp_path):
    """The reference pass and the steps of a LoRA run (the forward takes the adapters with the base)."""
    cfg = jconfig.replace(bench_config(assets), **{"lora.rank": 4})
    r = bench.run_bench(cfg, steps=1, warmup=1, out_json=tmp_path / "bench.json", mesh=one_device())
    assert r["ref_pass_s"] > 0 and r["step_time"] > 0 and math.isfinite(r["final_loss"])


def test_cli_bench_arguments(assets):
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--model", str(assets.model_dir), "--data", "x.jsonl", "--steps", "3",
                              "--train.batch_rows", "4"])  # fmt: skip
    assert (args.steps, args.warmup, args.model, args.data) == (3, 2, str(assets.model_dir), "x.jsonl")
    assert getattr(args, "train.batch_rows") == "4"
    with pytest.raises(SystemExit):
        cli.main(["bench", "--steps", "1"])  # neither a model nor data
