"""experiments/device/gpu_check.py, the prepared GPU check: its CPU dry run end to end (slow: four
subprocess-free stages and two `jdpo bench` processes), and by default its pieces: the packed
segments it checks kernels on, parity with transformers on one family, a failing bench reported with
its reason, the bench settings `jdpo plan` reads, and the summary table's verdicts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "device" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hh_segments_are_packed_pairs(gpu_check):
    seg = gpu_check.hh_segments(2, 4096)
    for row in seg:
        real = row[row > 0]
        assert real.size > 0.7 * row.size and np.all(row[real.size :] == 0)  # padding last
        assert np.all(np.diff(real) >= 0) and real.max() % 2 == 0  # whole pairs: chosen, rejected
        assert 80 < np.median(np.bincount(real)[1:]) < 500  # hh-rlhf-like prompt + completion


def test_parity_rows_for_one_family(gpu_check, tmp_path):
    rows = gpu_check.parity(tmp_path, dry_run=True, families=("qwen2",))
    assert [(r["family"], r["dtype"], r["kernel"]) for r in rows] == [
        ("qwen2", "float32", "blocked"), ("qwen2", "bfloat16", "blocked"),
    ]  # fmt: skip
    assert all(r["ok"] for r in rows) and rows[0]["max_abs_logit_diff"] < 1e-4


def test_bench_settings_plan_and_a_failing_bench(gpu_check, tmp_path):
    from jdpo import config as C

    paths = gpu_check.bench_assets(tmp_path, dry_run=True, pairs=16)
    over = gpu_check.bench_overrides(paths, dry_run=True, rows=2, attention="xla")
    cfg = C.load_config(None, over)
    assert (cfg.model.attention, cfg.train.batch_rows, cfg.data.row_length) == ("xla", 2, 256)
    assert gpu_check.planned_bytes(over) > 0
    bad = [*over, "--model.path", str(tmp_path / "missing")]
    r = gpu_check.run_bench(tmp_path, "bad", bad, steps=1, warmup=0, timeout=120)
    assert r["status"] == "exit 2" and "missing" in " ".join(r["log_tail"])
    assert (tmp_path / "bench_bad.log").exists()


def test_summary_table_verdicts(gpu_check):
    env = {"jax": "0.10.2", "jaxlib": "0.10.2", "devices": ["gpu:NVIDIA H200"]}
    parity = [
        dict(family="llama", dtype="float32", attention="auto", kernel="pallas_gpu", max_abs_logit_diff=1e-3,
             tol=2e-2, ok=True, torch_device="cuda"),
    ]  # fmt: skip
    check = dict(
        kernel="pallas_gpu", dtype="bfloat16", values=1e-2, dq=5e-2, dk=1e-2, dv=1e-2, tol=3e-2, ok=False
    )
    kernels = {"checks": [check], "fwd_bwd_seconds_bf16": {"pallas_gpu": 0.01}}
    bench = dict(
        status="ok", attention="pallas_gpu", rows=2, row_length=4096, step_time=0.1, tokens_per_s=8e4,
        mfu=0.4,
        peak_flops=989e12, compile_s=20.0, peak_memory_bytes=2**34, plan_bytes=2**33,
    )  # fmt: skip
    benches = [
        dict(bench, name="auto"),
        dict(bench, name="xla", attention="xla", step_time=0.3),
        dict(name="auto_2rows", status="timed out after 100 s", log_tail=["..."]),
    ]
    rows = gpu_check.summary_rows(env, parity, kernels, benches)
    verdict = {check: ok for check, _, ok in rows}
    assert verdict["parity llama float32 auto->pallas_gpu"] is True
    assert verdict["kernel pallas_gpu bfloat16 vs dense"] is False  # dq over its tolerance
    assert verdict["bench auto_2rows"] is False
    assert dict((c, r) for c, r, _ in rows)["ratio auto / xla"] == "3.00x faster step"
    table = gpu_check.format_table(rows)
    assert "MFU 40.0%" in table and "peak mem 16.00 GiB vs plan 8.00 GiB" in table


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    import subprocess

    out = tmp_path / "check"
    p = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = [row["check"] for row in summary]
    assert all(row["ok"] for row in summary)
    assert (
        sum(c.startswith("parity") for c in checks) == 6 and sum(c.startswith("kernel ") for c in checks) == 8
    )
    assert {"bench auto (blocked, 2x256)", "bench xla (xla, 2x256)", "ratio auto / xla"} <= set(checks)
    for name in ("env.json", "parity.json", "kernels.json", "pair_kernel.json", "benches.json", "summary.md"):
        assert (out / name).exists(), name
    assert "ratio auto / xla" in p.stdout
