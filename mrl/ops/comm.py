"""Tensor-parallel collectives used by the vocab-parallel ops. ``group=None`` means no TP."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, group) -> torch.Tensor:
    """In-place all-reduce over ``group``; the identity without one."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the shards of ``group`` along the last dimension (no autograd)."""
    world = group_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
