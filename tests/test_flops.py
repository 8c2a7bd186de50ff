"""FLOPs accounting by hand on a tiny config, the Llama-3-8B matmul parameter count, peaks and MFU."""

import numpy as np
import pytest
from helpers_attention import shared_prompt_segments

from jdpo.report import (
    flops as F,  # A hand-checkable config: L=2, D=8, N=2 heads, K=1 kv head, H=4, F=16, V=32.
)

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
    assert F.matmul_params(TINY) == 2 * 576 + 256 == 1408
    # One row: segments [0,1,2] and [0,1] then one pad -> 5 tokens, causal keys 1+2+3+1+2 = 9.
    positions = np.array([[0, 1, 2, 0, 1, 0]])
    segments = np.array([[1, 1, 1, 2, 2, 0]])
    # loss_mask: position t scores targets[t]; here the last token of each segment is a completion token.
    mask = np.array([[0, 1, 0, 1, 0, 0]], np.float32)
    stats = F.token_counts({"positions": positions, "segment_ids": segments, "loss_mask": mask})
    assert stats == F.TokenCounts(tokens=5, slots=6, attended_keys=9, scored=2, pairs=0)
    # forward: 2 * 1408 * 5 + 4 * L*N*H (=16) * 9 = 14080 + 576
    assert F.forward_flops(TINY, tokens=5, attended_keys=9) == 14080 + 576
    assert F.train_flops(TINY, tokens=5, attended_keys=9) == 3 * (14080 + 576) == 43968
    assert F.train_flops(TINY, tokens=5, attended_keys=9, reference_forward=True) == 4 * (14080 + 576)
    # head_tokens=tokens gives the same number as leaving it out.
    assert F.train_flops(TINY, tokens=5, attended_keys=9, head_tokens=5) == 43968
    # Unpacked length T=3: (T+1)/2 = 2 keys per token on average.
    assert F.flops_per_token(TINY, 3) == 3 * (2 * 1408 + 64 * 2)
    assert F.attended_keys(segments, sliding_window=2) == 1 + 2 + 2 + 1 + 2


def test_flops_with_the_head_on_scored_tokens_only():
    # matmul params 1408 = 1152 in the layers + 256 in the unembedding (D x V = 8 x 32). 5 tokens, 2 of
    # them scored, 9 attended keys at 4 * L*N*H = 64 FLOPs each:
    # forward = 2 * 1152 * 5 + 2 * 256 * 2 + 64 * 9 = 11520 + 1024 + 576 = 13120.
    assert F.forward_flops(TINY, tokens=5, attended_keys=9, head_tokens=2) == 13120
    assert F.train_flops(TINY, tokens=5, attended_keys=9, head_tokens=2) == 3 * 13120 == 39360
    assert F.train_flops(TINY, tokens=5, attended_keys=9, head_tokens=2, reference_forward=True) == 4 * 13120
    # No scored token: the head earns nothing, the rest is unchanged.
    assert F.forward_flops(TINY, tokens=5, attended_keys=9, head_tokens=0) == 11520 + 576


def test_lora_flops_credit_no_gradient_for_the_frozen_weights():
    # Frozen matmuls: forward + activations' gradient = 2 x 2 * 1408 * 5; attention 3 x 64 * 9; 100
    # adapter weights trained: 6 * 100 * 5.
    want = 2 * (2 * 1408 * 5) + 3 * (64 * 9) + 6 * 100 * 5
    assert F.train_flops(TINY, tokens=5, attended_keys=9, lora_params=100) == want == 32888
    online = F.train_flops(TINY, tokens=5, attended_keys=9, lora_params=100, reference_forward=True)
    assert online == want + 14080 + 576


def test_token_counts_count_scored_positions_and_need_the_mask():
    seg = np.array([[1, 1, 1, 1, 0], [1, 1, 2, 2, 2]])
    mask = np.array([[0, 0, 1, 1, 0], [1, 0, 0, 1, 0.5]], np.float32)  # > 0 counts, whatever the weight
    pair_ids = np.array([[0, -1], [1, -1]])
    stats = F.token_counts({"segment_ids": seg, "loss_mask": mask, "pair_ids": pair_ids})
    assert (stats.scored, stats.tokens, stats.slots, stats.pairs) == (5, 9, 10, 2)
    assert stats.padding_fraction == pytest.approx(0.1)
    # A list of batches is their sum.
    twice = F.token_counts([{"segment_ids": seg, "loss_mask": mask}] * 2)
    assert twice == F.TokenCounts(tokens=18, slots=20, attended_keys=2 * 19, scored=10, pairs=0)
    with pytest.raises(KeyError, match="loss_mask"):
        F.token_counts({"segment_ids": seg})


def _hand_pairs(labels=None):
    """Two pairs whose row layouts are counted by hand in the test below: pair 0 prompt 3 tokens, chosen
    2, rejected 1; pair 1 prompt 2, chosen 2, rejected 3."""
    from jdpo.data import TokenizedPairs

    ids = lambda *t: np.array(t, np.int32)  # noqa: E731
    return TokenizedPairs(
        prompt_ids=[ids(1, 5, 6), ids(1, 4)],
        chosen_ids=[ids(7, 8), ids(7, 2)],
        rejected_ids=[ids(9), ids(8, 9, 2)],
        source_index=np.arange(2),
        labels=labels,
    )


@pytest.mark.parametrize("labels", [None, np.array([True, False])], ids=["pairs", "unpaired kind"])
def test_token_counts_of_plain_and_shared_prompt_rows_by_hand(labels):
    """Rows of 24 slots with 3 pair slots: row 0 holds pairs 0 and 1 (its third slot empty), row 1 none.
    The unpaired batch kind (one rated example and its KL completion per slot) is the same layout.

    Plain: each sequence computes prompt + completion, a query sees its position + 1 keys:
      pair 0: chosen 5 tokens (1+..+5 = 15 keys), rejected 4 (10); pair 1: chosen 4 (10), rejected 5 (15).
    Shared prompt: the prompt but its last token once (segment -(k+1)), then each branch: its last
    token + the completion, seeing the prefix too (`masks.AttentionMask`):
      pair 0: prefix 2 (1+2 = 3 keys), chosen 3 (3+4+5 = 12), rejected 2 (3+4 = 7): 7 tokens, 22 keys;
      pair 1: prefix 1 (1), chosen 3 (2+3+4 = 9), rejected 4 (2+3+4+5 = 14): 8 tokens, 24 keys.
    The prefix is computed once and counts once: 15 tokens, not the 12 of the branches alone."""
    from jdpo.data import make_batch

    pairs = _hand_pairs(labels)
    plain = make_batch(pairs, [[0, 1], []], 24, 3)
    shared = make_batch(pairs, [[0, 1], []], 24, 3, shared_prompt=True)
    # scored: the completion tokens, 2 + 1 + 2 + 3 in either layout; pairs: the two filled slots.
    assert F.token_counts(plain) == F.TokenCounts(tokens=18, slots=48, attended_keys=50, scored=8, pairs=2)
    assert F.token_counts(shared) == F.TokenCounts(tokens=15, slots=48, attended_keys=46, scored=8, pairs=2)
    # The tokens are what the packing says a pair occupies.
    assert F.token_counts(shared).tokens == int(pairs.pair_lengths(shared_prompt=True).sum())
    assert F.token_counts(plain).tokens == int(pairs.pair_lengths().sum())
    assert F.token_counts(shared).padding_fraction == 1 - 15 / 48
    # The FLOPs follow: 15 tokens and 46 keys on TINY (2 * 1408 per token, 64 per key, x3 for training).
    counts = F.token_counts([shared, plain])
    assert (counts.tokens, counts.attended_keys) == (33, 96)
    assert F.train_flops(TINY, tokens=15, attended_keys=46) == 3 * (2 * 1408 * 15 + 64 * 46)


def test_attended_keys_with_a_sliding_window_by_hand():
    """Row slots back, like the mask: a window of 3 over a 5-token sequence gives 1, 2, 3, 3, 3 keys, a
    2-token one 1, 2; padding none."""
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 0]])
    assert F.attended_keys(seg, sliding_window=3) == 12 + 3
    assert F.attended_keys(seg) == 15 + 3
    assert F.attended_keys(seg, sliding_window=1) == 7  # each query itself


def test_attended_keys_are_the_masks_visible_pairs():
    """On random plain and shared-prompt rows, with and without a window: the credited keys are exactly
    the (query, key) pairs `AttentionMask.dense` lets a non-padding query see."""
    import jax.numpy as jnp
    from helpers_attention import packed_segments

    from jdpo.models.masks import AttentionMask

    rng = np.random.default_rng(1)
    for seg in (packed_segments(rng, 3, 40), shared_prompt_segments(rng, 3, 40)):
        for window in (None, 5):
            visible = np.asarray(AttentionMask(jnp.asarray(seg), window=window).dense())[:, 0]
            want = int(np.sum(visible & (seg != 0)[:, :, None]))
            assert F.attended_keys(seg, sliding_window=window) == want, (seg, window)
    # Every kernel computes at least the credited pairs on shared-prompt rows too.
    credited = F.attended_keys(seg)
    assert all(F.computed_attention_keys(k, seg, tile=8) >= credited for k in ("blocked", "splash", "xla"))


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
    assert F.matmul_params(llama3_8b) == 8_030_261_248 - 525_336_576 - 266_240


def test_peaks_and_mfu():
    class Dev:
        def __init__(self, platform, kind, process_index=0):
            self.platform, self.device_kind, self.process_index = platform, kind, process_index

    assert F.device_peak_flops(Dev("gpu", "NVIDIA H100 80GB HBM3")) == 989e12
    assert F.device_peak_flops(Dev("gpu", "NVIDIA H100 PCIe")) == 756e12
    assert F.device_peak_flops(Dev("tpu", "TPU v5 lite")) == 197e12
    assert F.device_peak_flops(Dev("tpu", "TPU v5")) == 459e12
    assert F.device_peak_flops(Dev("gpu", "NVIDIA L40S")) == 362e12
    assert F.device_peak_flops(Dev("gpu", "Some Future GPU")) is None
    assert F.total_peak_flops([Dev("tpu", "TPU v4")] * 4) == 4 * 275e12
    assert F.total_peak_flops([Dev("tpu", "TPU v4"), Dev("gpu", "unknown")]) is None
    tm = F.throughput_metrics(step_time=2.0, tokens=300, slots=400, flops=1e12, peak_flops=1e12)
    assert tm == {"step_time": 2.0, "tokens_per_sec": 150.0, "padding_fraction": 0.25, "mfu": 0.5}
    assert "mfu" not in F.throughput_metrics(step_time=1.0, tokens=1, slots=1, flops=1.0)


def test_cpu_peak_is_measured_once_per_host():
    import jax

    peak = F.measured_cpu_peak_flops()
    assert 1e8 < peak < 1e14  # a real CPU, neither broken timing nor absurd
    assert F.measured_cpu_peak_flops() == peak  # cached
    # 8 simulated CPU devices share one host's cores: one peak, not eight.
    assert F.total_peak_flops(jax.devices("cpu")) == peak


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
    assert F.matmul_params(c) == F.matmul_params(TINY) == 1408
    # All parameters = matmul ones + input embedding (V*D) + 2 norms per layer + the final norm.
    assert c.num_params() == 1408 + 32 * 8 + 2 * 2 * 8 + 8


def test_computed_attention_keys_per_kernel():
    """What each kernel computes, by hand: two rows of 4 tiles of 8 (row 0: segments of 8, 8 and 16
    positions; row 1: one segment of 30 and 2 of padding). blocked visits 5 + 10 tiles (the kernel's own
    block ranges, tests/test_attention.py), pallas_gpu and splash all 10 causal tiles of each row, xla
    T^2; a window of 4 cuts splash to the diagonal and the tile before it, and blocked row 1 likewise."""
    from jdpo.models.attention import _layout

    T, tile = 32, 8
    seg = np.zeros((2, T), np.int32)
    seg[0, :8], seg[0, 8:16], seg[0, 16:] = 1, 2, 3
    seg[1, :30] = 1
    assert F.computed_attention_keys("blocked", seg, tile=tile) == 15 * 64
    assert F.computed_attention_keys("pallas_gpu", seg, tile=tile) == 20 * 64
    assert F.computed_attention_keys("splash", seg, tile=tile) == 20 * 64
    assert F.computed_attention_keys("xla", seg, tile=tile) == 2 * 32 * 32
    assert F.computed_attention_keys("splash", seg, tile=tile, sliding_window=4) == 2 * 7 * 64
    # Row 0 (tiles 1, 1, 1, 2) is inside the window already; row 1 becomes 1 + 2 + 2 + 2.
    assert F.computed_attention_keys("blocked", seg, tile=tile, sliding_window=4) == (5 + 7) * 64
    # Against the blocked kernel's own ranges on random packed rows with a ragged T.
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    packed = np.sort(rng.integers(0, 6, (3, 50)), axis=1)[:, ::-1].copy()  # segments, padding (0) last
    for seg in (packed, shared_prompt_segments(rng, 3, 50)):
        *_, ranges = _layout(*(jnp.zeros((3, 50, 1, 2)),) * 3, jnp.asarray(seg), None, 16)
        a0, a1, b0, own = np.asarray(ranges).T  # own: the query block's index (the diagonal)
        visited = int(np.sum(np.maximum(a1 - a0 + 1, 0)) + np.sum(own - b0 + 1))
        assert F.computed_attention_keys("blocked", seg, tile=16) == visited * 16 * 16
    # Every kernel computes at least the credited pairs.
    seg = packed
    credited = F.attended_keys(seg)
    assert all(F.computed_attention_keys(k, seg, tile=16) >= credited for k in ("blocked", "splash", "xla"))


def test_token_counts_over_processes_sum_past_int32(monkeypatch):
    """Three simulated processes with equal counts: the global counts are 3x, also where a count (a large
    step's attended keys) passes 2^31, which the int32 collective alone cannot carry."""
    from jdpo.parallel import distributed

    def summed(values):  # what the collective does: an int32 elementwise sum over the processes
        local = np.asarray(values, np.int32)
        assert np.all(3 * local.astype(np.int64) < 2**31)
        return 3 * local

    counts = F.TokenCounts(tokens=5, slots=6, attended_keys=3 * 2**31 + 7, scored=2, pairs=1)
    assert counts.over_processes() is counts  # one process: nothing to sum
    monkeypatch.setattr(distributed, "process_count", lambda: 3)
    monkeypatch.setattr(distributed, "sum_over_processes", summed)
    assert counts.over_processes() == F.TokenCounts(15, 18, 3 * (3 * 2**31 + 7), 6, 3)


def test_token_counts_of_a_model_mixing_sliding_and_full_layers_credit_each_layer_its_keys():
    """gemma2 / 3, olmo3: the attended keys are the per-layer mean (the window's count on the sliding
    layers, the causal count on the full ones), not the window's count for every layer."""
    import numpy as np

    from jdpo.report.flops import token_counts

    seg = np.zeros((1, 16), np.int32)
    seg[0, :12] = 1  # one sequence of 12 tokens
    batch = {"segment_ids": seg, "loss_mask": (seg > 0).astype(np.float32)}
    full = token_counts(batch).attended_keys
    windowed = token_counts(batch, sliding_window=4).attended_keys
    assert full == 12 * 13 // 2 and windowed == 1 + 2 + 3 + 4 * 9 and windowed < full
    # 5 sliding layers per global one (gemma3), and 1:1 (gemma2).
    assert token_counts(batch, sliding_window=4, sliding_layers=(True,) * 5 + (False,)).attended_keys == (
        (5 * windowed + full) // 6
    )
    assert token_counts(batch, sliding_window=4, sliding_layers=(True, False)).attended_keys == (windowed + full) // 2
    # All sliding (mistral): the window's count; none: the full count.
    assert token_counts(batch, sliding_window=4, sliding_layers=(True, True)).attended_keys == windowed
    assert token_counts(batch, sliding_window=4, sliding_layers=(False, False)).attended_keys == full


def test_moe_matmul_params_count_the_active_experts():
    """A mixture of experts is credited with the router and the k experts a token runs, from a
    ModelConfig or its config.json alike (Mixtral-8x7B: 12.88B active = matmul params + the embedding
    + norms)."""
    from jdpo.models import ModelConfig

    hf = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
              num_experts_per_tok=2)  # fmt: skip
    config = ModelConfig.from_hf(hf)
    embedding, norms = 32000 * 4096, 4096 * (2 * 32 + 1)
    assert F.matmul_params(config) == F.matmul_params(hf) == config.num_active_params() - embedding - norms
