"""Layout-invariant weight initialisation.

Megatron draws initial weights from RNG streams whose position depends on which layers a rank
builds, so the same seed gives different models at PP=1 and PP=2. mrl re-draws every weight
matrix from its *global* identity instead: Megatron's sharded state dict names each parameter
globally (the layer number, pipeline offset included, is a prepended axis of a key shared by all
layers) and gives the slice this rank holds. Rows of
the global matrix are drawn in fixed blocks, each from a generator seeded by
``(seed, parameter key, block index)``, and a rank draws only the blocks its slice touches. The
same seed therefore yields bit-identical weights at every TP/PP/VPP layout.

Distributions follow Megatron's: ``N(0, σ)`` for weight matrices, ``N(0, σ/√(2L))`` for the
output projections of attention and MLP (``linear_proj``, ``linear_fc2``); vectors (norm
weights, biases) keep Megatron's deterministic initialisation (ones/zeros).
"""

from __future__ import annotations

import math
import zlib

import torch

_ROWS_PER_BLOCK = 64
_SCALED_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def unwrap_ddp(chunk):
    """The module under Megatron's DDP wrapper (its keys carry no ``module.`` prefix)."""
    from megatron.core.distributed import DistributedDataParallel

    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def sharded_tensors(chunks):
    """This rank's ShardedTensors of ``chunks`` (global key, shape, offset; ``data`` views the parameter)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    for chunk in chunks:
        state = unwrap_ddp(chunk).sharded_state_dict()
        apply_factories(state)
        for value in nested_values(state):
            if isinstance(value, ShardedTensor) and value.data is not None:
                yield value


@torch.no_grad()
def layout_invariant_init_(chunks, seed: int, std: float, num_layers: int) -> int:
    """Re-initialise every weight matrix of ``chunks`` in place; return how many were drawn."""
    drawn = 0
    for sharded in sharded_tensors(chunks):
        data = sharded.data
        if data.dim() != 2 or not data.is_floating_point():
            continue
        scale = std / math.sqrt(2.0 * num_layers) if sharded.key.endswith(_SCALED_SUFFIXES) else std
        skip = sharded.prepend_axis_num
        # Layers share one key with the layer number as a prepended axis: it joins the identity,
        # or every layer would start from the same weights.
        key = sharded.key + "".join(f"[{i}]" for i in sharded.global_offset[:skip])
        row0, col0 = sharded.global_offset[skip:]
        _fill_rows(data, key, seed, scale, row0, col0, sharded.global_shape[skip + 1])
        drawn += 1
    return drawn


def _fill_rows(data, key: str, seed: int, std: float, row0: int, col0: int, global_cols: int) -> None:
    """Fill ``data`` (global rows row0…, columns col0…) from the per-block row generators."""
    rows, cols = data.shape
    key_seed = zlib.crc32(key.encode()) * 1_000_003 + seed
    first_block, last_block = row0 // _ROWS_PER_BLOCK, (row0 + rows - 1) // _ROWS_PER_BLOCK
    for block in range(first_block, last_block + 1):
        generator = torch.Generator(device=data.device).manual_seed((key_seed + block * 7919) % (2**63))
        values = torch.randn(_ROWS_PER_BLOCK, global_cols, generator=generator, device=data.device,
                             dtype=torch.float32)
        start = max(row0, block * _ROWS_PER_BLOCK)
        stop = min(row0 + rows, (block + 1) * _ROWS_PER_BLOCK)
        local = values[start - block * _ROWS_PER_BLOCK: stop - block * _ROWS_PER_BLOCK, col0: col0 + cols]
        data[start - row0: stop - row0].copy_(local.mul_(std))
