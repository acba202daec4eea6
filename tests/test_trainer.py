"""The training backend end to end on 4 gloo ranks: layout invariance, resume, NaN guard.

Each case builds a JobConfig from a tiny recipe plus overrides and runs the real trainer
(Megatron-Core GPTModel, schedules, DDP, distributed optimizer, mrl losses) inside the shared
4-rank pool. Every layout of 4 ranks must produce the same loss curve as TP=1 × DP=4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

SFT = "configs/sft-tiny-cpu.yaml"
SHORT = ["train.steps=3", "train.global_batch_size=16", "train.micro_batch_size=4", "scheduler.warmup_steps=1",
         "log.progress=false"]


def _trainer(recipe: str, overrides: list[str], output_dir: str, *, timeout_minutes: float = 2):
    import torch.distributed as dist

    from mrl.config import load_config
    from mrl.job import JobConfig
    from mrl.parallel.layout import ParallelLayout
    from mrl.runner import build_trainer

    cfg = load_config(recipe, JobConfig, [*overrides, f"log.output_dir={output_dir}"])
    cfg.validate(dist.get_world_size())
    layout = ParallelLayout.initialize(cfg.parallel, timeout_minutes=timeout_minutes)
    layout.seed(cfg.seed)
    return build_trainer(cfg, layout)


def case_curve(recipe: str, overrides: list[str], output_dir: str) -> list[tuple[float, float]]:
    trainer = _trainer(recipe, overrides, output_dir)
    return [(r.loss, r.grad_norm) for r in trainer.train()]


class _NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with a broken gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def case_nan_guard(overrides: list[str], output_dir: str, bad_steps: dict[int, str]):
    """Inject a NaN loss or NaN gradient at the given steps; report what the trainer did."""
    from mrl.train.step import NonFiniteError

    trainer = _trainer(SFT, overrides, output_dir)
    loss_fn = trainer.train_step.loss_fn

    def faulty(output, batch, counts, group):
        loss, metrics = loss_fn(output, batch, counts, group)
        kind = bad_steps.get(trainer.step + 1)
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":
            loss = _NaNGrad.apply(loss)
        return loss, metrics

    trainer.train_step.loss_fn = faulty
    records, error = [], None
    try:
        while trainer.step < trainer.cfg.train.steps:
            before = _param_checksum(trainer)
            result = trainer.train_one_step()
            records.append((result.skipped, result.skip_reason, before == _param_checksum(trainer)))
    except NonFiniteError as exc:
        error = str(exc)
    return {"records": records, "error": error}


def _param_checksum(trainer) -> float:
    return float(sum(p.detach().double().sum() for chunk in trainer.model for p in chunk.parameters()))


# ---- layout invariance -------------------------------------------------------------------------

LAYOUTS = {
    "tp2pp2": ["parallel.tp=2", "parallel.pp=2"],
    "tp4": ["parallel.tp=4", "parallel.pp=1"],
    "tp2dp2": ["parallel.tp=2", "parallel.pp=1"],
    "tp2dp2-sp": ["parallel.tp=2", "parallel.pp=1", "parallel.sequence_parallel=true"],
    "pp2dp2-vpp2": ["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2", "train.micro_batch_size=2"],
    "tp2pp2-sp-recompute-full": ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                                 "model.recompute=full"],
    "tp2dp2-recompute-selective": ["parallel.tp=2", "parallel.pp=1", "model.recompute=selective"],
}


@pytest.fixture(scope="module")
def sft_reference(ranks4, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-ref")
    curve = ranks4.run(case_curve, SFT, [*SHORT, "parallel.tp=1", "parallel.pp=1"], str(out))[0]
    assert len(curve) == 3 and all(math.isfinite(loss) for loss, _ in curve)
    assert curve[-1][0] < curve[0][0]  # it learns
    return curve


def _assert_same_curve(curve, reference, rel=1e-5):
    assert len(curve) == len(reference)
    for (loss, grad), (ref_loss, ref_grad) in zip(curve, reference):
        assert abs(loss - ref_loss) <= rel * abs(ref_loss), (loss, ref_loss)
        assert abs(grad - ref_grad) <= rel * abs(ref_grad), (grad, ref_grad)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sft_curve_is_layout_invariant(ranks4, sft_reference, tmp_path, name):
    results = ranks4.run(case_curve, SFT, [*SHORT, *LAYOUTS[name]], str(tmp_path))
    for curve in results:  # every rank reports the same global values
        _assert_same_curve(curve, sft_reference)


PACKED = [*SHORT, "data.packing=true", "data.seq_length=64", "model.max_sequence_length=64"]


def case_packed_rows_match_documents_alone(overrides: list[str], output_dir: str) -> dict | None:
    """Log-probs of packed rows through the training schedule vs each document in a row of its own."""
    from mrl.data import IGNORE_INDEX
    from mrl.train.forward import annotate_logprobs

    trainer = _trainer(SFT, overrides, output_dir)
    packed, _ = trainer.next_batches()
    vocab = trainer.cfg.model.vocab_size
    annotate_logprobs(trainer.model, packed, trainer.layout, key="logprobs", vocab_size=vocab)
    seq = packed[0]["tokens"].shape[1]
    documents, alone = [], []  # (micro-batch, row, positions); one single-row micro-batch each
    for m, batch in enumerate(packed):
        for row, segments in enumerate(batch["segment_ids"]):
            for doc in segments.unique().tolist():
                if doc == 0:
                    continue
                where = (segments == doc).nonzero().squeeze(1)  # [n]
                n = where.numel()
                tokens = torch.full((1, seq), trainer.tokenizer.pad_id, dtype=torch.long)
                labels = torch.full((1, seq), IGNORE_INDEX, dtype=torch.long)
                tokens[0, :n], labels[0, :n] = batch["tokens"][row, where], batch["labels"][row, where]
                documents.append((m, row, where))
                alone.append({"tokens": tokens, "labels": labels, "position_ids": torch.arange(seq)[None]})
    annotate_logprobs(trainer.model, alone, trainer.layout, key="logprobs", vocab_size=vocab)
    if not trainer.layout.is_last_stage:
        return None
    diff = max((packed[m]["logprobs"][row, where] - single["logprobs"][0, :where.numel()]).abs().max().item()
               for (m, row, where), single in zip(documents, alone))
    rows = sum(batch["tokens"].shape[0] for batch in packed)
    scored = sum(float(batch["logprobs"].abs().sum()) for batch in packed)
    return {"diff": diff, "documents": len(documents), "rows": rows, "scored": scored}


@pytest.mark.parametrize("layout", ["tp1dp4", "tp2pp2"])
def test_packed_rows_score_each_document_alone(ranks4, tmp_path, layout):
    overrides = [*PACKED, *(LAYOUTS[layout] if layout in LAYOUTS else ["parallel.tp=1", "parallel.pp=1"])]
    results = [r for r in ranks4.run(case_packed_rows_match_documents_alone, overrides, str(tmp_path)) if r]
    assert results
    for r in results:
        assert r["documents"] >= 2 * r["rows"]  # packing put several documents in each row
        assert r["scored"] > 0.0
        assert r["diff"] < 1e-5


def test_packed_sft_curve_is_layout_invariant(ranks4, tmp_path):
    reference = ranks4.run(case_curve, SFT, [*PACKED, "parallel.tp=1", "parallel.pp=1"], str(tmp_path / "ref"))[0]
    assert all(math.isfinite(loss) for loss, _ in reference) and reference[-1][0] < reference[0][0]
    for curve in ranks4.run(case_curve, SFT, [*PACKED, *LAYOUTS["tp2pp2"]], str(tmp_path / "tp2pp2")):
        _assert_same_curve(curve, reference)


def test_offline_grpo_and_dpo_steps_are_layout_invariant(ranks4, tmp_path):
    recipes = {
        "configs/dpo-tiny-cpu.yaml": ["train.steps=2", "train.global_batch_size=16", "train.micro_batch_size=4"],
        "configs/offline-grpo-tiny-cpu.yaml": ["train.steps=2", "train.global_batch_size=16",
                                               "train.micro_batch_size=4"],
    }
    recipes["configs/offline-grpo-tiny-cpu.yaml#ppo"] = [
        "train.steps=2", "train.global_batch_size=16", "train.micro_batch_size=4", "loss.kind=ppo",
        "loss.value_coef=0.5", "loss.value_clip=0.2", "model.value_head=true"]
    # A token-level advantage estimator: GAE(0.9, 0.8) of the value head with KL in the reward,
    # whitened over the global batch (gathered over DP after the log-prob passes).
    recipes["configs/offline-grpo-tiny-cpu.yaml#gae"] = [
        "train.steps=2", "train.global_batch_size=16", "train.micro_batch_size=4", "loss.kind=ppo",
        "loss.value_coef=0.5", "model.value_head=true", "rollout.advantage_estimator=gae", "rollout.gamma=0.9",
        "rollout.lam=0.8", "rollout.kl_in_reward_coef=0.05"]
    for recipe, overrides in recipes.items():
        recipe = recipe.split("#")[0]
        base = [*overrides, "scheduler.warmup_steps=1", "log.progress=false"]
        out = tmp_path / f"{Path(recipe).stem}-{len(overrides)}"
        reference = ranks4.run(case_curve, recipe, [*base, "parallel.tp=1", "parallel.pp=1"], str(out / "a"))[0]
        assert all(math.isfinite(loss) for loss, _ in reference)
        for layout in (["parallel.tp=2", "parallel.pp=2"], ["parallel.tp=4", "parallel.pp=1"]):
            curve = ranks4.run(case_curve, recipe, [*base, *layout], str(out / "_".join(layout)))[-1]
            _assert_same_curve(curve, reference)


def case_online_grpo(overrides: list[str], output_dir: str) -> dict:
    """A short online GRPO run: SFT warm-up, rollouts from the policy, PPO epochs."""
    trainer = _trainer("configs/grpo-tiny-cpu.yaml", overrides, output_dir)
    results = trainer.train()
    same = all(torch.equal(a, b) for m, r in zip(trainer.model, trainer.reference)
               for a, b in zip(m.module.parameters(), r.parameters()))
    return {"losses": [r.loss for r in results], "skipped": [r.skipped for r in results],
            "reference_moved": not same}


def test_online_grpo_warms_up_samples_and_trains(ranks4, tmp_path):
    overrides = ["rollout.sft_warmup_steps=2", "rollout.epochs=2", "train.steps=2", "train.global_batch_size=16",
                 "train.micro_batch_size=4", "rollout.group_size=4", "rollout.max_new_tokens=4", "log.progress=false"]
    for r in ranks4.run(case_online_grpo, overrides, str(tmp_path)):
        assert len(r["losses"]) == 2 and not any(r["skipped"])
        assert all(math.isfinite(loss) for loss in r["losses"])
        # The policy trained after the warm-up copied its weights into the reference.
        assert r["reference_moved"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert 0.0 <= records[0]["reward_mean"] <= 1.0
    assert records[0]["reward_mean"] == records[1]["reward_mean"]  # one rollout, two epochs
    assert records[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # first epoch: on-policy
    assert records[1]["approx_kl"] > 0.0  # second epoch: the policy has moved
    assert len((tmp_path / "warmup_metrics.jsonl").read_text().splitlines()) == 2


def case_warmup_start(overrides: list[str], output_dir: str) -> dict:
    """Checksums of the policy right after train.init_checkpoint is loaded and when the warm-up starts."""
    trainer = _trainer("configs/grpo-tiny-cpu.yaml", overrides, output_dir)
    seen: dict[str, float] = {"random": _param_checksum(trainer)}
    load, warmup = trainer._load_weights, trainer._sft_warmup

    def loading(chunks, source):
        loaded = load(chunks, source)
        if chunks is trainer.model:
            seen["init"] = _param_checksum(trainer)
        return loaded

    def warming_up():
        seen["warmup_start"] = _param_checksum(trainer)
        warmup()

    trainer._load_weights, trainer._sft_warmup = loading, warming_up
    trainer.train()
    return seen


def test_sft_warmup_starts_from_the_initial_checkpoint(ranks4, tmp_path):
    """The warm-up trains the weights train.init_checkpoint names (it once ran first, and the
    checkpoint's weights then replaced the warmed-up policy)."""
    ranks4.run(case_curve, SFT, [*SHORT, "train.steps=1", "parallel.tp=1", "parallel.pp=1"], str(tmp_path / "sft"))
    overrides = ["rollout.sft_warmup_steps=1", "train.steps=1", "train.global_batch_size=16", "train.micro_batch_size=4",
                 "rollout.group_size=4", "rollout.max_new_tokens=2", "log.progress=false",
                 f"train.init_checkpoint={tmp_path / 'sft'}"]
    for seen in ranks4.run(case_warmup_start, overrides, str(tmp_path / "grpo")):
        assert seen["init"] != seen["random"]
        assert seen["warmup_start"] == seen["init"]


def test_architecture_variants_are_layout_invariant(ranks4, tmp_path):
    """Tied embeddings (synced across pipeline stages), GQA, qk-norm, LayerNorm, GELU, biases."""
    variant = ["model.tie_embeddings=true", "model.num_query_groups=2", "model.qk_layernorm=true",
               "model.normalization=LayerNorm", "model.activation=gelu", "model.add_bias_linear=true"]
    reference = ranks4.run(case_curve, SFT, [*SHORT, *variant, "parallel.tp=1", "parallel.pp=1"], str(tmp_path / "a"))[0]
    assert all(math.isfinite(loss) for loss, _ in reference)
    curve = ranks4.run(case_curve, SFT, [*SHORT, *variant, "parallel.tp=2", "parallel.pp=2",
                                         "parallel.sequence_parallel=true"], str(tmp_path / "b"))[-1]
    _assert_same_curve(curve, reference)


# ---- checkpoints -------------------------------------------------------------------------------

def test_resume_continues_the_same_curve_bit_for_bit(ranks4, tmp_path):
    steps4 = [*SHORT[1:], "train.steps=4", "parallel.tp=2", "parallel.pp=2"]
    full = ranks4.run(case_curve, SFT, steps4, str(tmp_path / "full"))[-1]
    first = ranks4.run(case_curve, SFT, [*steps4, "train.steps=2"], str(tmp_path / "split"))[-1]
    resumed = ranks4.run(case_curve, SFT, steps4, str(tmp_path / "split"))[-1]
    assert first == full[:2]
    assert resumed == full[2:]  # exact float equality: bit-identical on CPU fp32
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [int(__import__("json").loads(line)["step"]) for line in lines] == [1, 2, 3, 4]


def case_save_before_training(recipe: str, overrides: list[str], output_dir: str) -> None:
    _trainer(recipe, overrides, output_dir).save()


def test_a_checkpoint_saved_before_the_first_step_resumes_exactly(ranks4, tmp_path):
    """Saving a never-stepped optimizer stores a fresh optimizer's state (Adam step 0, zero moments)."""
    steps = [*SHORT[1:], "train.steps=2", "parallel.tp=2", "parallel.pp=2"]
    full = ranks4.run(case_curve, SFT, steps, str(tmp_path / "full"))[-1]
    ranks4.run(case_save_before_training, SFT, steps, str(tmp_path / "split"))
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_00000000"
    assert ranks4.run(case_curve, SFT, steps, str(tmp_path / "split"))[-1] == full


def test_resume_at_another_layout_reshards(ranks4, tmp_path):
    base = [*SHORT[1:], "train.steps=2"]
    ranks4.run(case_curve, SFT, [*base, "parallel.tp=2", "parallel.pp=2"], str(tmp_path))
    continued = ranks4.run(case_curve, SFT, [*base, "train.steps=3", "parallel.tp=4", "parallel.pp=1"],
                           str(tmp_path))[-1]
    reference = ranks4.run(case_curve, SFT, [*base, "train.steps=3", "parallel.tp=2", "parallel.pp=2"],
                           str(tmp_path / "ref"))[-1]
    assert len(continued) == 1
    _assert_same_curve(continued, reference[2:])


# ---- non-finite guard --------------------------------------------------------------------------

def test_nan_loss_and_gradient_are_skipped_before_the_optimizer(ranks4, tmp_path):
    overrides = [*SHORT[1:], "train.steps=4", "parallel.tp=2", "parallel.pp=2"]
    out = ranks4.run(case_nan_guard, overrides, str(tmp_path / "a"), {2: "loss", 3: "grad"})
    for rank in out:
        assert rank["error"] is None
        skipped = [(s, reason, unchanged) for s, reason, unchanged in rank["records"]]
        assert skipped[0] == (False, None, False)
        assert skipped[1] == (True, "non-finite loss", True)
        assert skipped[2] == (True, "non-finite gradient norm", True)
        assert skipped[3] == (False, None, False)


def test_repeated_nan_stops_the_run_with_the_cause(ranks4, tmp_path):
    overrides = [*SHORT[1:], "train.steps=5", "train.max_consecutive_bad_steps=2", "parallel.tp=2", "parallel.pp=2"]
    out = ranks4.run(case_nan_guard, overrides, str(tmp_path), {2: "grad", 3: "grad"})
    for rank in out:
        assert len(rank["records"]) == 2
        assert "2 consecutive steps skipped" in rank["error"]
        assert "non-finite gradient norm" in rank["error"]


# ---- optimizer groups ------------------------------------------------------------------------------

def case_weight_decay_groups(overrides: list[str], output_dir: str) -> dict[str, float]:
    """Each trainable parameter's weight-decay multiplier, by name, as Megatron groups them."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    from mrl.train.optim import _no_decay

    trainer = _trainer(SFT, overrides, output_dir)
    groups = _get_param_groups(trainer.model, OptimizerConfig(lr=1e-3), _no_decay(trainer.cfg.optim))
    wd_of = {id(param): group["wd_mult"] for group in groups for param in group["params"]}
    return {name: wd_of[id(param)] for chunk in trainer.model for name, param in chunk.named_parameters()}


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_applies_to_weight_matrices_only(ranks4, tmp_path, decay_embeddings):
    overrides = [*SHORT, "parallel.tp=2", "parallel.pp=1", f"optim.decay_embeddings={str(decay_embeddings).lower()}",
                 "model.add_bias_linear=true"]
    groups = ranks4.run(case_weight_decay_groups, overrides, str(tmp_path))[0]
    assert groups, "no parameters"
    for name, wd_mult in groups.items():
        if name.endswith(".bias") or "layernorm" in name or "norm.weight" in name:
            assert wd_mult == 0.0, name
        elif "word_embeddings" in name or "output_layer" in name:
            assert wd_mult == (1.0 if decay_embeddings else 0.0), name
        else:
            assert wd_mult == 1.0, name
    assert any(name.endswith(".bias") for name in groups)


def test_bf16_curve_is_close_to_fp32(ranks4, sft_reference, tmp_path):
    results = ranks4.run(case_curve, SFT, [*SHORT, "parallel.tp=2", "parallel.pp=2", "precision.dtype=bf16"],
                         str(tmp_path))
    for (loss, grad), (ref_loss, ref_grad) in zip(results[-1], sft_reference):
        assert math.isfinite(loss) and abs(loss - ref_loss) < 1e-2 * ref_loss
        assert abs(grad - ref_grad) < 5e-2 * ref_grad
