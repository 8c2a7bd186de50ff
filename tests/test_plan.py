"""jdpo.commands.plan: memory per device on tiny configs checked against hand-computed numbers, sharding by the
rules table (with its divisibility fallback), the Llama-3-8B parameter count, sizes and device names,
and the `jdpo plan` command."""

from __future__ import annotations

import json

import pytest

from jdpo import cli
from jdpo import config as C
from jdpo.commands import plan
from jdpo.models import ModelConfig
from jdpo.train.step import LOGPROB_CHUNK

# V=100, D=16, F=32, L=2, N=4, K=2, H=4, untied.
TINY = ModelConfig(
    family="llama", vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=4,
)  # fmt: skip
# By hand: embed 100*16 + lm_head 16*100 + final norm 16, and per layer q 16*4*4 + k, v 16*2*4 each +
# o 4*4*16 + mlp 3*16*32 + 2 norms of 16.
TINY_PARAMS = 1600 + 1600 + 16 + 2 * (256 + 128 + 128 + 256 + 1536 + 32)
NORM_PARAMS = 16 * 5  # 2 per layer + the final norm: replicated on every mesh


def tiny_cfg(**overrides):
    base = {
        "data.max_length": 8,
        "data.max_prompt_length": 4,
        "train.batch_rows": 2,
        "model.dtype": "float32",
    }
    return C.replace(C.Config(), **{**base, **overrides})


def test_tiny_counts_by_hand():
    p = plan.plan_memory(TINY, tiny_cfg(**{"mesh.fsdp": 1}), num_devices=1)
    assert TINY_PARAMS == 7888 == p.num_params == TINY.num_params()
    assert p.part("parameters") == 4 * TINY_PARAMS
    assert p.part("gradients") == 4 * TINY_PARAMS  # float32 accumulator
    # AdamW: mu + nu like the parameters, plus the step counters (a few int32 scalars).
    assert 0 <= p.part("optimizer") - 2 * 4 * TINY_PARAMS <= 32
    # Activations, remat none, blocked attention (the default): B=2 rows x T=16 tokens, per token per layer
    # (4D + 2NH + 2KH + 3F) * 4 bytes + N * 4 (float32 log-sum-exp per query head), plus 2D * 4 at the top.
    per_layer = (4 * 16 + 2 * 16 + 2 * 8 + 3 * 32) * 4 + 4 * 4
    assert per_layer == 848
    assert p.part("activations") == 2 * 16 * (2 * per_layer + 2 * 16 * 4)
    # The device's B * T = 32 positions are one group, shorter than a chunk: 32 x V float32.
    assert p.part("log-prob chunk") == 32 * 100 * 4
    assert p.part("batch") == 2 * 16 * 5 * 4
    assert p.total == sum(b for _, b, _ in p.rows)
    assert (p.rows_per_device, p.row_length) == (2, 16)


@pytest.mark.parametrize(
    "remat, saved_per_layer",
    [("full", 16 * 4), ("dots_saveable", (3 * 16 + 16 + 2 * 8 + 2 * 32) * 4)],
)
def test_tiny_remat(remat, saved_per_layer):
    p = plan.plan_memory(TINY, tiny_cfg(**{"mesh.fsdp": 1, "model.remat": remat}), num_devices=1)
    full_layer = 848  # one layer's whole set (with its log-sum-exp), live again while it is recomputed
    assert p.part("activations") == 2 * 16 * (2 * saved_per_layer + 2 * 16 * 4 + full_layer)


@pytest.mark.parametrize("remat, layers_holding_state", [("none", 2), ("dots_saveable", 1), ("full", 1)])
@pytest.mark.parametrize("kernel", ["blocked", "splash"])
def test_xla_attention_stores_probabilities(kernel, remat, layers_holding_state):
    # xla keeps N x T float32 probabilities per token where blocked / splash keep N float32 log-sum-exps:
    # N * (T - 1) * 4 more bytes per token in every layer that holds its attention state (all L without
    # remat; the one layer being recomputed with it), over the device's B * T tokens. bfloat16 compute:
    # the attention state is float32 whatever the compute dtype.
    def acts(attention):
        over = {"mesh.fsdp": 1, "model.remat": remat, "model.attention": attention, "model.dtype": "bfloat16"}
        cfg = tiny_cfg(**over)
        return plan.plan_memory(TINY, cfg, num_devices=1).part("activations")

    B, T, N = 2, 16, 4
    assert acts("xla") - acts(kernel) == layers_holding_state * N * (T - 1) * 4 * B * T
    with pytest.raises(ValueError, match="attention must be"):
        plan.activation_bytes_per_token(TINY, remat=remat, attention="flash", row_length=T, dtype_bytes=4)


def test_auto_attention_is_the_target_backends_kernel():
    """model.attention=auto is planned as the kernel the target runs: splash on a TPU (log-sum-exps, like
    blocked), pallas_gpu on an NVIDIA GPU, which keeps k and v repeated to one per query head:
    2 (N - K) H * b more per token in each of the L layers (remat none)."""
    cfg = tiny_cfg(**{"mesh.fsdp": 1, "model.dtype": "bfloat16"})

    def acts(**kw):
        p = plan.plan_memory(TINY, cfg, num_devices=1, **kw)
        return p.part("activations"), dict((name, note) for name, _, note in p.rows)["activations"]

    blocked, note = acts(backend="cpu")
    assert "blocked attention" in note
    assert acts(backend="tpu")[0] == blocked and "splash attention" in acts(backend="tpu")[1]
    gpu, note = acts(backend="gpu")
    B, T, N, K, H, L = 2, 16, 4, 2, 4, 2
    assert "pallas_gpu attention" in note and gpu - blocked == L * 2 * (N - K) * H * 2 * B * T
    devices = ("h100", "v5e", "cpu (host RAM)", "TPU v4 (detected)", "80GiB")
    assert [plan.target_backend(d) for d in devices] == ["gpu", "tpu", "cpu", "tpu", None]


def test_logprob_chunk_spans_the_device_rows():
    # B=4 rows x T=128 on one device: 512 positions as one group, scanned LOGPROB_CHUNK at a time.
    cfg = tiny_cfg(
        **{"mesh.fsdp": 1, "train.batch_rows": 4, "data.max_length": 64, "data.max_prompt_length": 32}
    )
    p = plan.plan_memory(TINY, cfg, num_devices=1)
    assert (p.rows_per_device, p.row_length) == (4, 128)
    assert LOGPROB_CHUNK < 4 * 128
    assert p.part("log-prob chunk") == LOGPROB_CHUNK * 100 * 4


def test_fsdp_and_tensor_sharding():
    # fsdp=4: every matrix has the model dimension D=16 (divisible by 4); norms are replicated.
    p = plan.plan_memory(TINY, tiny_cfg(**{"mesh.fsdp": -1, "train.batch_rows": 8}), num_devices=4)
    assert p.mesh == (1, 4, 1)
    assert p.part("parameters") == 4 * ((TINY_PARAMS - NORM_PARAMS) // 4 + NORM_PARAMS)
    assert p.rows_per_device == 2  # 8 rows over data x fsdp = 4
    # tensor=2: heads, kv heads, mlp and vocab split; activations' wide dims and the logits chunk too.
    p2 = plan.plan_memory(TINY, tiny_cfg(**{"mesh.fsdp": 1, "mesh.tensor": 2}), num_devices=2)
    assert p2.part("parameters") == 4 * ((TINY_PARAMS - NORM_PARAMS) // 2 + NORM_PARAMS)
    assert p2.part("log-prob chunk") == 2 * 16 * 50 * 4  # B * T = 32 positions x V / 2
    per_layer = (4 * 16 + 2 * 2 * 4 + 2 * 1 * 4 + 3 * 16) * 4 + 2 * 4  # N / 2 = 2 log-sum-exps
    assert p2.part("activations") == 2 * 16 * (2 * per_layer + 2 * 16 * 4)
    # An odd vocabulary does not divide by 2: the embedding and lm_head stay whole (rules fallback).
    odd = ModelConfig(**{**TINY.__dict__, "vocab_size": 101})
    p3 = plan.plan_memory(odd, tiny_cfg(**{"mesh.fsdp": 1, "mesh.tensor": 2}), num_devices=2)
    vocab_params = 2 * 101 * 16
    others = odd.num_params() - vocab_params - NORM_PARAMS
    assert p3.part("parameters") == 4 * (vocab_params + others // 2 + NORM_PARAMS)


def test_online_reference_and_cache_size():
    p = plan.plan_memory(TINY, tiny_cfg(**{"mesh.fsdp": 1, "dpo.reference": "online"}), num_devices=1)
    assert p.part("reference params") == p.part("parameters")
    p = plan.plan_memory(TINY, tiny_cfg(**{"mesh.fsdp": 1}), num_devices=1, num_pairs=1000)
    assert p.ref_cache_bytes == 16_000


LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}  # fmt: skip


def test_llama3_8b(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    mc = plan.read_model_config(path)
    cfg = C.replace(
        C.Config(), **{"model.param_dtype": "bfloat16", "model.remat": "full", "train.batch_rows": 8}
    )
    p = plan.plan_memory(mc, cfg, num_devices=8)
    assert p.num_params == 8_030_261_248
    norms = (2 * 32 + 1) * 4096  # replicated; everything else has D=4096, split over fsdp=8
    assert p.part("parameters") == 2 * ((8_030_261_248 - norms) // 8 + norms)
    assert p.part("gradients") == 4 * ((8_030_261_248 - norms) // 8 + norms)
    # bf16 params: optax keeps mu / nu in the parameter dtype.
    assert 0 <= p.part("optimizer") - 2 * p.part("parameters") <= 32
    assert plan.fits(p, plan.DEVICE_MEMORY["h100"])
    one = plan.plan_memory(mc, cfg, num_devices=1)
    assert not plan.fits(one, plan.DEVICE_MEMORY["h100"])  # 8B with AdamW on one 80 GiB device


def test_sizes_and_devices():
    assert plan.parse_size("80GiB") == 80 * 2**30 == plan.parse_size("80G")
    assert plan.parse_size("16GB") == 16 * 10**9
    assert plan.parse_size("1.5e3") == 1500
    with pytest.raises(ValueError):
        plan.parse_size("lots")
    assert plan.device_memory("v5e") == ("v5e", 16 * 2**30)
    assert plan.device_memory("a100-40g")[1] == 40 * 2**30
    assert plan.device_memory("cpu")[1] == plan.host_memory() > 0
    with pytest.raises(ValueError, match="unknown device"):
        plan.device_memory("tpu9000")


def test_cli(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "--hf-config", str(path), "--device-memory", "v5e", "--devices", "1",
                   "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 2 and "fits: NO" in text and "8,030,261,248" in text
    assert json.loads(out.read_text())["fits"] is False
    rc = cli.main(["plan", "--hf-config", str(path), "--device-memory", "h100", "--devices", "64",
                   "--model.remat", "full", "--model.param_dtype", "bfloat16"])  # fmt: skip
    assert rc == 0 and "fits: yes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["plan", "--device-memory", "h100"])  # no model


def test_moe_experts_shard_over_the_expert_axis_and_the_dispatch_buffers_count():
    """A mixtral-shaped TINY (4 experts of 32, top 2): every expert parameter counted, sharded over
    mesh.expert (which also splits the rows), the active parameters named, and the dispatch buffers of
    the k assignments per token in the activations (X k (2D + 3F) per MoE layer and token)."""
    import dataclasses

    moe = dataclasses.replace(TINY, family="mixtral", num_experts=4, experts_per_token=2,
                              moe_intermediate_size=32, norm_topk_prob=True)  # fmt: skip
    experts = 2 * (16 * 4 + 4 * 3 * 16 * 32)  # router + 4 experts, per layer
    assert moe.num_params() == TINY_PARAMS - 2 * 1536 + experts
    one = plan.plan_memory(moe, tiny_cfg(**{"mesh.fsdp": 1}), num_devices=1)
    assert one.num_params == moe.num_params() and "active: 2 of 4 experts" in one.rows[0][2]
    ep = plan.plan_memory(moe, tiny_cfg(**{"mesh.fsdp": 1, "mesh.expert": 4, "train.batch_rows": 4}),
                          num_devices=4)  # fmt: skip
    expert_kernels = 2 * 3 * 4 * 16 * 32
    assert one.part("parameters") - ep.part("parameters") == expert_kernels * 3 // 4 * 4  # float32
    assert ep.rows_per_device == 1 and ep.expert == 4
    dense = plan.plan_memory(TINY, tiny_cfg(**{"mesh.fsdp": 1}), num_devices=1)
    # per token and layer: k (2D + 3F_e) dispatch elements + 2E for the float32 probabilities, in place
    # of the gated MLP's 3F; L = 2 layers, 4 bytes
    more = (2 * (2 * 16 + 3 * 32) + 2 * 4) - 3 * 32
    assert (
        one.part("activations") - dense.part("activations")
        == one.rows_per_device * one.row_length * 2 * more * 4
    )


def test_expert_lora_counts_one_adapter_per_expert_by_hand():
    """Per-expert LoRA on the mixtral-shaped TINY (4 experts of 32, top 2, rank 2): each MoE layer's
    experts.gate_up_proj adapter is A [4, 16, 2] + B [4, 2, 2, 32], experts.down_proj's A [4, 32, 2] +
    B [4, 2, 16]; the saved x A intermediates count k = 2 per token and expert target."""
    import dataclasses

    moe = dataclasses.replace(TINY, family="mixtral", num_experts=4, experts_per_token=2,
                              moe_intermediate_size=32, norm_topk_prob=True)  # fmt: skip
    attention = {"mesh.fsdp": 1, "lora.rank": 2, "lora.targets": ("q_proj", "o_proj")}
    base = plan.plan_memory(moe, tiny_cfg(**attention), num_devices=1)
    q_o = 2 * ((16 * 2 + 2 * 16) + (16 * 2 + 2 * 16))  # per layer: q A [16, 2] B [2, 4, 4]; o likewise
    assert base.part("adapters") == 4 * q_o  # float32
    experts = {**attention, "lora.targets": ("q_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj")}
    p = plan.plan_memory(moe, tiny_cfg(**experts), num_devices=1)
    per_layer = 4 * (16 * 2 + 2 * 2 * 32) + 4 * (32 * 2 + 2 * 16)
    assert p.part("adapters") == 4 * (q_o + 2 * per_layer)
    assert f"{q_o + 2 * per_layer:,} LoRA params (rank 2)" in p.rows[1][2]
    # activations: 2 layers x 2 expert targets x k = 2 assignments x rank 2 x 4 bytes per token
    assert (
        p.part("activations") - base.part("activations")
        == p.rows_per_device * p.row_length * 2 * 2 * 2 * 2 * 4
    )


def test_quantised_experts_count_by_hand():
    """QLoRA on the mixtral-shaped TINY (4 experts of 32, top 2; nf4): the stacked experts are stored as
    two codes per byte plus a float32 absmax per block (16 along D = 16, 32 along F_e = 32), and the
    dequantised layer is the attention's four kernels and the device's experts' three stacked ones."""
    import dataclasses

    moe = dataclasses.replace(TINY, family="mixtral", num_experts=4, experts_per_token=2,
                              moe_intermediate_size=32, norm_topk_prob=True)  # fmt: skip
    over = {"mesh.fsdp": 1, "lora.rank": 2, "lora.targets": ("q_proj",)}
    plain = plan.plan_memory(moe, tiny_cfg(**over), num_devices=1)
    nf4 = plan.plan_memory(moe, tiny_cfg(**over, **{"lora.quantize": "nf4"}), num_devices=1)
    attention = 256 + 128 + 128 + 256  # q, k, v, o weights of one layer
    experts = 3 * 4 * 16 * 32  # gate, up, down of 4 experts
    # per layer, float32 -> nf4: attention blocks of 16 (q, k, v along D) and 4 (o along H); expert blocks
    # of 16 (gate, up along D) and 32 (down along F_e)
    attention_nf4 = attention // 2 + (256 + 128 + 128) // 16 * 4 + 256 // 4 * 4
    experts_nf4 = experts // 2 + 2 * (4 * 16 * 32) // 16 * 4 + (4 * 32 * 16) // 32 * 4
    saved = 2 * (attention * 4 - attention_nf4 + experts * 4 - experts_nf4)
    assert plain.part("base (frozen)") - nf4.part("base (frozen)") == saved
    assert "nf4 projections and experts" in nf4.rows[0][2]
    assert f"{moe.num_params():,} params" in nf4.rows[0][2]  # weights, not stored bytes
    assert nf4.part("dequantised layer") == (attention + experts) * 4
    ep = plan.plan_memory(
        moe, tiny_cfg(**over, **{"lora.quantize": "int8", "mesh.expert": 2, "train.batch_rows": 2}),
        num_devices=2,
    )  # fmt: skip
    assert ep.part("dequantised layer") == (attention + experts // 2) * 4  # this device's 2 experts


def test_context_axis_and_offload_by_hand():
    """mesh.context = 4: a device holds T / 4 of each row's activations, plus one layer's k / v of the
    whole row (all_gather) or two shards (ring) with float32 gradients; `remat: offload` keeps no layer
    input on the device and L D b per token in host memory."""
    one = plan.plan_memory(TINY, tiny_cfg(**{"data.row_length": 64, "mesh.fsdp": 1}), num_devices=1)
    over = {"data.row_length": 64, "mesh.fsdp": 1, "mesh.context": 4}
    ctx = plan.plan_memory(TINY, tiny_cfg(**over), num_devices=4)
    assert dict(ctx.to_dict()["mesh"]) == dict(data=1, fsdp=1, tensor=1, expert=1, context=4)
    assert ctx.part("activations") * 4 == one.part("activations")
    kv = 2 * 2 * 4 * (4 + 4)  # 2 (k, v) x K x H x (float32 value + float32 gradient) per token
    assert ctx.part("context k / v") == 2 * 64 * kv  # B rows x the whole row
    ring = plan.plan_memory(TINY, tiny_cfg(**over, **{"model.context_attention": "ring"}), num_devices=4)
    assert ring.part("context k / v") == 2 * (2 * 64 // 4) * kv  # the held and the incoming shard
    splash = plan.plan_memory(TINY, tiny_cfg(**over, **{"model.attention": "splash"}), num_devices=4)
    assert splash.part("context k / v") == ring.part("context k / v")  # splash runs in the ring
    gpu = plan.plan_memory(TINY, tiny_cfg(**over, **{"model.attention": "pallas_gpu"}), num_devices=4)
    assert gpu.part("context k / v") == ring.part("context k / v")  # and so does pallas_gpu
    off = plan.plan_memory(TINY, tiny_cfg(**over, **{"model.remat": "offload"}), num_devices=4)
    full = plan.plan_memory(TINY, tiny_cfg(**over, **{"model.remat": "full"}), num_devices=4)
    assert off.part("activations") == full.part("activations") - 2 * 16 * 2 * 16 * 4  # L D b x B T/C
    assert off.host_bytes == 2 * 16 * 2 * 16 * 4 and full.host_bytes == 0
    assert "host (offload)" in plan.format_plan(off, device="h100", device_bytes=80 * 2**30)
