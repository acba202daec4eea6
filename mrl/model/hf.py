"""Hugging Face Llama-family weights (Llama, Mistral, Qwen2, Qwen3; Qwen3-MoE and Mixtral with
``mrl.model.hf_moe``) into mrl's Megatron-Core GPTModel.

A Hugging Face model directory holds ``config.json`` and safetensors files (one file, or several
named by ``model.safetensors.index.json``). The mapping, per layer ``i`` (HF names under
``model.layers.{i}.``, Megatron names under ``decoder.layers.{i}.``)::

    input_layernorm.weight               -> self_attention.linear_qkv.layer_norm_weight
    self_attn.{q,k,v}_proj.{weight,bias} -> self_attention.linear_qkv.{weight,bias}
                                            rows per query group g: [q heads of g; k_g; v_g]
    self_attn.o_proj.weight              -> self_attention.linear_proj.weight
    self_attn.{q,k}_norm.weight          -> self_attention.{q,k}_layernorm.weight   (Qwen3)
    post_attention_layernorm.weight      -> mlp.linear_fc1.layer_norm_weight
    mlp.{gate,up}_proj.weight            -> mlp.linear_fc1.weight = [gate; up]       (SwiGLU)
    mlp.down_proj.weight                 -> mlp.linear_fc2.weight

and ``model.embed_tokens.weight`` -> ``embedding.word_embeddings.weight``, ``model.norm.weight`` ->
``decoder.final_layernorm.weight``, ``lm_head.weight`` (the embedding when tied) ->
``output_layer.weight``; vocabulary rows beyond the true vocabulary (Megatron's padding) are zero.
Heads are ``model.kv_channels`` wide: Qwen3's ``head_dim`` (128 at every size) need not be
hidden_size / num_attention_heads, and becomes ``model.head_dim`` when it is not (export writes it
back). Both RoPE conventions agree (rotate-half, not interleaved). Each rank finds the slices it holds in
Megatron's sharded state dict (global layer numbers and offsets) and reads just the tensors those
slices need from the memory-mapped files, so every TP/PP/VPP layout loads the same model. A value
head has no Hugging Face counterpart and keeps its initialisation.

Export runs the mapping backwards (``hf_state_dict``, ``hf_config``): the model is loaded at
TP=PP=1 in one process (Megatron's checkpoints reshard), so every tensor is whole there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mrl.model import hf_moe
from mrl.model.config import ModelConfig
from mrl.model.init import sharded_tensors

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", *hf_moe.MOE_MODEL_TYPES)
_INDEX = "model.safetensors.index.json"
# Per-layer tensors that map one to one (Megatron key -> HF name under model.layers.{i}.).
_SIMPLE = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "decoder.layers.self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "decoder.layers.self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "decoder.layers.self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "decoder.layers.mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
_QKV = ("decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.self_attention.linear_qkv.bias")


class HFCheckpointError(ValueError):
    """A Hugging Face model directory that mrl cannot load (missing files, tensors or support)."""


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory with ``config.json`` and safetensors weights (as opposed to an mrl checkpoint)."""
    root = Path(path)
    return (root / "config.json").is_file() and ((root / _INDEX).is_file() or any(root.glob("*.safetensors")))


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model directory, checked to be a supported architecture."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HFCheckpointError(f"cannot read {file}: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(
            f"{file}: model_type {model_type!r} is not supported; mrl loads {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    scaling = config.get("rope_scaling")
    if scaling and _llama3_scaling_factor(scaling) is None:
        raise HFCheckpointError(
            f"{file}: rope_scaling {scaling!r} is not supported; mrl has Llama 3.1's (rope_type llama3 with "
            f"low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192)"
        )
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias", False):
        raise HFCheckpointError(f"{file}: mrl loads SwiGLU MLPs without biases (hidden_act silu, mlp_bias false)")
    return config


def _llama3_scaling_factor(scaling: dict[str, Any]) -> float | None:
    """The factor of a Llama-3.1 ``rope_scaling`` that Megatron-Core implements, else None."""
    kind = scaling.get("rope_type", scaling.get("type"))
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind != "llama3" or any(scaling.get(key) != value for key, value in fixed.items()):
        return None
    return float(scaling["factor"])


def model_fields_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """The ``model:`` settings that reproduce a Hugging Face architecture (``read_hf_config``'s output)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads == config["hidden_size"]:
        head_dim = None  # the default width: the model block leaves it out
    qkv_bias = config["model_type"] == "qwen2" or bool(config.get("attention_bias", False))
    moe = hf_moe.moe_fields_from_hf(config) if config["model_type"] in hf_moe.MOE_MODEL_TYPES else {}
    return {
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": config.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "ffn_hidden_size": config["intermediate_size"],
        "vocab_size": config["vocab_size"],
        "position_embedding": "rope",
        "rotary_base": int(config.get("rope_theta", 10000)),
        "rope_scaling_factor": _llama3_scaling_factor(config["rope_scaling"]) if config.get("rope_scaling") else None,
        "normalization": "RMSNorm",
        "norm_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "activation": "swiglu",
        "add_bias_linear": False,
        "add_qkv_bias": qkv_bias,
        "qk_layernorm": config["model_type"] in ("qwen3", "qwen3_moe"),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "num_experts": None,
        **moe,
    }


def check_model_matches_hf(model: ModelConfig, path: str | Path) -> None:
    """Raise ``ValueError`` listing every ``model.*`` field that differs from the checkpoint's."""
    config = read_hf_config(path)
    expected = model_fields_from_hf(config)
    mismatches = [f"model.{name}={_effective(model, name)!r} (checkpoint: {value!r})"
                  for name, value in expected.items() if _effective(model, name) != value]
    if model.max_sequence_length > config.get("max_position_embeddings", model.max_sequence_length):
        mismatches.append(f"model.max_sequence_length={model.max_sequence_length} (checkpoint: at most "
                          f"{config['max_position_embeddings']})")
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and window < model.max_sequence_length:
        mismatches.append(f"model.max_sequence_length={model.max_sequence_length} (checkpoint: sliding-window "
                          f"attention over {window} tokens, which mrl does not model; train at most {window})")
    if mismatches:
        raise ValueError(f"the model does not match the Hugging Face checkpoint {path}: " + "; ".join(mismatches)
                         + ". `python tools/hf_model_config.py DIR` prints the matching model settings")


def _effective(model: ModelConfig, name: str) -> Any:
    if name == "num_query_groups":
        return model.num_query_groups or model.num_attention_heads
    if name == "head_dim":  # null and hidden_size / heads are the same width
        return None if model.kv_channels * model.num_attention_heads == model.hidden_size else model.kv_channels
    if name == "ffn_hidden_size":
        return model.ffn_size
    if name == "moe_ffn_hidden_size":
        return model.moe_ffn_size if model.is_moe else None
    if name == "moe_layer_freq":
        pattern = model.moe_layer_pattern()
        return 1 if all(pattern) else pattern
    return getattr(model, name)


class SafetensorsReader:
    """Tensors of a Hugging Face directory by name, read lazily from memory-mapped safetensors."""

    def __init__(self, path: str | Path) -> None:
        try:
            from safetensors import safe_open
        except ImportError as exc:
            raise ImportError(
                f"loading the Hugging Face weights at {path} needs the 'safetensors' package: "
                "pip install 'mrl[hf]'"
            ) from exc
        self._safe_open = safe_open
        self.root = Path(path)
        index = self.root / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {}
            for file in sorted(self.root.glob("*.safetensors")):
                with self._safe_open(str(file), framework="pt") as f:
                    weight_map.update({name: file.name for name in f.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._files: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a matrix, read without loading the rest of it."""
        rows = self._file(name).get_slice(name)[start:stop]
        return rows if torch.is_tensor(rows) else torch.as_tensor(rows)

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def _file(self, name: str):
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.root}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        if file not in self._files:
            path = self.root / file
            if not path.is_file():
                raise HFCheckpointError(f"{path} (named by {_INDEX} for {name!r}) does not exist")
            self._files[file] = self._safe_open(str(path), framework="pt")
        return self._files[file]


@torch.no_grad()
def load_hf_weights_(chunks: list, path: str | Path, model: ModelConfig) -> int:
    """Copy a Hugging Face checkpoint into this rank's model ``chunks``; return the tensors filled."""
    check_model_matches_hf(model, path)
    model_type = read_hf_config(path)["model_type"]
    reader = SafetensorsReader(path)
    filled = 0
    last: tuple[tuple, torch.Tensor] | None = None  # SwiGLU's fc1 comes as two shards
    for sharded in sharded_tensors(chunks):
        if sharded.key.startswith("value_head."):
            continue
        key, layer, expert, _, index = hf_moe.locate(sharded)
        if key in _VOCAB_KEYS:  # [V/tp, h]: read just this shard's rows of a large matrix
            sharded.data.copy_(_vocab_rows(key, reader, model, index[0].start, index[0].stop))
        else:
            if last is None or last[0] != (key, layer, expert):
                whole = hf_moe.megatron_moe_tensor(key, layer, expert, reader, model_type) if hf_moe.is_moe_key(key) \
                    else _megatron_tensor(key, layer, reader, model)
                last = ((key, layer, expert), whole)
            sharded.data.copy_(last[1][index])
        filled += 1
    return filled


def _vocab_rows(key: str, reader: "SafetensorsReader", model: ModelConfig, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the padded embedding or output matrix; rows past the vocabulary are 0."""
    name = "model.embed_tokens.weight"
    if key == "output_layer.weight" and not model.tie_embeddings and "lm_head.weight" in reader:
        name = "lm_head.weight"
    total = reader.shape(name)[0]
    if total != model.vocab_size:
        raise HFCheckpointError(f"{reader.root}: {name} has {total} rows but the vocabulary is {model.vocab_size}")
    rows = reader.get_rows(name, min(start, total), min(stop, total))  # [n, h]
    return torch.cat([rows, rows.new_zeros(stop - start - rows.shape[0], *rows.shape[1:])])


def _placement(sharded) -> tuple[int | None, tuple[int, ...], tuple[slice, ...]]:
    """(global layer number or None, the whole tensor's shape, this shard's slice of it)."""
    skip = sharded.prepend_axis_num  # layers: the layer number is a prepended axis
    layer = sharded.global_offset[0] if skip else None
    index = tuple(slice(o, o + n) for o, n in zip(sharded.global_offset[skip:], sharded.data.shape))
    return layer, tuple(sharded.global_shape[skip:]), index


def _megatron_tensor(key: str, layer: int | None, reader: SafetensorsReader, model: ModelConfig) -> torch.Tensor:
    """The whole (unsharded) Megatron tensor ``key`` of ``layer`` (not the vocabulary matrices)."""
    if key == "decoder.final_layernorm.weight":
        return reader.get("model.norm.weight")
    prefix = f"model.layers.{layer}."
    if key in _SIMPLE:
        return reader.get(prefix + _SIMPLE[key])
    if key == "decoder.layers.mlp.linear_fc1.weight":
        return torch.cat([reader.get(prefix + "mlp.gate_proj.weight"), reader.get(prefix + "mlp.up_proj.weight")])
    if key in _QKV:
        suffix = key.rsplit(".", 1)[1]
        q, k, v = (reader.get(f"{prefix}self_attn.{p}_proj.{suffix}") for p in "qkv")
        return _interleave_qkv(q, k, v, model)
    raise HFCheckpointError(f"no Hugging Face counterpart for the model's tensor {key!r}")


def hf_config(model: ModelConfig, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """A ``config.json`` for ``model``: qwen3 with qk-norm, qwen2 with q/k/v biases, else llama."""
    if (model.position_embedding, model.normalization, model.activation) != ("rope", "RMSNorm", "swiglu") \
            or model.add_bias_linear:
        raise HFCheckpointError(
            "Hugging Face export covers the Llama family: model.position_embedding rope, normalization "
            "RMSNorm, activation swiglu, add_bias_linear false"
        )
    model_type = "qwen3" if model.qk_layernorm else "qwen2" if model.add_qkv_bias else "llama"
    if model_type == "qwen3" and model.add_qkv_bias:
        raise HFCheckpointError("no Llama-family architecture has both qk-norm and q/k/v biases")
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    heads = model.num_attention_heads
    try:
        moe = hf_moe.moe_hf_config(model) if model.is_moe else {}
    except hf_moe.HFMoEError as exc:
        raise HFCheckpointError(str(exc)) from exc
    return {
        "architectures": [architecture[model_type]],
        "model_type": model_type,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups or heads,
        "head_dim": model.kv_channels,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_sequence_length,
        "rope_theta": float(model.rotary_base),
        "rope_scaling": None if model.rope_scaling_factor is None else {
            "rope_type": "llama3", "factor": model.rope_scaling_factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "rms_norm_eps": model.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": model.add_qkv_bias,
        "torch_dtype": dtype,
        **moe,
    }


@torch.no_grad()
def hf_state_dict(chunks: list, model: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors of a model whose ``chunks`` hold every tensor whole (TP=PP=1)."""
    whole: dict[tuple[str, int | None, int | None], torch.Tensor] = {}
    for sharded in sharded_tensors(chunks):
        if sharded.key.startswith("value_head."):
            continue
        key, layer, expert, shape, index = hf_moe.locate(sharded)
        target = whole.setdefault((key, layer, expert), sharded.data.new_zeros(shape))
        target[index] = sharded.data  # SwiGLU's fc1 arrives as two halves
    model_type = hf_config(model)["model_type"]
    out: dict[str, torch.Tensor] = {}
    for (key, layer, expert), tensor in whole.items():
        if hf_moe.is_moe_key(key):
            out.update(hf_moe.hf_moe_tensors(key, layer, expert, tensor, model_type))
        else:
            out.update(_hf_tensors(key, layer, tensor, model))
    return {name: tensor.contiguous() for name, tensor in out.items()}


def _hf_tensors(key: str, layer: int | None, tensor: torch.Tensor, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors that the whole Megatron tensor ``key`` of ``layer`` holds."""
    vocab = model.vocab_size
    if key == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": tensor[:vocab]}
    if key == "output_layer.weight":
        return {} if model.tie_embeddings else {"lm_head.weight": tensor[:vocab]}
    if key == "decoder.final_layernorm.weight":
        return {"model.norm.weight": tensor}
    prefix = f"model.layers.{layer}."
    if key in _SIMPLE:
        return {prefix + _SIMPLE[key]: tensor}
    if key == "decoder.layers.mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2)
        return {prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up}
    if key in _QKV:
        suffix = key.rsplit(".", 1)[1]
        q, k, v = _split_qkv(tensor, model)
        return {f"{prefix}self_attn.{name}_proj.{suffix}": x for name, x in zip("qkv", (q, k, v))}
    raise HFCheckpointError(f"no Hugging Face counterpart for the model's tensor {key!r}")


def _split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``_interleave_qkv``."""
    groups = model.num_query_groups or model.num_attention_heads
    head_dim = model.kv_channels
    tail = qkv.shape[1:]
    per_group = qkv.reshape(groups, -1, *tail)  # [g, (q_per_group + 2)·d, ...]
    q, k, v = per_group.split([per_group.shape[1] - 2 * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Megatron's fused QKV rows: for each query group, its query heads, then its key, then its value."""
    groups = model.num_query_groups or model.num_attention_heads
    head_dim = model.kv_channels
    tail = q.shape[1:]  # (h,) for weights, () for biases
    q = q.reshape(groups, -1, *tail)  # [g, q_per_group·d, ...]
    k = k.reshape(groups, head_dim, *tail)  # [g, d, ...]
    v = v.reshape(groups, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)  # [(heads + 2g)·d, ...]
