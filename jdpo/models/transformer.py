"""The one NNX decoder shared by every family: embeddings, a stack of `layers.DecoderLayer`, the final norm
and the unembedding; the KV-cache forward (`extend`) for generation.

Family differences are config switches (`ModelConfig`), never subclasses. With `ModelOptions.scan_layers`
the layer parameters are stacked with a leading [L] axis ("layers") and run by `jax.lax.scan`.

Which keys a query sees is `jdpo.models.masks.AttentionMask`, built once per forward and handed to every
layer; each attention call reads it in the form its kernel needs.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jdpo.errors import ConfigError
from jdpo.models.choices import attention_block_problem
from jdpo.models.config import ModelConfig
from jdpo.models.kernels import default_block, resolve_attention
from jdpo.models.layers import DecoderLayer, Dense, Embedding, RMSNorm, remat
from jdpo.models.masks import AttentionMask
from jdpo.models.moe import SparseMoE
from jdpo.models.options import PROJECTIONS, LoRASpec, ModelOptions
from jdpo.models.rope import rope_tables
from jdpo.parallel.context_layout import from_balanced, to_balanced
from jdpo.parallel.sharding import constrain

# Also importable from here: what a decoder is and how it runs.
__all__ = ["PROJECTIONS", "Dense", "LoRASpec", "ModelConfig", "ModelOptions", "Transformer"]


class Transformer(nnx.Module):
    """Decoder-only LM. `model(ids)` -> float32 logits; `hidden_states` + `unembedding` for chunked log-probs.

    `options.scan_layers` stacks the layers ([L, ...] parameters) and runs them with `jax.lax.scan`, so
    deep models compile once per layer instead of once per depth. Layers that differ only in attention
    type scan too (gemma2/3 and olmo3 local / global, smollm3 NoPE layers): per-layer arrays pick the
    layer's mask (`AttentionMask.for_layer`) and its RoPE table (`rope.rope_tables`) inside the scanned
    body, one stack of parameters for all.
    """

    def __init__(self, config: ModelConfig, *, options: ModelOptions | None = None, rngs: nnx.Rngs):
        options = ModelOptions() if options is None else options  # None: the defaults
        # "auto" and a 0 block become the kernel that runs and its tile here, once for every layer.
        choice = resolve_attention(
            options.attention, config, context=options.context, how=options.context_attention
        )
        if options.attention_block and (
            why := attention_block_problem(choice.kernel, options.attention_block)
        ):
            raise ConfigError(f"{why} ({choice.reason})")
        block = options.attention_block or default_block(choice.kernel)
        options = dataclasses.replace(options, attention=choice.kernel, attention_block=block)
        self.attention_reason = choice.reason  # what the run log says about the kernel
        c, dtype, param_dtype = config, options.dtype, options.param_dtype
        self.embed_tokens = Embedding(c, param_dtype=param_dtype, rngs=rngs)

        def make_layer(moe: bool, rngs):
            return DecoderLayer(c, options, rngs=rngs, mlp=SparseMoE(c, options, rngs=rngs) if moe else None)

        experts = c.expert_layers
        if options.scan_layers:
            if c.mixes_layer_kinds:  # one scanned body: every layer the same kind
                raise ConfigError(
                    f"model.scan_layers: {c.family}'s layers mix experts and dense MLPs (layers "
                    f"{[i for i, e in enumerate(experts) if not e]} are dense); set model.scan_layers: false"
                )

            @nnx.split_rngs(splits=c.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(rngs):
                return make_layer(experts[0], rngs)

            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([make_layer(moe, rngs) for moe in experts])
        self.norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, offset=c.norm_offset, dtype=dtype, param_dtype=param_dtype
        )
        if not c.tie_word_embeddings:
            self.lm_head = Dense(
                rngs.params(),
                (c.hidden_size,),
                (c.vocab_size,),
                ("embed", "vocab"),
                bias=False,
                param_dtype=param_dtype,
                std=c.initializer_range,
            )
        self.config, self.options = c, options

    def _embed(self, input_ids_BxT):
        """Token embeddings [B, T, D] in the compute dtype (gemma: scaled by sqrt(D))."""
        # The lookup gathers rows of a vocab-sharded table: gather the model dim (fsdp) first so XLA does a
        # local gather + all-reduce over tensor instead of replicating the table.
        table_VxD = constrain(
            self.embed_tokens.embedding[...].astype(self.options.dtype), ("act_vocab", "act_embed")
        )
        x_BxTxD = table_VxD[input_ids_BxT]
        if self.config.scale_embeddings:
            # HF gemma rounds sqrt(D) to the compute dtype before multiplying; so do we.
            x_BxTxD = x_BxTxD * jnp.asarray(self.config.hidden_size**0.5, self.options.dtype)
        return constrain(x_BxTxD, ("batch", "length", "act_embed"))

    def hidden_states(self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None, dropout_key=None):
        """Final hidden states [B, T, D] in the compute dtype, final norm applied. `dropout_key`: a
        training forward with LoRA dropout (layer i's projections fold in i, then their site)."""
        return self.hidden_and_router(input_ids_BxT, positions_BxT, segment_ids_BxT, dropout_key)[0]

    def hidden_and_router(
        self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None, dropout_key=None, slots_BxT=None
    ):
        """`hidden_states` and the MoE layers' router statistics over the real tokens (`moe.router_stats`
        stacked over the MoE layers: counts, probs [Lm, E], tokens [Lm]; None for a dense model).
        `slots_BxT`: rows dealt over the mesh's context axis in blocks (`Batch.slots`): the tokens are
        in the dealt order (hidden states returned in it), each one's natural row slot given."""
        c = self.config
        B, T = input_ids_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        flags = c.sliding_layers
        # Without segment ids the row is one sequence (segment 1 everywhere).
        ids_BxT = jnp.ones((B, T), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT
        # A row split over the mesh's context axis runs in the balanced layout (device i: chunks i and
        # 2C - 1 - i), its positions and segment ids moved with its tokens; identity without the axis.
        # A dealt row (slots given) arrives balanced from the host.
        balanced = slots_BxT is None
        if balanced:
            input_ids_BxT, positions_BxT, ids_BxT = (
                to_balanced(x) for x in (input_ids_BxT, positions_BxT, ids_BxT)
            )
        x_BxTxD = self._embed(input_ids_BxT)
        cos_R, sin_R, rope_index = rope_tables(positions_BxT, c, self.options.dtype)
        mask = AttentionMask(ids_BxT, window=c.sliding_window if any(flags) else None, slots_BxT=slots_BxT)

        def layer_fn(graphdef, state, x, is_sliding, rope, i):
            layer = nnx.merge(graphdef, state)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            return layer(x, cos_R[rope], sin_R[rope], mask.for_layer(is_sliding), key)

        policy = self.options.remat
        if self.options.scan_layers:
            graphdef, state = nnx.split(self.layers)
            body = remat(lambda x, xs: layer_fn(graphdef, *xs[:1], x, *xs[1:]), policy)
            xs = (
                state,
                jnp.asarray(flags),
                jnp.asarray(rope_index),
                jnp.arange(c.num_layers, dtype=jnp.int32),
            )
            x_BxTxD, stats = jax.lax.scan(body, x_BxTxD, xs)
        else:
            per_layer = []
            for i, (layer, is_sliding, rope) in enumerate(zip(self.layers, flags, rope_index, strict=True)):
                graphdef, state = nnx.split(layer)
                fn = remat(
                    lambda s, x, gd=graphdef, f=is_sliding, r=rope, i=i: layer_fn(gd, s, x, f, r, i), policy
                )
                x_BxTxD, layer_stats = fn(state, x_BxTxD)
                per_layer.append(layer_stats)
            moe = [s for s in per_layer if s is not None]
            stats = jax.tree.map(lambda *xs: jnp.stack(xs), *moe) if moe else None
        x_BxTxD = self.norm(x_BxTxD)
        return (from_balanced(x_BxTxD) if balanced else x_BxTxD), stats

    def unembedding(self):
        """Unembedding [D, V] in the compute dtype (tied: the embedding matrix transposed)."""
        w, vocab_first = self.unembedding_as_stored()
        return w.T if vocab_first else w

    def unembedding_as_stored(self):
        """(the unembedding in the compute dtype, vocab_first): [D, V], or a tied model's embedding
        matrix [V, D] untransposed with vocab_first True (`logprobs.token_logprobs_from_hidden` contracts
        it in that layout, so neither it nor its gradient is copied transposed)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...].astype(self.options.dtype), True
        return self.lm_head.kernel[...].astype(self.options.dtype), False

    def logits(self, h_BxTxD):
        """Logits [B, T, V] in float32 from final hidden states (final soft-cap applied when configured)."""
        logits_BxTxV = jnp.einsum(
            "BTD,DV->BTV", h_BxTxD, self.unembedding(), preferred_element_type=jnp.float32
        )
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits_BxTxV = jnp.tanh(logits_BxTxV / cap) * cap
        return constrain(logits_BxTxV, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None):
        """Logits [B, T, V] in float32 (final soft-cap applied when the config has one)."""
        return self.logits(self.hidden_states(input_ids_BxT, positions_BxT, segment_ids_BxT))

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
        """An empty KV cache: {"k", "v"} [L, B, S, K, H] (S = max_length) in `dtype` (default: the compute
        dtype), layer-stacked for both layer layouts. See `extend` for how it is filled."""
        c = self.config
        shape = (c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim)
        dtype = self.options.dtype if dtype is None else dtype
        names = ("layers", "batch", "length", "act_kv_heads", None)
        return {
            "k": constrain(jnp.zeros(shape, dtype), names),
            "v": constrain(jnp.zeros(shape, dtype), names),
        }

    def extend(self, input_ids_BxT, cache: dict, slot, start_B):
        """Run T new tokens per row at cache slots [slot, slot + T) and store their keys / values.

        Rows are left-padded: row b's real tokens occupy slots >= start_B[b], so its token at slot s has
        position s - start_B[b], and every row writes the same slots each call (one dynamic_update_slice,
        fixed shapes: prefill is one call with T = prompt length at slot 0, decoding calls with T = 1 at
        slot = prompt length + step). A query sees the slots at or before its own that hold real tokens
        (padding is never attended; a padding query sees only padding, so nothing is NaN), within the
        sliding window on sliding layers (slot distance == position distance for real tokens): the mask
        is `AttentionMask.kv_cache`. The whole cache stays resident on sliding layers too (masked, not a
        ring buffer).

        Args:
          input_ids_BxT: int32 token ids. cache: from `init_cache` (or a previous `extend`).
          slot: int32 scalar, may be traced. start_B: int32 [B], first real slot of each row.
        Returns (hidden [B, T, D] with the final norm applied, updated cache); `logits(hidden)` gives logits.
        """
        c = self.config
        B, T = input_ids_BxT.shape
        S = cache["k"].shape[2]
        q_slot_T = slot + jnp.arange(T, dtype=jnp.int32)
        positions_BxT = jnp.maximum(q_slot_T[None, :] - start_B[:, None], 0)
        x_BxTxD = self._embed(input_ids_BxT)
        cos_R, sin_R, rope_index = rope_tables(positions_BxT, c, self.options.dtype)
        flags = c.sliding_layers
        mask = AttentionMask.kv_cache(start_B, slot, T, S, window=c.sliding_window if any(flags) else None)

        def layer_fn(layer, x, k_BxSxKxH, v_BxSxKxH, is_sliding, rope):
            return layer.extend(
                x, cos_R[rope], sin_R[rope], mask.for_layer(is_sliding), k_BxSxKxH, v_BxSxKxH, slot
            )

        k_all, v_all = cache["k"], cache["v"]

        def store(all_LxBxSxKxH, new_BxTxKxH, i):
            # Only the T new slots are written: the cache is updated in place under donation / loops.
            start = (i, 0, slot, 0, 0)
            return jax.lax.dynamic_update_slice(
                all_LxBxSxKxH, new_BxTxKxH[None].astype(all_LxBxSxKxH.dtype), start
            )

        if self.options.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(carry, xs):
                x, k_all, v_all = carry
                layer_state, is_sliding, rope, i = xs
                layer = nnx.merge(graphdef, layer_state)
                x, k_new, v_new = layer_fn(layer, x, k_all[i], v_all[i], is_sliding, rope)
                return (x, store(k_all, k_new, i), store(v_all, v_new, i)), None

            xs = (
                state,
                jnp.asarray(flags),
                jnp.asarray(rope_index),
                jnp.arange(c.num_layers, dtype=jnp.int32),
            )
            (x_BxTxD, k_all, v_all), _ = jax.lax.scan(body, (x_BxTxD, k_all, v_all), xs)
        else:
            for i, (layer, is_sliding, rope) in enumerate(zip(self.layers, flags, rope_index, strict=True)):
                x_BxTxD, k_new, v_new = layer_fn(layer, x_BxTxD, k_all[i], v_all[i], is_sliding, rope)
                k_all, v_all = store(k_all, k_new, i), store(v_all, v_new, i)
        return self.norm(x_BxTxD), {"k": k_all, "v": v_all}
