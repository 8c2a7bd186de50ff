"""Metric writers (JSONL + resume, console, TensorBoard framing), FLOPs accounting and plots."""

import io
import json
import math
import struct

import numpy as np
import pytest

from jdpo import metrics as M


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


def _parse_scalar_events(payload):
    """Minimal protobuf reader for the fields TensorBoardWriter writes (independent of its encoder)."""

    def varint(buf, i):
        shift = n = 0
        while True:
            b = buf[i]
            n |= (b & 0x7F) << shift
            i += 1
            shift += 7
            if not b & 0x80:
                return n, i

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                val, i = varint(buf, i)
            elif wire == 1:
                val, i = buf[i : i + 8], i + 8
            elif wire == 5:
                val, i = buf[i : i + 4], i + 4
            else:
                n, i = varint(buf, i)
                val, i = buf[i : i + n], i + n
            yield num, val

    event = {"scalars": {}}
    for num, val in fields(payload):
        if num == 1:
            event["wall_time"] = struct.unpack("<d", val)[0]
        elif num == 2:
            event["step"] = val
        elif num == 3:
            event["file_version"] = val.decode()
        elif num == 5:
            for _, value in fields(val):
                v = dict(fields(value))
                event["scalars"][v[1].decode()] = struct.unpack("<f", v[2])[0]
        elif num == 7:
            event["session_start"] = dict(fields(val)).get(1) == 1
    return event


def test_tensorboard_event_file(tmp_path):
    assert M.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    _log_steps(tmp_path, range(1, 4))
    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    events = [_parse_scalar_events(r) for r in M.read_tfrecords(path)]  # checks both CRCs per record
    assert events[0]["file_version"] == "brain.Event:2"
    assert [e["step"] for e in events[1:]] == [1, 2, 3]
    assert events[2]["scalars"] == pytest.approx({"loss": 0.5, "rewards/accuracies": 0.5, "epoch": 0.2})
    # A resumed writer marks the restart so TensorBoard drops the old attempt's later points.
    _log_steps(tmp_path, [3], resume_step=2)
    second = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))[-1]
    resumed = [_parse_scalar_events(r) for r in M.read_tfrecords(second)]
    assert resumed[1]["session_start"] and resumed[1]["step"] == 3


def test_tensorboard_reads_it_when_installed(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    _log_steps(tmp_path, range(1, 4))
    ea = ea_mod.EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_negative_step_varint_roundtrip():
    assert _parse_scalar_events(M.encode_event(0.0, -1))["step"] == (1 << 64) - 1  # int64 two's complement


# A hand-checkable config: L=2, D=8, N=2 heads, K=1 kv head, H=4, F=16, V=32.
TINY = dict(
    num_hidden_layers=2,
    hidden_size=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    intermediate_size=16,
    vocab_size=32,
)


def test_flops_by_hand():
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, mlp 3*8*16 = 384 -> 576; x2 layers + unembed 8*32.
    assert M.matmul_params(TINY) == 2 * 576 + 256 == 1408
    # One row: segments [0,1,2] and [0,1] then one pad -> 5 tokens, causal keys 1+2+3+1+2 = 9.
    positions = np.array([[0, 1, 2, 0, 1, 0]])
    segments = np.array([[1, 1, 1, 2, 2, 0]])
    # loss_mask: position t scores targets[t]; here the last token of each segment is a completion token.
    mask = np.array([[0, 1, 0, 1, 0, 0]], np.float32)
    stats = M.batch_token_stats({"positions": positions, "segment_ids": segments, "loss_mask": mask})
    assert stats == {"tokens": 5, "slots": 6, "attended_keys": 9, "scored": 2}
    # forward: 2 * 1408 * 5 + 4 * L*N*H (=16) * 9 = 14080 + 576
    assert M.forward_flops(TINY, tokens=5, attended_keys=9) == 14080 + 576
    assert M.train_flops(TINY, tokens=5, attended_keys=9) == 3 * (14080 + 576) == 43968
    assert M.train_flops(TINY, tokens=5, attended_keys=9, reference_forward=True) == 4 * (14080 + 576)
    # head_tokens=tokens gives the same number as leaving it out.
    assert M.train_flops(TINY, tokens=5, attended_keys=9, head_tokens=5) == 43968
    # Unpacked length T=3: (T+1)/2 = 2 keys per token on average.
    assert M.flops_per_token(TINY, 3) == 3 * (2 * 1408 + 64 * 2)
    assert M.attended_keys(positions, segments, sliding_window=2) == 1 + 2 + 2 + 1 + 2


def test_flops_with_the_head_on_scored_tokens_only():
    # matmul params 1408 = 1152 in the layers + 256 in the unembedding (D x V = 8 x 32). 5 tokens, 2 of
    # them scored, 9 attended keys at 4 * L*N*H = 64 FLOPs each:
    # forward = 2 * 1152 * 5 + 2 * 256 * 2 + 64 * 9 = 11520 + 1024 + 576 = 13120.
    assert M.forward_flops(TINY, tokens=5, attended_keys=9, head_tokens=2) == 13120
    assert M.train_flops(TINY, tokens=5, attended_keys=9, head_tokens=2) == 3 * 13120 == 39360
    assert M.train_flops(TINY, tokens=5, attended_keys=9, head_tokens=2, reference_forward=True) == 4 * 13120
    # No scored token: the head earns nothing, the rest is unchanged.
    assert M.forward_flops(TINY, tokens=5, attended_keys=9, head_tokens=0) == 11520 + 576


def test_batch_token_stats_counts_scored_positions_and_needs_the_mask():
    seg = np.array([[1, 1, 1, 1, 0], [1, 1, 2, 2, 2]])
    pos = np.array([[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]])
    mask = np.array([[0, 0, 1, 1, 0], [1, 0, 0, 1, 0.5]], np.float32)  # > 0 counts, whatever the weight
    stats = M.batch_token_stats({"segment_ids": seg, "positions": pos, "loss_mask": mask})
    assert stats["scored"] == 5 and stats["tokens"] == 9 and stats["slots"] == 10
    with pytest.raises(KeyError, match="loss_mask"):
        M.batch_token_stats({"segment_ids": seg, "positions": pos})


def test_llama3_8b_matmul_params():
    llama3_8b = dict(
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    )
    # 8,030,261,248 total = this + the input embedding (525,336,576) + norms (266,240).
    assert M.matmul_params(llama3_8b) == 8_030_261_248 - 525_336_576 - 266_240


def test_peaks_and_mfu():
    class Dev:
        def __init__(self, platform, kind, process_index=0):
            self.platform, self.device_kind, self.process_index = platform, kind, process_index

    assert M.device_peak_flops(Dev("gpu", "NVIDIA H100 80GB HBM3")) == 989e12
    assert M.device_peak_flops(Dev("gpu", "NVIDIA H100 PCIe")) == 756e12
    assert M.device_peak_flops(Dev("tpu", "TPU v5 lite")) == 197e12
    assert M.device_peak_flops(Dev("tpu", "TPU v5")) == 459e12
    assert M.device_peak_flops(Dev("gpu", "NVIDIA L40S")) == 362e12
    assert M.device_peak_flops(Dev("gpu", "Some Future GPU")) is None
    assert M.total_peak_flops([Dev("tpu", "TPU v4")] * 4) == 4 * 275e12
    assert M.total_peak_flops([Dev("tpu", "TPU v4"), Dev("gpu", "unknown")]) is None
    tm = M.throughput_metrics(step_time=2.0, tokens=300, slots=400, flops=1e12, peak_flops=1e12)
    assert tm == {"step_time": 2.0, "tokens_per_sec": 150.0, "padding_fraction": 0.25, "mfu": 0.5}
    assert "mfu" not in M.throughput_metrics(step_time=1.0, tokens=1, slots=1, flops=1.0)


def test_cpu_peak_is_measured_once_per_host():
    import jax

    peak = M.measured_cpu_peak_flops()
    assert 1e8 < peak < 1e14  # a real CPU, neither broken timing nor absurd
    assert M.measured_cpu_peak_flops() == peak  # cached
    # 8 simulated CPU devices share one host's cores: one peak, not eight.
    assert M.total_peak_flops(jax.devices("cpu")) == peak


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from jdpo.plot import plot_run

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


def test_matmul_params_from_model_config():
    """The model's own ModelConfig field names work too, and agree with its parameter count."""
    transformer = pytest.importorskip("jdpo.models.transformer")
    c = transformer.ModelConfig(
        family="llama",
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
    )
    assert M.matmul_params(c) == M.matmul_params(TINY) == 1408
    # All parameters = matmul ones + input embedding (V*D) + 2 norms per layer + the final norm.
    assert c.num_params() == 1408 + 32 * 8 + 2 * 2 * 8 + 8


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
