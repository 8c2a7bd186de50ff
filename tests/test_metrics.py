"""Metric writers (JSONL + resume, console, TensorBoard events, W&B) and plots."""

import io
import json
import math
import sys

import numpy as np
import pytest

from jdpo.report import metrics as M


def _log_steps(out, steps, *, resume_step=None, value=lambda s: 1.0 / s):
    with M.MetricsLogger(out, total_steps=10, resume_step=resume_step, console=False, is_main=True) as lg:
        for s in steps:
            lg.log(s, {M.LOSS: value(s), M.REWARDS_ACCURACIES: np.float32(0.5), M.EPOCH: s / 10})


def test_jsonl_records_and_types(tmp_path):
    import jax.numpy as jnp

    with M.MetricsLogger(tmp_path, console=False, tensorboard=False, is_main=True) as lg:
        lg.log(3, {M.LOSS: jnp.float32(0.25), M.GRAD_NORM: np.float64(1.5), "tokens": np.int32(7), "s": "x"})
        lg.log(4, {M.LOSS: float("nan"), M.eval_name(M.LOSS): 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert list(first)[0] == "step"  # step leads every record
    assert first == {"step": 3, "loss": 0.25, "grad_norm": 1.5, "tokens": 7, "s": "x"}
    assert isinstance(first["tokens"], int)
    second = M.read_metrics(tmp_path)[1]
    assert math.isnan(second["loss"]) and second["eval/loss"] == 0.5


def test_jsonl_rejects_non_scalars(tmp_path):
    with M.MetricsLogger(tmp_path, console=False, tensorboard=False, is_main=True) as lg:
        with pytest.raises(TypeError, match="scalars"):
            lg.log(1, {M.LOSS: np.ones(3)})


def test_resume_truncates_to_an_uninterrupted_file(tmp_path):
    # Uninterrupted: steps 1..6. Interrupted: steps 1..5 logged, checkpoint at 3, torn last line.
    _log_steps(tmp_path / "a", range(1, 7))
    _log_steps(tmp_path / "b", range(1, 6))
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    _log_steps(tmp_path / "b", range(4, 7), resume_step=3)
    a = (tmp_path / "a" / "metrics.jsonl").read_text()
    assert a == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert [r["step"] for r in M.read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_overwrites(tmp_path):
    _log_steps(tmp_path, range(1, 5))
    _log_steps(tmp_path, range(1, 3))
    assert [r["step"] for r in M.read_metrics(tmp_path)] == [1, 2]


def test_bad_line_in_the_middle_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        M.read_metrics(tmp_path)


def test_only_process_zero_writes(tmp_path):
    lg = M.MetricsLogger(tmp_path / "run", is_main=False)
    lg.log(1, {M.LOSS: 1.0})
    lg.close()
    assert not (tmp_path / "run").exists()


def test_console_lines():
    line = M.format_progress(
        120,
        1000,
        {
            M.LOSS: 0.65123,
            M.REWARDS_ACCURACIES: 0.625,
            M.REWARDS_MARGINS: 0.1234,
            M.TOKENS_PER_SEC: 1234.0,
            M.MFU: 0.4123,
        },
        eta_s=754,
    )
    assert line == (
        "step  120/1000  12% | loss 0.6512 | acc 0.625 | margin 0.123 | 1.23k tok/s | mfu 41.2% | eta 0:12:34"
    )
    assert M.format_progress(5, None, {M.LOSS: 1.0}) == "step 5 | loss 1.0000"
    assert M.format_eval(100, {"eval/loss": 0.64, "eval/rewards/accuracies": 0.65}) == (
        "eval @ 100 | loss 0.6400 | acc 0.650"
    )
    assert M.format_duration(3725.2) == "1:02:05"


def test_console_eta_uses_wall_clock_after_the_first_log():
    t = [100.0]
    out = io.StringIO()
    w = M.ConsoleWriter(total_steps=100, stream=out, clock=lambda: t[0])
    assert w.eta(10) is None  # one point: its timing would include compilation
    t[0] += 30.0  # 10 steps in 30 s -> 3 s/step for the 80 left
    assert w.eta(20) == pytest.approx(240.0)
    w.write(20, {M.LOSS: 0.5, "eval/loss": 0.6})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step  20/100  20% | loss 0.5000") and lines[1] == "eval @ 20 | loss 0.6000"


class _Stdout(io.StringIO):
    """A captured stdout that says whether it is a terminal."""

    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _log_to_console(monkeypatch, tmp_path, tty):
    out = _Stdout(tty)
    monkeypatch.setattr(sys, "stdout", out)
    with M.MetricsLogger(tmp_path, total_steps=10, jsonl=False, tensorboard=False, is_main=True) as lg:
        held = lg.writers  # kept alive, so that only close(), not garbage collection, can end the bar
        for s in (1, 2, 3):
            lg.log(s, {M.LOSS: 1.0 / s, M.REWARDS_ACCURACIES: 0.5})
            if s == 2:
                lg.log(s, {"eval/loss": 0.6})
    text = out.getvalue()
    del held
    return text


def test_console_plain_lines_when_stdout_is_not_a_terminal(monkeypatch, tmp_path):
    lines = _log_to_console(monkeypatch, tmp_path, tty=False).splitlines()
    assert lines[0] == "step  1/10  10% | loss 1.0000 | acc 0.500"  # no ETA yet: its timing has compilation
    assert lines[1].startswith("step  2/10  20% | loss 0.5000 | acc 0.500 | eta ")
    assert lines[2] == "eval @ 2 | loss 0.6000"
    assert lines[3].startswith("step  3/10  30% | loss 0.3333 | acc 0.500 | eta ")
    assert len(lines) == 4


def test_console_bar_when_stdout_is_a_terminal(monkeypatch, tmp_path):
    out = _log_to_console(monkeypatch, tmp_path, tty=True)
    assert not any(line.startswith("step ") for line in out.splitlines())  # no plain lines
    assert "\r" in out  # the bar redraws itself in place
    # What the terminal is left showing: each line's text after its last carriage return.
    screen = [line.rsplit("\r", 1)[-1] for line in out.split("\n")]
    assert screen[0] == "eval @ 2 | loss 0.6000"  # a line of its own above the bar, not torn into it
    assert "3/10" in screen[1] and "loss 0.3333 | acc 0.500" in screen[1]
    assert screen[2:] == [""]  # closed with the logger: the bar is finished, the cursor below it


def test_console_bar_eta_is_the_plain_lines_eta(monkeypatch):
    t = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: t[0])
    bar, plain = _Stdout(tty=True), _Stdout(tty=False)
    writers = [M.ConsoleWriter(101, stream=bar), M.ConsoleWriter(101, stream=plain, clock=lambda: t[0])]
    for step, now in ((1, 100.0), (11, 130.0), (21, 190.0)):  # 3 s/step, then 6 s/step
        t[0] = now
        for w in writers:
            w.write(step, {M.LOSS: 0.5})
    # Both: the average pace since the first log (90 s for 20 steps) times the 80 steps left.
    assert plain.getvalue().splitlines()[-1].endswith("| eta 0:06:00")
    assert "21/101 [01:30<06:00," in bar.getvalue().rsplit("\r", 1)[-1]
    writers[0].close()


def _tb_files(out):
    return sorted((out / "tensorboard").glob("events.out.tfevents.*"))


def _tb_events(path):
    """The events of one file, read by TensorBoard's own loader (which stops at a record whose CRC fails)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return list(LegacyEventFileLoader(str(path)).Load())


def test_tensorboard_event_file(tmp_path):
    from tensorboard.compat.proto.event_pb2 import SessionLog

    with M.MetricsLogger(tmp_path, console=False, jsonl=False, is_main=True) as lg:
        for s in range(1, 4):
            lg.log(
                s,
                {
                    M.LOSS: 1.0 / s,
                    M.REWARDS_ACCURACIES: np.float32(0.5),
                    M.EPOCH: s / 10,
                    "s": "x",
                    "b": True,
                },
            )
    (path,) = _tb_files(tmp_path)
    events = _tb_events(path)
    assert events[0].file_version == "brain.Event:2"
    scalars = {}  # step -> {tag: value}
    for e in events[1:]:
        assert e.HasField("summary")
        for v in e.summary.value:
            scalars.setdefault(e.step, {})[v.tag] = v.simple_value
    assert sorted(scalars) == [1, 2, 3]
    for s in (1, 2, 3):  # strings and bools are not scalars
        assert scalars[s] == pytest.approx({"loss": 1.0 / s, "rewards/accuracies": 0.5, "epoch": s / 10})
    # A resumed writer marks the restart so TensorBoard drops the old attempt's later points; started
    # within the same second, it must still leave the first file whole.
    _log_steps(tmp_path, [3], resume_step=2)
    first, second = _tb_files(tmp_path)
    assert first == path and len(_tb_events(first)) == len(events)
    restarts = [(e.step, e.session_log.status) for e in _tb_events(second) if e.HasField("session_log")]
    assert restarts == [(3, SessionLog.START)]


def test_tensorboard_shows_a_resumed_run_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_steps(tmp_path, range(1, 6))  # an attempt interrupted after step 5, checkpointed at 3
    _log_steps(tmp_path, range(4, 7), resume_step=3, value=lambda s: 10.0 * s)
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [
        (1, 1.0),
        (2, 0.5),
        (3, pytest.approx(1 / 3)),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from jdpo.report.plot import plot_run

    with M.MetricsLogger(tmp_path, console=False, tensorboard=False, is_main=True) as lg:
        for s in range(1, 41):
            lg.log(
                s,
                {
                    M.LOSS: 0.69 * math.exp(-s / 20),
                    M.REWARDS_ACCURACIES: min(1.0, 0.5 + s / 60),
                    M.REWARDS_MARGINS: s / 20,
                    M.REWARDS_CHOSEN: s / 40,
                    M.REWARDS_REJECTED: -s / 40,
                },
            )
            if s % 10 == 0:
                lg.log(s, {"eval/loss": 0.7 * math.exp(-s / 25), "eval/rewards/accuracies": 0.5 + s / 100})
    paths = plot_run(tmp_path)
    names = {p.name for p in paths}
    assert names == {"loss.png", "accuracy.png", "margins.png", "rewards.png", "summary.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_wandb_is_lazy_optional_and_resumes_its_run(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "wandb", None)  # "not installed"
    M.MetricsLogger(tmp_path / "a", console=False, is_main=True).close()  # off by default: fine
    with pytest.raises(ImportError, match="pip install wandb"):
        M.MetricsLogger(tmp_path / "b", console=False, wandb=True, is_main=True)

    runs = []

    class Run:
        def __init__(self, **kw):
            self.kw, self.logged, self.finished = kw, [], False
            runs.append(self)

        def log(self, data, step):
            self.logged.append((step, data))

        def finish(self):
            self.finished = True

    ids = iter(["abc", "xyz"])  # a fresh id per call: only the saved id file can make them equal
    fake = types.SimpleNamespace(
        init=lambda **kw: Run(**kw), util=types.SimpleNamespace(generate_id=lambda: next(ids))
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):  # the second logger is a resumed run: same W&B run id
        with M.MetricsLogger(
            tmp_path / "c", console=False, wandb=True, wandb_project="p", is_main=True
        ) as lg:
            lg.log(1, {M.LOSS: 0.5})
    assert [r.kw["id"] for r in runs] == ["abc", "abc"] and runs[0].kw["project"] == "p"
    assert runs[0].logged == [(1, {"loss": 0.5})] and runs[0].finished


def test_the_logged_throughput_counts_what_token_counts_counts(tmp_path):
    """A train record's tokens_per_sec and padding_fraction are `flops.token_counts` of the step's own
    batches (the shared-prompt layout, the default on this kernel: each prompt counted once, not left out
    as padding), as `jdpo bench` and experiments/bench/vs_trl.py count them."""
    from helpers import build_tiny_assets, one_device, run_config

    from jdpo.report.flops import token_counts
    from jdpo.train import trainer as train

    assets = build_tiny_assets(tmp_path / "assets", max_operand=9, eval_pairs=10)
    cfg = run_config(assets, tmp_path / "run", **{"data.eval": [], "train.max_steps": 2})
    tr = train.Trainer(cfg, mesh=one_device())
    hosts, next_step = [], tr.next_step_batches

    def recorded():
        batch, host = next_step()
        hosts.append(host)
        return batch, host

    tr.next_step_batches = recorded
    result = tr.fit()
    records = [r for r in M.read_metrics(result.metrics_path) if M.TOKENS_PER_SEC in r]
    assert len(records) == len(hosts) == 2
    lengths = tr.data.train_pairs.pair_lengths(shared_prompt=True)
    for r, host in zip(records, hosts, strict=True):
        counts = token_counts(host)
        assert any(np.any(np.asarray(b.segment_ids) < 0) for b in host)  # shared prompts in the rows
        ids = np.concatenate([np.asarray(b.pair_ids).ravel() for b in host])
        assert counts.tokens == int(lengths[ids[ids >= 0]].sum())  # each packed pair's tokens, once
        assert round(r[M.TOKENS_PER_SEC] * r[M.STEP_TIME]) == counts.tokens
        assert r[M.PADDING_FRACTION] == pytest.approx(counts.padding_fraction, abs=1e-12)
