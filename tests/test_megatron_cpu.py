"""The real Megatron-Core stack on CPU/gloo: GPTModel, schedules, DDP + distributed optimizer.

Every case runs inside a shared pool of 4 (or 2) gloo ranks and builds its own parallel layout.
"""

from __future__ import annotations

import functools

import pytest
import torch

from mrl.model.config import ModelConfig, PrecisionConfig
from mrl.parallel.layout import ParallelConfig

TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, max_sequence_length=32)
B, S = 2, 32


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


def _setup(parallel: ParallelConfig, model: ModelConfig = TINY):
    from mrl.model.builder import build_model
    from mrl.parallel.layout import ParallelLayout

    layout = ParallelLayout.initialize(parallel, timeout_minutes=2)
    layout.seed(1234)
    chunks = build_model(model, PrecisionConfig(), layout, "cpu")
    return layout, chunks


def _batch_inputs(tokens):
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool), diagonal=1)
    return pos, mask


def _gather_vocab(layout, shard):
    from mrl.ops.comm import all_gather_last_dim

    return all_gather_last_dim(shard, layout.tp_group)


def _ce_loss(layout, labels, output):
    """Mean token cross-entropy over vocab-sharded logits [b, s, V/tp] (Megatron's own op)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    loss = vocab_parallel_cross_entropy(output.clone(), labels).mean()
    return loss, {"loss": loss.detach().clone()}


def _run_schedule(layout, chunks, batches, forward_only: bool, capture=None):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        pos, mask = _batch_inputs(tokens)
        output = model(tokens, pos, mask)
        if capture is not None and not isinstance(output, tuple) and output.dim() == 3 and output.shape[0] == B:
            capture.append(output.detach().clone())
        return output, functools.partial(_ce_loss, layout, torch.roll(tokens, -1, 1))

    iterators = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=chunks,
        num_microbatches=len(batches), seq_length=S, micro_batch_size=B, forward_only=forward_only,
    )


# ---- cases (run on every rank) -------------------------------------------------------------------

def case_logits(parallel: ParallelConfig):
    layout, chunks = _setup(parallel)
    captured: list[torch.Tensor] = []
    with torch.no_grad():
        _run_schedule(layout, chunks, [_tokens(7)], forward_only=True, capture=captured)
    if not layout.is_last_stage:
        return None
    return _gather_vocab(layout, captured[0])


def _grad_norm(layout, chunks) -> float:
    """Global L2 norm of the gradients, counting each distinct parameter once."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    import torch.distributed as dist

    total = torch.zeros(1, dtype=torch.float64)
    for chunk in chunks:
        for param in chunk.parameters():
            if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                total += param.grad.double().pow(2).sum()
    dist.all_reduce(total, group=layout.groups.mp)
    return float(total.sqrt())


def case_one_step(parallel: ParallelConfig):
    layout, chunks = _setup(parallel)
    for chunk in chunks:
        chunk.config.finalize_model_grads_func = None
    losses = _run_schedule(layout, chunks, [_tokens(11), _tokens(12)], forward_only=False)
    loss = sum(float(d["loss"]) for d in losses) / 2 if losses else None
    return {"loss": loss, "grad_norm": _grad_norm(layout, chunks)}


def case_ddp_step(parallel: ParallelConfig, batches_per_rank: int):
    """One DDP + distributed-optimizer step; DP rank r takes global micro-batches r·k … r·k+k-1."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    layout, chunks = _setup(parallel)
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c, pg_collection=layout.groups)
              for c in chunks]
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0, use_distributed_optimizer=True),
        chunks, use_gloo_process_groups=False,
    )
    first = layout.dp_rank * batches_per_rank
    batches = [_tokens(100 + i) for i in range(first, first + batches_per_rank)]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    _run_schedule(layout, chunks, batches, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    params = torch.cat([p.detach().reshape(-1) for c in chunks for p in c.parameters()])
    return {"ok": ok, "grad_norm": float(grad_norm), "params": params, "dp_rank": layout.dp_rank,
            "tp_rank": layout.tp_rank}


# ---- tests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_logits(ranks4):
    return ranks4.run(case_logits, ParallelConfig(tp=1))[0]


@pytest.mark.parametrize("parallel", [ParallelConfig(tp=2), ParallelConfig(tp=2, pp=2),
                                      ParallelConfig(tp=2, sequence_parallel=True)], ids=str)
def test_logits_match_tp1(ranks4, reference_logits, parallel):
    results = ranks4.run(case_logits, parallel)
    last = [r for r in results if r is not None]
    assert last, "no rank returned logits"
    for logits in last:
        assert logits.shape == reference_logits.shape == (B, S, 256)
        assert torch.allclose(logits, reference_logits, atol=1e-5, rtol=0), \
            (logits - reference_logits).abs().max()


def test_one_step_same_loss_and_grad_norm(ranks4):
    reference = ranks4.run(case_one_step, ParallelConfig(tp=1))[0]
    assert 5.0 < reference["loss"] < 6.0  # ~ln(256) for a freshly initialised model
    for parallel in (ParallelConfig(tp=2), ParallelConfig(tp=2, pp=2)):
        results = ranks4.run(case_one_step, parallel)
        losses = [r["loss"] for r in results if r["loss"] is not None]
        assert losses and all(abs(x - reference["loss"]) <= 1e-5 * reference["loss"] for x in losses)
        for r in results:
            assert abs(r["grad_norm"] - reference["grad_norm"]) <= 1e-5 * reference["grad_norm"]


def test_ddp_distributed_optimizer_matches_dp1(ranks2, ranks4):
    dp1 = ranks2.run(case_ddp_step, ParallelConfig(tp=2), batches_per_rank=2)
    dp2 = ranks4.run(case_ddp_step, ParallelConfig(tp=2), batches_per_rank=1)
    assert all(r["ok"] for r in dp1 + dp2)
    reference = dp1[0]["grad_norm"]
    for r in dp2:
        assert abs(r["grad_norm"] - reference) <= 1e-6 * reference
    for tp_rank in (0, 1):
        replicas = [r["params"] for r in dp2 if r["tp_rank"] == tp_rank]
        assert len(replicas) == 2 and torch.equal(replicas[0], replicas[1])
        single = next(r["params"] for r in dp1 if r["tp_rank"] == tp_rank)
        assert torch.allclose(replicas[0], single, atol=1e-6)


def case_initial_weights(parallel: ParallelConfig):
    """Each layer's weight matrices on this rank, by local parameter name, and their std."""
    layout, chunks = _setup(parallel, ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                                                  vocab_size=256, max_sequence_length=32))
    return {name: p.detach().clone() for chunk in chunks for name, p in chunk.named_parameters()
            if p.dim() == 2 and ".layers." in name}


def test_initial_weights_differ_per_layer_and_follow_megatron_scales(ranks2):
    weights = ranks2.run(case_initial_weights, ParallelConfig(tp=1))[0]
    by_kind: dict[str, list[torch.Tensor]] = {}
    for name, w in weights.items():
        by_kind.setdefault(name.split(".", 3)[3], []).append(w)  # decoder.layers.<i>.<kind>
    assert set(by_kind) == {"self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                            "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"}
    std = TINY.init_method_std
    for kind, layers in by_kind.items():
        assert len(layers) == 4
        for i in range(4):
            for j in range(i + 1, 4):
                assert not torch.allclose(layers[i], layers[j]), (kind, i, j)
        expected = std / (2 * 4) ** 0.5 if kind.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        measured = torch.stack(layers).std().item()
        assert abs(measured - expected) < 0.05 * expected, (kind, measured, expected)
