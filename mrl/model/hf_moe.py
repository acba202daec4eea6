"""Hugging Face Mixture-of-Experts architectures (Qwen3-MoE, Mixtral) <-> mrl's MoE model.

The attention and norms map as in ``mrl.model.hf``; the MoE block of layer ``i`` maps as::

    Qwen3-MoE (model.layers.{i}.mlp.)          Mixtral (model.layers.{i}.block_sparse_moe.)
    gate.weight                                gate.weight                -> mlp.router.weight [E, h]
    experts.{e}.{gate,up}_proj.weight          experts.{e}.{w1,w3}.weight -> expert e's linear_fc1 = [gate; up]
    experts.{e}.down_proj.weight               experts.{e}.w2.weight      -> expert e's linear_fc2

Routing: Qwen3-MoE takes the softmax over all experts, keeps the top k and renormalises them when
``norm_topk_prob`` (= Megatron's softmax over the k selected logits, mrl's default) or not (=
``model.moe_router_pre_softmax``); Mixtral takes the softmax over the k selected logits. Qwen3-MoE's
dense layers (``mlp_only_layers``, ``decoder_sparse_step``) become ``model.moe_layer_freq``.
Megatron names MoE models' tensors per layer (``decoder.layers.{i}.…``) and the experts by their
global index (a prepended axis), so every EP/TP/PP layout finds the same Hugging Face tensors.
"""

from __future__ import annotations

import re
from typing import Any

import torch

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_KEYS = ("decoder.layers.mlp.experts.experts.linear_fc1.weight",
                "decoder.layers.mlp.experts.experts.linear_fc2.weight")
_ROUTER = "decoder.layers.mlp.router.weight"


class HFMoEError(ValueError):
    """A MoE checkpoint or model mrl cannot map."""


def moe_fields_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """The MoE ``model:`` settings of a Qwen3-MoE or Mixtral ``config.json``."""
    layers = config["num_hidden_layers"]
    if config["model_type"] == "mixtral":
        return {"num_experts": config["num_local_experts"], "moe_topk": config["num_experts_per_tok"],
                "moe_ffn_hidden_size": config["intermediate_size"], "moe_router_pre_softmax": False,
                "moe_layer_freq": 1, "moe_shared_expert_size": None}
    if config.get("shared_expert_intermediate_size"):
        raise HFMoEError("Qwen3-MoE with a shared expert is not supported")
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    return {"num_experts": config["num_experts"], "moe_topk": config["num_experts_per_tok"],
            "moe_ffn_hidden_size": config["moe_intermediate_size"],
            "moe_router_pre_softmax": not config.get("norm_topk_prob", True),
            "moe_layer_freq": 1 if all(pattern) else pattern, "moe_shared_expert_size": None}


def moe_hf_config(model) -> dict[str, Any]:
    """The MoE part of an exported ``config.json``: Qwen3-MoE with qk-norm, else Mixtral."""
    if model.moe_shared_expert_size is not None:
        raise HFMoEError("Hugging Face export of shared experts is not supported (Qwen3-MoE and Mixtral have none)")
    if model.moe_router_score_function != "softmax" or model.moe_router_topk_scaling_factor is not None \
            or model.moe_expert_bias:
        raise HFMoEError("Hugging Face export covers softmax routers without top-k scaling or expert bias")
    pattern = model.moe_layer_pattern()
    if not model.qk_layernorm:
        if not all(pattern) or model.moe_router_pre_softmax or model.add_qkv_bias:
            raise HFMoEError("a Mixtral export needs every layer MoE, post-top-k softmax and no q/k/v biases")
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "intermediate_size": model.moe_ffn_size, "num_local_experts": model.num_experts,
                "num_experts_per_tok": model.moe_topk, "router_aux_loss_coef": model.moe_aux_loss_coeff,
                "sliding_window": None}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "intermediate_size": model.ffn_size, "moe_intermediate_size": model.moe_ffn_size,
            "num_experts": model.num_experts, "num_experts_per_tok": model.moe_topk,
            "norm_topk_prob": not model.moe_router_pre_softmax, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
            "router_aux_loss_coef": model.moe_aux_loss_coeff}


def locate(sharded) -> tuple[str, int | None, int | None, tuple[int, ...], tuple[slice, ...]]:
    """(key without the layer number, layer, global expert index, whole shape, this shard's slice)."""
    match = _LAYER_KEY.match(sharded.key)
    skip = sharded.prepend_axis_num
    if match is None:  # layers stacked on a prepended axis (dense models), or no layer at all
        key, layer, expert = sharded.key, (sharded.global_offset[0] if skip else None), None
    else:
        key, layer = f"decoder.layers.{match.group(2)}", int(match.group(1))
        expert = sharded.global_offset[0] if skip else None
    index = tuple(slice(o, o + n) for o, n in zip(sharded.global_offset[skip:], sharded.data.shape))
    return key, layer, expert, tuple(sharded.global_shape[skip:]), index


def _prefix(model_type: str, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if model_type == "mixtral" else "mlp.")


def _expert_names(model_type: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def is_moe_key(key: str) -> bool:
    return key == _ROUTER or key in _EXPERT_KEYS


def megatron_moe_tensor(key: str, layer: int, expert: int | None, reader, model_type: str) -> torch.Tensor:
    """The whole Megatron tensor of the router or of one expert, from the Hugging Face tensors."""
    prefix = _prefix(model_type, layer)
    if key == _ROUTER:
        return reader.get(prefix + "gate.weight")
    gate, up, down = _expert_names(model_type)
    expert_prefix = f"{prefix}experts.{expert}."
    if key == _EXPERT_KEYS[0]:
        return torch.cat([reader.get(f"{expert_prefix}{gate}.weight"), reader.get(f"{expert_prefix}{up}.weight")])
    return reader.get(f"{expert_prefix}{down}.weight")


def hf_moe_tensors(key: str, layer: int, expert: int | None, tensor: torch.Tensor,
                   model_type: str) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors a whole router or expert tensor holds."""
    prefix = _prefix(model_type, layer)
    if key == _ROUTER:
        return {prefix + "gate.weight": tensor}
    gate, up, down = _expert_names(model_type)
    expert_prefix = f"{prefix}experts.{expert}."
    if key == _EXPERT_KEYS[0]:
        first, second = tensor.chunk(2)
        return {f"{expert_prefix}{gate}.weight": first, f"{expert_prefix}{up}.weight": second}
    return {f"{expert_prefix}{down}.weight": tensor}
