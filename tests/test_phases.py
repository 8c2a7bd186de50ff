"""jdpo.report.phases (the run's time outside its steps), jdpo.commands.lean_process and
jdpo.parallel.host_memory (the process's memory): the phase records a run logs, the console line,
PyTorch kept out of `jdpo train`, the heap handed back after a compile."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import one_device, run_config

from jdpo.parallel import host_memory
from jdpo.report import metrics, phases


def test_phases_add_up_in_order_with_the_resident_memory_at_each_end():
    phases.reset()
    for name in ("tokenizer", "model load", "tokenizer"):
        with phases.timed(name):
            time.sleep(0.01)
    got = phases.take()
    names = [k for k in got if k != "process start"]  # measured once per process, from /proc
    assert names == ["tokenizer", "model load"]
    assert got["tokenizer"][0] >= 0.02 and got["model load"][0] >= 0.01
    assert all(gib is None or 0 < gib < 1024 for _, gib in got.values())
    assert phases.take() == {}  # taken: the next report holds only what runs after
    rec = phases.record("set-up", 0, {"model load": (1.25, 0.5), "step-0 eval": (0.0, None)})
    assert rec == {"what": "set-up", "step": 0, "seconds": {"model load": 1.25, "step-0 eval": 0.0},
                   "rss_gib": {"model load": 0.5}}  # fmt: skip
    assert phases.line({"model load": (1.25, 0.5), "export": (2.0, None)}) == (
        "model load 1.2 s (0.50 GiB), export 2.0 s; 3.2 s in all"
    )


def test_a_run_writes_its_set_up_and_wrap_up_phases_beside_its_metrics(assets, tmp_path):
    from jdpo.train import trainer as train

    cfg = run_config(assets, tmp_path / "run", **{"train.max_steps": 2, "train.export": True})
    result = train.run(cfg, mesh=one_device())
    setup, wrap_up = phases.read(result.output_dir)
    assert (setup["what"], setup["step"], wrap_up["what"], wrap_up["step"]) == ("set-up", 0, "wrap-up", 2)
    for phase in ("tokenizer", "data", "model load", "reference pass", "initial state", "step-0 eval"):
        assert setup["seconds"][phase] >= 0 and setup["rss_gib"][phase] > 0, phase
    assert set(wrap_up["seconds"]) == {"final checkpoint", "export"}
    # metrics.jsonl stays the training curve: every record has a step's or an eval's numbers.
    assert all("loss" in r or "eval/loss" in r for r in metrics.read_metrics(result.metrics_path))


def test_jdpo_train_keeps_torch_out_and_user_code_may_still_import_it():
    pytest.importorskip("torch")
    code = (
        "import sys\n"
        "from jdpo.commands import lean_process as L\n"
        "assert L.keep_torch_out()\n"
        "from transformers import AutoTokenizer, PretrainedConfig\n"
        "import jdpo.train.trainer\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch\n"
        "assert torch.ones(2).sum().item() == 2.0\n"
        "assert not L.keep_torch_out()  # too late once transformers (or torch) is loaded\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_freed_heap_is_returned_on_glibc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim is Linux-only")
    assert host_memory.release_free_heap() is True
