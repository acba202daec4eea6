"""Metrics with their own reductions, and the global counts, on one rank and across gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch

from mrl.losses import GlobalCounts, Metric, MetricsAccumulator, compute_global_counts, token_mask
from mrl.losses.metrics import masked_max, masked_min


def _rank_metrics(rank: int, micro: int) -> dict[str, Metric]:
    """Deterministic per-(rank, micro-batch) metrics used on both sides of the comparison."""
    base = float(10 * rank + micro)
    return {
        "frag": Metric.mean_fragment(torch.tensor(base / 7.0, dtype=torch.float64)),
        "tokens": Metric.count(torch.tensor(3 + rank + micro)),
        "lo": Metric.min(torch.tensor(base - 2.5)),
        "hi": Metric.max(torch.tensor(math.sin(base))),
        "empty_lo": Metric.min(torch.tensor(math.inf)),
    }


def _expected(ranks: int, micros: int) -> dict[str, float]:
    all_metrics = [_rank_metrics(r, m) for r in range(ranks) for m in range(micros)]
    return {
        "frag": sum(x["frag"].value.item() for x in all_metrics),
        "tokens": float(sum(x["tokens"].value.item() for x in all_metrics)),
        "lo": min(x["lo"].value.item() for x in all_metrics),
        "hi": max(x["hi"].value.item() for x in all_metrics),
        "empty_lo": math.nan,
    }


def _assert_metrics(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == sorted(want)
    for name, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, rel=1e-12), name


def test_metric_validation_and_combine():
    with pytest.raises(ValueError, match="reduction"):
        Metric(torch.tensor(1.0), "mean")
    with pytest.raises(ValueError, match="0-d"):
        Metric(torch.ones(2), "sum")
    with pytest.raises(ValueError, match="combine"):
        Metric.min(torch.tensor(1.0)).combine(Metric.max(torch.tensor(2.0)))
    x = torch.tensor([[3.0, -1.0, 5.0], [2.0, 7.0, 0.5]])
    m = torch.tensor([[1, 0, 1], [1, 0, 0]])
    assert masked_min(x, m).value.item() == 2.0 and masked_max(x, m).value.item() == 5.0
    assert masked_min(x, torch.zeros_like(m)).value.item() == math.inf
    assert masked_max(x[:0], m[:0]).value.item() == -math.inf


def test_accumulator_single_rank():
    acc = MetricsAccumulator()
    for micro in range(3):
        acc.add(_rank_metrics(0, micro))
    _assert_metrics(acc.reduce(None), _expected(1, 3))


def test_global_counts_single_rank():
    labels = torch.tensor([[-100, 4, 5, 6], [-100, -100, 1, 2], [3, 3, 3, 3], [7, 7, 7, 7]])
    loss_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]])
    batch = {"labels": labels, "loss_mask": loss_mask}
    mask = token_mask(batch)
    assert mask.tolist() == [[False, True, True, True], [False, False, False, False],
                             [False, False, False, False], [True, False, False, True]]
    counts = compute_global_counts([batch, {"labels": labels}], paired=True)
    # second micro-batch: no loss_mask, so every non-ignored label counts; its chosen rows 0 and 2
    # hold 3 + 4 valid tokens (the first micro-batch has no valid pair)
    assert counts == GlobalCounts(num_tokens=5 + 13, num_seqs=2 + 4, num_pairs=0 + 2, num_chosen_tokens=0 + 7)
    assert compute_global_counts([batch]).num_pairs is None
    assert compute_global_counts([batch]).num_chosen_tokens is None
    with pytest.raises(ValueError, match="even number of rows"):
        compute_global_counts([{"labels": labels[:3]}], paired=True)
    with pytest.raises(ValueError, match="loss_mask"):
        token_mask({"labels": labels, "loss_mask": loss_mask[:, :2]})


# Across ranks ----------------------------------------------------------------------------------

def case_reduce(micros: int):
    import torch.distributed as dist

    from mrl.losses import MetricsAccumulator, compute_global_counts

    rank = dist.get_rank()
    group = dist.group.WORLD
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(str(op))
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting_all_reduce
    try:
        acc = MetricsAccumulator()
        for micro in range(micros):
            acc.add(_rank_metrics(rank, micro))
        reduced = acc.reduce(group)
        reduce_calls = list(calls)
        labels = torch.full((2 + rank, 3), 5)
        labels[0, 0] = -100
        counts = compute_global_counts([{"labels": labels}, {"labels": labels[:1]}], group)
        count_calls = len(calls) - len(reduce_calls)
        bad = MetricsAccumulator()
        bad.add({f"name{rank}": Metric.mean_fragment(torch.tensor(1.0))})
        try:
            bad.reduce(group)
            mismatch = None
        except ValueError as err:
            mismatch = str(err)
    finally:
        dist.all_reduce = real_all_reduce
    return reduced, reduce_calls, counts, count_calls, mismatch


def test_reduce_across_ranks(ranks2):
    results = ranks2.run(case_reduce, 3)
    want = _expected(2, 3)
    for reduced, reduce_calls, counts, count_calls, mismatch in results:
        _assert_metrics(reduced, want)
        ops = torch.distributed.ReduceOp
        assert sorted(reduce_calls) == sorted([str(ops.SUM), str(ops.MAX)])
        # rank r holds (2 + r) rows of 3 labels with one ignored, plus a 1-row micro-batch
        assert counts == GlobalCounts(num_tokens=(6 - 1 + 2) + (9 - 1 + 2), num_seqs=(2 + 1) + (3 + 1))
        assert count_calls == 1
        assert mismatch is not None and "metric names differ" in mismatch
