"""Model FLOPs utilisation (MFU) on GPUs.

Training FLOPs per processed token of a dense decoder (forward + backward = 3 × forward):
    6·N  (every parameter is used in one multiply-add forward, two backward)
  + 12·L·S·a  (attention scores and their weighted sum: 2 matmuls of S·a per layer, ×2 FLOPs, ×3)
with N the parameter count, L layers, S the sequence length, a = heads·head_dim the attention
width (the hidden size unless model.head_dim sets the heads apart, as Qwen3 does). MFU divides the
step's FLOPs by the wall time and by the peak dense BF16 rate of every GPU in the job.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# Dense BF16 tensor-core peaks (TFLOP/s), by substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "B200": 2250.0, "GB200": 2500.0}


def peak_flops_per_gpu() -> float | None:
    """The device's peak in FLOP/s (``MRL_PEAK_TFLOPS`` overrides), or None when unknown/CPU."""
    if "MRL_PEAK_TFLOPS" in os.environ:
        return float(os.environ["MRL_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def count_parameters(chunks: list, layout) -> int:
    """Parameters of the whole model (each TP shard and pipeline stage counted once)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    local = sum(p.numel() for chunk in chunks for p in chunk.parameters()
                if param_is_not_tensor_parallel_duplicate(p))
    total = torch.tensor([local], dtype=torch.float64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total, group=layout.groups.mp)
    return int(total.item())


def attention_width(model) -> int:
    """heads·head_dim of a ``ModelConfig``: the width the attention scores and values are computed in."""
    return model.num_attention_heads * model.kv_channels


def training_flops(num_params: int, num_layers: int, attention: int, seq_length: int, tokens: int) -> float:
    """FLOPs of one optimizer step over ``tokens`` processed tokens; ``attention`` is heads·head_dim
    (``attention_width``; the module docstring has the formula)."""
    return tokens * (6.0 * num_params + 12.0 * num_layers * seq_length * attention)
