"""Hugging Face safetensors import (lazy, sharded, strict) and export; random init born sharded.

Import never materialises a whole checkpoint: each parameter is built with `jax.make_array_from_callback`
and every device's slice is read from the file with `safe_open(...).get_slice`, so a host holds at most
one tensor (usually much less) unsharded. Key accounting is strict: a checkpoint tensor nothing uses, a
parameter with no tensor, and a shape mismatch are errors naming the key and the file. The only tensors
skipped silently are `rotary_emb.inv_freq` buffers some old exports carry (derived, not parameters).
"""

import contextlib
import functools
import json
import math
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jdpo.errors import UserError
from jdpo.models import quantize as quantization
from jdpo.models.config import ModelConfig
from jdpo.models.dispatch import QUANTIZED_KERNELS
from jdpo.models.families import WeightSpec, weight_table
from jdpo.models.layers import Dense
from jdpo.models.moe import Experts
from jdpo.models.options import ModelOptions
from jdpo.models.transformer import Transformer
from jdpo.parallel.sharding import named_sharding, param_shardings

INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not match the model exactly (names the key and the file)."""


def _checkpoint_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file name, from the index or by listing the directory."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    key_to_file = {}
    for name in files:
        with _open_safetensors(os.path.join(path, name)) as f:
            for key in f.keys():
                key_to_file[key] = name
    return key_to_file


def _open_safetensors(path: str):
    """`safe_open`, with an unreadable file (truncated, not safetensors) a CheckpointError naming it."""
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); download it again") from None


def _norm_index(index, shape) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))


def _read_block(tensor_slice, spec: WeightSpec, index: tuple[slice, ...]) -> np.ndarray:
    """Read the part of one HF tensor that lands at `index` of the model-layout array.

    Slices on the model layout map back through the transpose onto the reshaped HF dims; an HF dim split
    into factors (e.g. N*H) is read as one contiguous range when only its first factor is sliced (head_dim
    is never sharded), otherwise the whole dim is read and sliced in memory.
    """
    n_split = len(spec.perm)
    split_index: list[slice] = [slice(None)] * n_split
    for i, p in enumerate(spec.perm):
        split_index[p] = index[i]
    hf_index, post_index, read_shape = [], [], []
    k = 0
    for factors in spec.groups:
        sub = split_index[k : k + len(factors)]
        k += len(factors)
        inner = math.prod(factors[1:])
        if all(s == slice(0, f, 1) for s, f in zip(sub[1:], factors[1:], strict=True)):
            hf_index.append(slice(sub[0].start * inner, sub[0].stop * inner))
            read_shape += [sub[0].stop - sub[0].start, *factors[1:]]
            post_index += [slice(None)] * len(factors)
        else:
            hf_index.append(slice(0, math.prod(factors)))
            read_shape += list(factors)
            post_index += sub
    block = np.asarray(tensor_slice[tuple(hf_index)])
    return block.reshape(read_shape)[tuple(post_index)].transpose(spec.perm)


def _model_params(model) -> dict[str, nnx.Variable]:
    return {".".join(map(str, path)): v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def _abstract_model(config: ModelConfig, options: ModelOptions) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(config, options=options, rngs=nnx.Rngs(0)))


def _sharding_for(var: nnx.Variable, mesh, shape=None):
    """`var`'s sharding from its logical names (for an array of `shape`, by default its own)."""
    shape = var.get_value().shape if shape is None else shape
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return named_sharding(mesh, var.get_metadata().get("out_sharding"), shape)


def from_pretrained(path, *, options: ModelOptions | None = None, mesh=None):
    """Load a HF checkpoint directory (config.json + safetensors) straight into its target shardings.

    Returns (model, config). `options` says how to run it (dtypes, remat, layer layout, attention kernel;
    None: `ModelOptions()`); the parameters are stored in `options.param_dtype`. With `mesh` they are
    placed by `jdpo.parallel.sharding.LOGICAL_AXIS_RULES`, else on the first device.
    """
    options = ModelOptions() if options is None else options
    path = os.fspath(path)
    config = ModelConfig.from_hf(path)
    model = _abstract_model(config, options)
    scan_layers, param_dtype = options.scan_layers, options.param_dtype
    # LoRA adapters (options.lora) are not in a base checkpoint: they are initialised after the load.
    params = {k: v for k, v in _model_params(model).items() if not isinstance(v, nnx.LoRAParam)}
    # A quantised base (options.lora.quantize, `jdpo.models.quantize`; the projections' kernels and the
    # MoE experts' stacked kernels): each kernel is read as float and quantised right after it loads, its
    # scale computed from it, so at most one float kernel (one layer's, in a scanned stack) is held at a
    # time.
    quantized = _quantized_kernels(model)
    for name in quantized:
        params.pop(name + "_scale")
    key_to_file = _checkpoint_files(path)
    L = config.num_layers
    used: set[str] = set()

    with contextlib.ExitStack() as stack:
        handles = {}

        def open_tensor(key, spec_shape, model_path):
            if key not in key_to_file:
                raise CheckpointError(
                    f"missing tensor {key!r} (for model parameter {model_path}) in checkpoint {path}"
                )
            fname = key_to_file[key]
            if fname not in handles:
                full = os.path.join(path, fname)
                if not os.path.exists(full):
                    raise CheckpointError(f"{INDEX_FILE} maps {key!r} to {fname}, which does not exist")
                handles[fname] = stack.enter_context(_open_safetensors(full))
            if key not in handles[fname].keys():
                raise CheckpointError(f"missing tensor {key!r} in file {fname} (listed in {INDEX_FILE})")
            tensor = handles[fname].get_slice(key)
            shape = tuple(tensor.get_shape())
            if shape != tuple(spec_shape):
                raise CheckpointError(
                    f"tensor {key!r} in file {fname} has shape {shape}, expected {tuple(spec_shape)} "
                    f"(model parameter {model_path})"
                )
            used.add(key)
            return tensor

        for spec in weight_table(config):
            per_layer = "{i}" in spec.model_path
            for model_path, keys in _targets(spec, L, scan_layers):
                var = params.pop(model_path, None)
                if var is None:
                    raise CheckpointError(f"weight table names {model_path}, which the model does not have")
                tensors = jax.tree.map(lambda k, p=model_path, s=spec: open_tensor(k, s.hf_shape, p), keys)
                stacked = int(per_layer and scan_layers) + bool(spec.experts)
                target = quantized.get(model_path)
                if target is None:
                    shape = var.get_value().shape
                    loaded = _load_array(
                        shape, _sharding_for(var, mesh, shape), tensors, spec, stacked=stacked,
                        param_dtype=param_dtype,
                    )  # fmt: skip
                    var.set_value(loaded)
                else:
                    load = functools.partial(_load_array, spec=spec, param_dtype=param_dtype)
                    layers = per_layer and scan_layers
                    _load_quantized(target, load, tensors, stacked, layers=layers, mesh=mesh)
    if params:
        raise CheckpointError(f"model parameters with no checkpoint tensor in {path}: {sorted(params)}")
    unused = sorted(k for k in key_to_file if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unused:
        details = ", ".join(f"{k!r} in file {key_to_file[k]}" for k in unused[:10])
        hint = " (config.json says tie_word_embeddings=true)" if "lm_head.weight" in unused else ""
        raise CheckpointError(f"{len(unused)} unused checkpoint tensor(s): {details}{hint}")
    if options.lora is not None:
        _init_adapters(model, config, options, mesh)
    return model, config


def _expert_keys(spec: WeightSpec, i: int):
    """The HF key of layer i (a list over the experts for a stacked expert parameter)."""
    if spec.experts:
        return [spec.hf_key.format(i=i, j=j) for j in range(spec.experts)]
    return spec.hf_key.format(i=i)


def _targets(spec: WeightSpec, L: int, scan_layers: bool) -> list[tuple[str, object]]:
    """(model path, HF keys) of one table entry: one key, or nested lists over the layers of a scanned
    stack and over the experts of an expert parameter (the order of the array's leading axes)."""
    if "{i}" not in spec.model_path:
        return [(spec.model_path, spec.hf_key)]
    layers = range(L) if spec.layers is None else spec.layers
    if scan_layers:
        return [(spec.model_path.replace(".{i}", ""), [_expert_keys(spec, i) for i in layers])]
    return [(spec.model_path.format(i=i), _expert_keys(spec, i)) for i in layers]


def _flat_keys(keys, index=()) -> list[tuple[str, tuple[int, ...]]]:
    """(HF key, its index in the parameter's leading axes) of every key of `_targets`' nested lists."""
    if isinstance(keys, str):
        return [(keys, index)]
    return [flat for n, k in enumerate(keys) for flat in _flat_keys(k, (*index, n))]


class _Quantized(NamedTuple):
    """A kernel stored quantised: its codes' and scale's variables and how it was quantised."""

    codes: nnx.Variable
    scale: nnx.Variable
    kind: str
    n_in: int
    n_out: int


def _quantized_kernels(model) -> dict[str, _Quantized]:
    """Dotted kernel path -> its `_Quantized`, for the quantised projections and expert kernels of `model`
    (a kernel's scale is the variable of the same path + "_scale")."""
    out = {}
    for path, m in nnx.iter_graph(model):
        prefix = ".".join(map(str, path))
        if isinstance(m, Dense) and m.quantize != "none":
            out[f"{prefix}.kernel"] = _Quantized(m.kernel, m.kernel_scale, m.quantize, m.n_in, m.n_out)
        elif isinstance(m, Experts) and m.quantize != "none":
            for name, n_out in QUANTIZED_KERNELS.items():
                if (codes := getattr(m, name, None)) is not None:
                    scale = getattr(m, f"{name}_scale")
                    out[f"{prefix}.{name}"] = _Quantized(codes, scale, m.quantize, 1, n_out)
    return out


_quantize = jax.jit(quantization.quantize, static_argnames=("kind", "n_in", "n_out"))


def _stack_to(arrays, sharding):
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*arrays)


def _load_quantized(q: _Quantized, load, tensors, stacked: int, *, layers: bool, mesh) -> None:
    """Read a float kernel, quantise it and store its codes and scale in their shardings. A scanned stack
    ([L, ...], `layers`) is read and quantised one layer at a time (a whole stack of expert kernels in
    bfloat16, Mixtral's 32 x 8 x 4096 x 14336, is 30 GB), its codes and scales stacked after."""
    shape = quantization.float_shape(q.kind, q.codes.get_value().shape, q.n_out)
    names = q.codes.get_metadata().get("out_sharding")
    kw = dict(kind=q.kind, n_in=q.n_in, n_out=q.n_out)
    if not layers:
        kernel = load(shape, _sharding_for(q.codes, mesh, shape), tensors, stacked=stacked)
        codes, scale = _quantize(kernel, **kw)
    else:
        sharding = (
            jax.sharding.SingleDeviceSharding(jax.devices()[0])
            if mesh is None
            else named_sharding(mesh, names[1:], shape[1:])
        )
        per_layer = [_quantize(load(shape[1:], sharding, t, stacked=stacked - 1), **kw) for t in tensors]
        codes = _stack_to([c for c, _ in per_layer], _sharding_for(q.codes, mesh))
        scale = _stack_to([s for _, s in per_layer], _sharding_for(q.scale, mesh))
    q.codes.set_value(jax.device_put(codes, _sharding_for(q.codes, mesh)))
    q.scale.set_value(jax.device_put(scale, _sharding_for(q.scale, mesh)))


def _init_adapters(model, config: ModelConfig, options: ModelOptions, mesh) -> None:
    """The LoRA adapters of a loaded model as `init_model` initialises them (A random, B = 0), born
    sharded; XLA drops the unused base initialisers from the compiled init."""

    def make():
        return Transformer(config, options=options, rngs=nnx.Rngs(0))

    _, abstract, _ = nnx.split(nnx.eval_shape(make), nnx.LoRAParam, ...)
    init = jax.jit(lambda: nnx.state(make(), nnx.LoRAParam), out_shardings=param_shardings(abstract, mesh))
    nnx.update(model, init())


def _load_array(shape, sharding, tensors, spec: WeightSpec, *, stacked: int, param_dtype):
    """One jax.Array of `shape` in `sharding`, each device's block read lazily from the file(s).
    `stacked`: how many leading axes index into nested lists of `tensors` (layers, experts); 0: one."""
    np_dtype = np.dtype(jnp.dtype(param_dtype))
    cache: dict = {}  # replicated blocks are requested once per device; read them once

    def read(tensors, index, depth):
        if not depth:
            return _read_block(tensors, spec, index)
        rows = range(index[0].start, index[0].stop)
        return np.stack([read(tensors[i], index[1:], depth - 1) for i in rows])

    def callback(index):
        index = _norm_index(index, shape)
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            cache[key] = np.ascontiguousarray(read(tensors, index, stacked).astype(np_dtype))
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def init_model(
    config: ModelConfig, *, options: ModelOptions | None = None, seed: int = 0, mesh=None
) -> Transformer:
    """Random init, born sharded: eval_shape -> shardings from the rules table -> jit(init, out_shardings).
    `options` as in `from_pretrained`."""

    def make():
        return Transformer(config, options=options, rngs=nnx.Rngs(seed))

    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    init = jax.jit(lambda: nnx.state(make()), out_shardings=param_shardings(abstract_state, mesh))
    return nnx.merge(graphdef, init())


def host_array(array: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered over processes when its shards are spread over them)."""
    if jax.process_count() > 1 and not array.is_fully_addressable:
        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(jax.device_get(array))


def _to_hf_layout(array: jax.Array, spec: WeightSpec) -> np.ndarray:
    host = host_array(array)
    return np.ascontiguousarray(host.transpose(np.argsort(spec.perm)).reshape(spec.hf_shape))


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_pretrained(model: Transformer, out_dir, tokenizer=None, max_shard_size="5GB") -> None:
    """Write config.json + safetensors (+ index when sharded) that `transformers` loads to the same logits.

    Tensors are gathered one at a time and written shard by shard, so host memory stays about one shard.
    Works for both layer layouts (python loop and scanned stack). Only process 0 writes.
    """
    out_dir = os.fspath(out_dir)
    config = model.config
    params = _model_params(model)
    if any(isinstance(v, nnx.LoRAParam) for v in params.values()):
        raise ValueError(
            "save_pretrained writes base weights only: merge the adapters first (jdpo.models.lora)"
        )
    L = config.num_layers
    entries = []  # (hf_key, fetch) in table order
    for spec in weight_table(config):
        for model_path, keys in _targets(spec, L, model.options.scan_layers):
            var = params[model_path]
            for key, index in _flat_keys(keys):
                fetch = lambda s=spec, v=var, ix=index: _to_hf_layout(v.get_value()[ix], s)  # noqa: E731
                entries.append((key, fetch))
    dtype = np.dtype(jnp.dtype(model.embed_tokens.embedding.get_value().dtype))
    sizes = {}
    for spec in weight_table(config):
        for key, _ in _flat_keys([keys for _, keys in _targets(spec, L, False)]):
            sizes[key] = math.prod(spec.hf_shape) * dtype.itemsize
    limit = _parse_size(max_shard_size)
    shards: list[list] = [[]]
    current = 0
    for key, fetch in entries:
        if shards[-1] and current + sizes[key] > limit:
            shards.append([])
            current = 0
        shards[-1].append((key, fetch))
        current += sizes[key]
    if jax.process_index() != 0:
        for shard in shards:  # other processes still take part in the gathers
            for _, fetch in shard:
                fetch()
        return
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # a previous export's shards would otherwise mix with this one's
        if name == INDEX_FILE or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name):
            os.remove(os.path.join(out_dir, name))
    weight_map = {}
    for n, shard in enumerate(shards):
        name = (
            "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        save_file(
            {key: fetch() for key, fetch in shard}, os.path.join(out_dir, name), metadata={"format": "pt"}
        )
        weight_map.update({key: name for key, _ in shard})
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2
            )
    hf = config.to_hf()
    hf["dtype"] = str(dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        _drop_dangling_auto_map(os.path.join(out_dir, "tokenizer_config.json"))


def _drop_dangling_auto_map(path: str) -> None:
    """Remove the `auto_map` entries of a written tokenizer_config.json whose code is not beside it.

    A tokenizer loaded from a checkpoint with custom code keeps the checkpoint's `auto_map` ("module.Class"
    per auto class) and writes it back, but the export does not copy the module's .py file: the entry
    would send `transformers` (with trust_remote_code) looking for a file that is not there. Entries
    naming a hub repository ("org/repo--module.Class") are kept; they do not depend on the directory.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return

    def present(ref) -> bool:
        if not isinstance(ref, str):  # None: no class of that kind (slow / fast tokenizer pairs)
            return True
        module = ref.rsplit(".", 1)[0]
        return "--" in module or os.path.exists(os.path.join(os.path.dirname(path), module + ".py"))

    kept = {}
    for auto_class, refs in auto_map.items():
        refs_list = refs if isinstance(refs, list) else [refs]
        if all(present(r) for r in refs_list) and any(isinstance(r, str) for r in refs_list):
            kept[auto_class] = refs
    if kept == auto_map:
        return
    if kept:
        config["auto_map"] = kept
    else:
        del config["auto_map"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
