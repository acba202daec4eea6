"""Refit: the policy's Megatron TP/PP shards -> Hugging Face-named tensors, in buckets, at one rank.

Every rank of a data-parallel replica calls ``stream_hf_weights(chunks, model, layout, bucket_bytes,
sink)``; the replica's first rank (tp=pp=cp=0) passes a ``BucketSink`` (the engine's loader), the
others ``None``. Per pipeline stage:

  1. the stage's tensor-parallel ranks walk their ShardedTensors in the same order; a tensor that is
     split over TP is gathered whole at the stage's TP rank 0, one parameter at a time (replicated
     ones, the layer norms, are not sent at all);
  2. TP rank 0 turns each whole Megatron tensor into its Hugging Face tensors with the export
     mapping (``mrl.model.hf``: fused q/k/v split per query group with biases, SwiGLU's fc1 split
     into gate and up, vocabulary padding dropped, no ``lm_head`` when embeddings are tied) and
     packs them, cast to the engine's dtype, into a flat byte bucket of at most ``bucket_bytes``;
  3. a full bucket goes to the replica's first rank: stage 0 packs straight into the sink's buffer,
     the other stages send theirs point-to-point over the pipeline group (stage by stage), and the
     first rank receives straight into the sink's buffer; ``sink.push`` loads it and returns only
     when the buffer may be reused.

So a sending rank holds its own shards, one whole parameter and one bucket; the receiving rank
additionally holds the sink's one bucket. A tensor larger than a bucket travels alone.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from mrl.model.hf import _hf_tensors, _placement
from mrl.model.init import sharded_tensors

ALIGN = 64  # bytes; every tensor of a bucket starts at a multiple of this


@dataclass(frozen=True)
class Entry:
    """One tensor inside a bucket."""

    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # bytes from the bucket's start

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


class BucketSink(Protocol):
    """Where the replica's first rank puts the buckets (the engine's loader)."""

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A writable uint8 tensor of at least ``nbytes`` to hold the next bucket."""

    def push(self, entries: list[Entry], nbytes: int) -> None:
        """Load the bucket now in the buffer; return when the buffer may be overwritten."""


@dataclass
class RefitStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0


def unpack(buffer: torch.Tensor, entries: list[Entry]) -> dict[str, torch.Tensor]:
    """Views of the tensors of a bucket held in the uint8 ``buffer``."""
    out = {}
    for entry in entries:
        raw = buffer[entry.offset: entry.offset + entry.nbytes]
        out[entry.name] = raw.view(getattr(torch, entry.dtype)).view(entry.shape)
    return out


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _Packer:
    """Packs tensors into buckets; ``emit(buffer, entries, nbytes)`` is called for each full one."""

    def __init__(self, bucket_bytes: int, buffer_for, emit) -> None:
        self.bucket_bytes = bucket_bytes
        self.buffer_for = buffer_for  # nbytes -> uint8 tensor
        self.emit = emit
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.size = 0
        self.stats = RefitStats()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = _aligned(tensor.numel() * tensor.element_size())
        if self.pending and self.size + nbytes > self.bucket_bytes:
            self.flush()
        self.pending.append((name, tensor))
        self.size += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        buffer = self.buffer_for(self.size)
        entries, offset = [], 0
        for name, tensor in self.pending:
            flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
            buffer[offset: offset + flat.numel()].copy_(flat.cpu())
            entries.append(Entry(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
            offset += _aligned(flat.numel())
        self.emit(buffer, entries, offset)
        self.stats.tensors += len(entries)
        self.stats.bytes += offset
        self.stats.buckets += 1
        self.pending, self.size = [], 0


@torch.no_grad()
def _stage_hf_tensors(chunks: list, model, layout, dtype: torch.dtype):
    """This stage's Hugging Face tensors, whole, yielded at TP rank 0 (other TP ranks yield nothing)."""
    tp_root = dist.get_global_rank(layout.tp_group, 0)
    leader = layout.tp_rank == 0
    whole: dict[tuple[str, int | None], torch.Tensor] = {}
    seen: dict[tuple[str, int | None], set] = {}
    for sharded in sharded_tensors(chunks):
        if sharded.key.startswith("value_head.") or (
                # tied embeddings: the last stage's output layer is a synchronised copy of stage 0's
                sharded.key == "embedding.word_embeddings.weight" and layout.pp_rank != 0):
            continue
        layer, shape, index = _placement(sharded)
        data = sharded.data
        pieces = [(index, data)]
        if layout.tp > 1 and tuple(data.shape) != tuple(shape):  # split over TP: gather at TP rank 0
            offsets = torch.tensor([s.start for s in index], dtype=torch.long, device=data.device)
            all_offsets = [torch.empty_like(offsets) for _ in range(layout.tp)] if leader else None
            all_data = [torch.empty_like(data) for _ in range(layout.tp)] if leader else None
            dist.gather(offsets, all_offsets, dst=tp_root, group=layout.tp_group)
            dist.gather(data.contiguous(), all_data, dst=tp_root, group=layout.tp_group)
            if leader:
                pieces = [(tuple(slice(o, o + n) for o, n in zip(off.tolist(), part.shape)), part)
                          for off, part in zip(all_offsets, all_data)]
        if not leader:
            continue
        ident = (sharded.key, layer)
        target = whole.setdefault(ident, data.new_zeros(shape))
        done = seen.setdefault(ident, set())
        for piece_index, part in pieces:
            target[piece_index] = part
            done.add(tuple((s.start, s.stop) for s in piece_index))
        covered = sum(_numel(part) for part in done)
        if covered >= target.numel():  # every slice arrived (SwiGLU's fc1 comes as two halves)
            del whole[ident], seen[ident]
            for name, tensor in _hf_tensors(sharded.key, layer, target, model).items():
                yield name, tensor.to(dtype)
    if leader and whole:
        raise RuntimeError(f"refit: incomplete tensors after gathering: {sorted(k for k, _ in whole)}")


def _numel(slices: tuple[tuple[int, int], ...]) -> int:
    n = 1
    for start, stop in slices:
        n *= stop - start
    return n


def stream_hf_weights(chunks: list, model, layout, *, bucket_bytes: int, dtype: torch.dtype,
                      sink: BucketSink | None) -> RefitStats:
    """Stream the replica's weights as Hugging Face tensors to ``sink`` (module docstring).

    Every rank of the replica calls it; ``sink`` is given on the replica's first rank only.
    Returns what this rank packed (the first rank: everything it pushed).
    """
    is_root = layout.tp_rank == 0 and layout.pp_rank == 0
    if is_root != (sink is not None):
        raise ValueError("stream_hf_weights: the sink belongs to the replica's first rank (tp=pp=0) only")
    stats = RefitStats()
    if layout.tp_rank == 0 and layout.pp_rank == 0:
        packer = _Packer(bucket_bytes, sink.buffer, lambda buffer, entries, nbytes: sink.push(entries, nbytes))
        for name, tensor in _stage_hf_tensors(chunks, model, layout, dtype):
            packer.add(name, tensor)
        packer.flush()
        stats = packer.stats
        for stage in range(1, layout.pp):
            _receive_stage(layout, dist.get_global_rank(layout.pp_group, stage), sink, stats)
        return stats
    if layout.tp_rank == 0:  # another stage's TP rank 0: send to the first stage
        root = dist.get_global_rank(layout.pp_group, 0)
        local: dict[str, torch.Tensor] = {}

        def buffer_for(nbytes: int) -> torch.Tensor:
            if "b" not in local or local["b"].numel() < nbytes:
                local["b"] = torch.empty(max(nbytes, min(bucket_bytes, nbytes * 2)), dtype=torch.uint8)
            return local["b"]

        wire = _wire_device(layout.pp_group)

        def send(buffer: torch.Tensor, entries: list[Entry], nbytes: int) -> None:
            meta = torch.frombuffer(bytearray(pickle.dumps(entries)), dtype=torch.uint8)
            dist.send(torch.tensor([nbytes, meta.numel()], dtype=torch.long, device=wire), dst=root, group=layout.pp_group)
            dist.send(meta.to(wire), dst=root, group=layout.pp_group)
            dist.send(buffer[:nbytes].to(wire), dst=root, group=layout.pp_group)

        packer = _Packer(bucket_bytes, buffer_for, send)
        for name, tensor in _stage_hf_tensors(chunks, model, layout, dtype):
            packer.add(name, tensor)
        packer.flush()
        dist.send(torch.tensor([-1, 0], dtype=torch.long, device=wire), dst=root, group=layout.pp_group)
        return packer.stats
    for _ in _stage_hf_tensors(chunks, model, layout, dtype):  # other TP ranks: take part in the gathers
        pass
    return stats


def _wire_device(group) -> torch.device:
    """Where point-to-point tensors must live for ``group``'s backend (NCCL: this rank's GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _receive_stage(layout, source: int, sink: BucketSink, stats: RefitStats) -> None:
    wire = _wire_device(layout.pp_group)
    while True:
        header = torch.empty(2, dtype=torch.long, device=wire)
        dist.recv(header, src=source, group=layout.pp_group)
        nbytes, meta_len = header.tolist()
        if nbytes < 0:
            return
        meta = torch.empty(meta_len, dtype=torch.uint8, device=wire)
        dist.recv(meta, src=source, group=layout.pp_group)
        entries = pickle.loads(meta.cpu().numpy().tobytes())
        target = sink.buffer(nbytes)[:nbytes]
        if wire.type == "cpu":
            dist.recv(target, src=source, group=layout.pp_group)
        else:  # through the GPU (NCCL), then into the sink's host buffer
            staged = torch.empty(nbytes, dtype=torch.uint8, device=wire)
            dist.recv(staged, src=source, group=layout.pp_group)
            target.copy_(staged)
        sink.push(entries, nbytes)
        stats.tensors += len(entries)
        stats.bytes += nbytes
        stats.buckets += 1


class CollectingSink:
    """A ``BucketSink`` that keeps copies of the tensors (for tests and for a disk export)."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self.tensors: dict[str, torch.Tensor] = {}
        self.bucket_sizes: list[int] = []

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer

    def push(self, entries: list[Entry], nbytes: int) -> None:
        self.bucket_sizes.append(nbytes)
        for name, tensor in unpack(self._buffer, entries).items():
            if name in self.tensors:
                raise ValueError(f"refit: tensor {name} arrived twice")
            self.tensors[name] = tensor.clone()
