"""Mixture-of-Experts models with expert parallelism on 4 gloo ranks.

Real Megatron-Core MoE layers (top-k router, sequential expert MLPs, all-to-all / all-gather token
dispatchers over gloo) inside mrl's trainer: the curves of the tiny MoE SFT recipe must be the same at
every expert/tensor/pipeline layout, the router losses must equal a float64 reference, and
checkpoints must resume and reshard across expert-parallel degrees.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_trainer import _assert_same_curve, _trainer

MOE = "configs/sft-tiny-moe-cpu.yaml"
SHORT = ["train.steps=3", "train.global_batch_size=16", "train.micro_batch_size=4", "scheduler.warmup_steps=1",
         "log.progress=false"]

LAYOUTS = {
    "ep2": ["parallel.ep=2"],
    "ep4": ["parallel.ep=4"],
    "ep2-allgather": ["parallel.ep=2", "model.moe_token_dispatcher=allgather"],
    "tp2ep2-sp": ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"],
    "tp2etp1ep2-sp": ["parallel.tp=2", "parallel.etp=1", "parallel.ep=2", "parallel.sequence_parallel=true"],
    "pp2ep2": ["parallel.pp=2", "parallel.ep=2"],
    "pp2vpp2ep2": ["parallel.pp=2", "parallel.vpp=2", "parallel.ep=2"],
}


def case_moe_curve(overrides: list[str], output_dir: str) -> dict:
    trainer = _trainer(MOE, overrides, output_dir)
    results = trainer.train()
    return {"curve": [(r.loss, r.grad_norm) for r in results],
            "aux": [r.metrics.get("moe_aux_loss") for r in results],
            "z": [r.metrics.get("moe_z_loss") for r in results]}


@pytest.fixture(scope="module")
def moe_reference(ranks4, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-ref")
    ref = ranks4.run(case_moe_curve, [*SHORT, "parallel.ep=1"], str(out))[0]
    assert len(ref["curve"]) == 3 and all(math.isfinite(loss) for loss, _ in ref["curve"])
    assert ref["curve"][-1][0] < ref["curve"][0][0]  # it learns
    assert all(a is not None and a > 0 for a in ref["aux"]) and all(z is not None and z > 0 for z in ref["z"])
    return ref


def _max_rel(values, reference) -> float:
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference))


# The default suite keeps one layout per dispatcher path and parallel dimension; these repeat a path
# already covered there and run with ``-m soak``.
SOAK_LAYOUTS = ("ep4", "ep2-allgather", "tp2etp1ep2-sp")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.soak) if n in SOAK_LAYOUTS else n for n in LAYOUTS])
def test_moe_curve_is_layout_invariant(ranks4, moe_reference, tmp_path, name):
    results = ranks4.run(case_moe_curve, [*SHORT, *LAYOUTS[name]], str(tmp_path))
    for result in results:  # every rank reports the same global values
        _assert_same_curve(result["curve"], moe_reference["curve"])
        assert _max_rel(result["aux"], moe_reference["aux"]) <= 1e-5
        assert _max_rel(result["z"], moe_reference["z"]) <= 1e-5
    print(name, "max rel loss", _max_rel([c[0] for c in results[-1]["curve"]], [c[0] for c in moe_reference["curve"]]),
          "grad", _max_rel([c[1] for c in results[-1]["curve"]], [c[1] for c in moe_reference["curve"]]),
          "aux", _max_rel(results[-1]["aux"], moe_reference["aux"]))


def case_router_losses_against_float64(overrides: list[str], output_dir: str) -> dict:
    """One training step; each router's inputs and weight are captured and its losses recomputed in float64."""
    from mrl.model.moe import moe_routers

    trainer = _trainer(MOE, overrides, output_dir)
    topk, num_experts = trainer.cfg.model.moe_topk, trainer.cfg.model.num_experts
    aux, z = [], []

    def capture(router, args):
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])  # [T, H]
        logits = x @ router.weight.detach().double().t()  # [T, E]
        scores = torch.softmax(logits, dim=-1)
        chosen = torch.zeros_like(scores).scatter(1, scores.topk(topk, dim=1).indices, 1.0)
        tokens = x.shape[0]
        # Switch load balancing: E · Σ_i f_i P_i, f_i = count_i / (T k), P_i = Σ_x p_i(x) / T
        aux.append(float(num_experts * (chosen.sum(0) / (tokens * topk) * scores.sum(0) / tokens).sum()))
        z.append(float((torch.logsumexp(logits, dim=-1) ** 2).mean()))

    handles = [router.register_forward_pre_hook(capture) for router in moe_routers(trainer.model)]
    result = trainer.train_one_step()
    for handle in handles:
        handle.remove()
    return {"aux": result.metrics["moe_aux_loss"], "z": result.metrics["moe_z_loss"], "ref_aux": sum(aux),
            "ref_z": sum(z), "terms": len(aux)}


def test_router_losses_equal_a_float64_reference(ranks4, tmp_path):
    """Drop-less top-2 softmax routing at TP1 × DP4 (every rank routes whole micro-batches)."""
    results = ranks4.run(case_router_losses_against_float64, [*SHORT, "parallel.ep=2"], str(tmp_path))
    terms = sum(r["terms"] for r in results)  # (micro-batches) × (MoE layers)
    ref_aux, ref_z = sum(r["ref_aux"] for r in results) / terms, sum(r["ref_z"] for r in results) / terms
    for r in results:
        assert abs(r["aux"] - ref_aux) <= 1e-6 * ref_aux, (r["aux"], ref_aux)
        assert abs(r["z"] - ref_z) <= 1e-6 * ref_z, (r["z"], ref_z)
    print("aux", results[0]["aux"], ref_aux, "z", results[0]["z"], ref_z)


MOE_MODEL = ["model.num_experts=4", "model.moe_ffn_hidden_size=128", "model.moe_aux_loss_coeff=0.01",
             "model.moe_z_loss_coeff=0.001"]


def case_recipe_curve(recipe: str, overrides: list[str], output_dir: str) -> dict:
    trainer = _trainer(recipe, overrides, output_dir)
    results = trainer.train()
    return {"curve": [(r.loss, r.grad_norm) for r in results], "aux": [r.metrics.get("moe_aux_loss", 0.0) for r in results]}


@pytest.mark.parametrize("recipe", ["configs/dpo-tiny-cpu.yaml",
                                    pytest.param("configs/offline-grpo-tiny-cpu.yaml", marks=pytest.mark.soak)])
def test_router_losses_join_every_algorithm_layout_invariantly(ranks4, tmp_path, recipe):
    """DPO (with a frozen MoE reference) and offline GRPO (KL to the reference) on MoE models: the
    router losses are part of the gradient, normalised the same way at every layout."""
    base = [*MOE_MODEL, "train.steps=2", "train.global_batch_size=16", "train.micro_batch_size=4",
            "scheduler.warmup_steps=1", "log.progress=false"]
    reference = ranks4.run(case_recipe_curve, recipe, [*base, "parallel.tp=1", "parallel.pp=1"], str(tmp_path / "a"))[0]
    assert all(math.isfinite(loss) for loss, _ in reference["curve"]) and all(a > 0 for a in reference["aux"])
    result = ranks4.run(case_recipe_curve, recipe, [*base, "parallel.tp=2", "parallel.pp=1", "parallel.ep=2",
                                                    "parallel.sequence_parallel=true"], str(tmp_path / "b"))[-1]
    _assert_same_curve(result["curve"], reference["curve"])
    assert _max_rel(result["aux"], reference["aux"]) <= 1e-5
    # Without router losses the gradient differs: they are really part of it.
    plain = ranks4.run(case_recipe_curve, recipe, [*base, "parallel.tp=1", "parallel.pp=1",
                                                   "model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0",
                                                   "model.moe_load_balancing=none"], str(tmp_path / "c"))[0]
    assert abs(plain["curve"][0][1] - reference["curve"][0][1]) > 1e-5 * reference["curve"][0][1]


def case_logprob_pass_has_no_router_losses(overrides: list[str], output_dir: str) -> dict:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from mrl.train.forward import annotate_logprobs

    trainer = _trainer(MOE, overrides, output_dir)
    batches, _ = trainer.next_batches()
    tracker = get_moe_layer_wise_logging_tracker()
    tracker.clear()
    annotate_logprobs(trainer.model, batches, trainer.layout, key="logprobs", vocab_size=trainer.cfg.model.vocab_size)
    return {"tracked": sorted(tracker), "training": all(chunk.training for chunk in trainer.model)}


def test_logprob_passes_carry_no_router_losses(ranks4, tmp_path):
    for r in ranks4.run(case_logprob_pass_has_no_router_losses, [*SHORT, "parallel.ep=2"], str(tmp_path)):
        assert r == {"tracked": [], "training": True}


# ---- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"moe_topk": 5}, "moe_topk=5 exceeds num_experts=4"),
    ({"moe_topk": 1}, "moe_topk=1 with moe_router_score_function softmax needs moe_router_pre_softmax=true"),
    ({"moe_layer_freq": [1, 0]}, "moe_layer_freq as a list needs num_layers=4 entries of 0 or 1"),
    ({"moe_layer_freq": [0, 0, 0, 0]}, "moe_layer_freq has no MoE layer"),
    ({"moe_shared_expert_gate": True}, "moe_shared_expert_gate needs moe_shared_expert_size"),
    ({"moe_expert_bias": True}, "moe_expert_bias needs moe_router_score_function=sigmoid"),
    ({"moe_capacity_factor": 1.0, "moe_load_balancing": "seq_aux_loss"},
     "moe_capacity_factor needs moe_load_balancing=aux_loss"),
    ({"moe_pad_expert_input_to_capacity": True}, "moe_pad_expert_input_to_capacity needs moe_capacity_factor"),
    ({"moe_aux_loss_coeff": 0.01, "moe_load_balancing": "none"}, "moe_aux_loss_coeff > 0 needs"),
    ({"moe_z_loss_coeff": -1.0}, "moe_z_loss_coeff must be a number >= 0"),
    ({"moe_routing_replay": True, "moe_capacity_factor": 1.0}, "moe_routing_replay needs drop-less routing"),
    ({"moe_routing_replay": True, "recompute": "full"}, "moe_routing_replay does not work with recompute=full"),
])
def test_moe_fields_are_validated(fields, message):
    from mrl.model.config import ModelConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ModelConfig(num_layers=4, num_experts=4, **fields)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.ep=3"], "model.num_experts=4 is not divisible by expert-parallel degree parallel.ep=3"),
    (["parallel.ep=4", "parallel.etp=2"], "parallel.ep=4 × expert tensor parallel etp=2 = 8 does not divide the 4 ranks"),
    (["parallel.pp=2", "parallel.ep=4"], "parallel.ep=4 × expert tensor parallel etp=1 = 4 does not divide the 2 ranks"),
    (["parallel.tp=2", "parallel.ep=2"], "needs parallel.sequence_parallel=true"),
    (["model.num_experts=null"], r"parallel.ep=2 / parallel.etp=None need a MoE model"),
    (["parallel.cp=2", "parallel.tp=1"], "parallel.ep=2 with cp=2 is not supported"),
])
def test_expert_layouts_are_validated(overrides, message):
    from mrl.config import load_config
    from mrl.job import JobConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(MOE, JobConfig, overrides).validate(4)


def test_dense_layouts_refuse_expert_degrees():
    from mrl.config import load_config
    from mrl.job import JobConfig

    with pytest.raises(ValueError, match="parallel.ep=1 / parallel.etp=1 need a MoE model"):
        load_config("configs/sft-tiny-cpu.yaml", JobConfig, ["parallel.etp=1"]).validate(4)
    load_config(MOE, JobConfig, []).validate(4)


# ---- checkpoints -------------------------------------------------------------------------------

def test_moe_resume_is_bit_exact(ranks4, tmp_path):
    steps4 = [*SHORT[1:], "train.steps=4", "parallel.ep=2", "parallel.pp=2"]
    full = ranks4.run(case_moe_curve, steps4, str(tmp_path / "full"))[-1]
    first = ranks4.run(case_moe_curve, [*steps4, "train.steps=2"], str(tmp_path / "split"))[-1]
    resumed = ranks4.run(case_moe_curve, steps4, str(tmp_path / "split"))[-1]
    assert first["curve"] == full["curve"][:2] and resumed["curve"] == full["curve"][2:]  # exact float equality
    assert first["aux"] + resumed["aux"] == full["aux"]


@pytest.mark.parametrize("saved, loaded", [
    (["parallel.ep=2"], ["parallel.ep=1"]),
    pytest.param(["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true"], ["parallel.pp=2", "parallel.ep=2"],
                 marks=pytest.mark.soak),
])
def test_moe_checkpoint_reshards_across_expert_layouts(ranks4, tmp_path, saved, loaded):
    base = [*SHORT[1:], "train.steps=2"]
    ranks4.run(case_moe_curve, [*base, *saved], str(tmp_path / "run"))
    continued = ranks4.run(case_moe_curve, [*base, "train.steps=3", *loaded], str(tmp_path / "run"))[-1]
    reference = ranks4.run(case_moe_curve, [*base, "train.steps=3", *saved], str(tmp_path / "ref"))[-1]
    assert len(continued["curve"]) == 1
    _assert_same_curve(continued["curve"], reference["curve"][2:])
    assert _max_rel(continued["aux"], reference["aux"][2:]) <= 1e-5
    print("resharded", saved, "->", loaded, "loss rel",
          _max_rel([c[0] for c in continued["curve"]], [c[0] for c in reference["curve"][2:]]),
          "grad rel", _max_rel([c[1] for c in continued["curve"]], [c[1] for c in reference["curve"][2:]]))


# ---- routing replay ----------------------------------------------------------------------------

REPLAY = ["model.num_experts=4", "model.moe_ffn_hidden_size=128", "model.moe_router_score_function=sigmoid",
          "model.moe_expert_bias=true", "train.steps=1", "train.global_batch_size=16", "train.micro_batch_size=4",
          "log.progress=false"]


def case_on_policy_ratio(overrides: list[str], output_dir: str) -> dict:
    """An on-policy GRPO step whose router picks differently from the old-policy pass.

    Between the old-policy log-prob pass and the training pass only the routers' expert bias moves (as
    aux-loss-free balancing moves it after every step, or as a rollout engine's router picks other
    experts): it decides which experts a token goes to, never the gate weights of the chosen ones, so
    every other number of the two passes is identical. Returns the step's ratio statistics.
    """
    from mrl.losses.base import compute_global_counts
    from mrl.model.moe import ROUTING_KEY, moe_routers

    trainer = _trainer("configs/offline-grpo-tiny-cpu.yaml", overrides, output_dir)
    batches, _ = trainer.next_batches()
    trainer.prepare(batches)  # old-policy log-probs (and, with replay, the recorded routing)
    recorded = ROUTING_KEY in batches[0]
    generator = torch.Generator().manual_seed(7)
    for router in moe_routers(trainer.model):
        router.expert_bias.add_(0.05 * torch.randn(router.expert_bias.shape, generator=generator))
    counts = compute_global_counts(batches, trainer.layout.dp_group)
    metrics = trainer.train_step(batches, counts).metrics
    return {"recorded": recorded, **{k: metrics.get(k) for k in ("ratio_mean", "ratio_min", "ratio_max")}}


@pytest.mark.parametrize("layout", [pytest.param(["parallel.tp=1", "parallel.pp=1", "parallel.ep=2"], marks=pytest.mark.soak),
                                    ["parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.sequence_parallel=true"]])
def test_routing_replay_gives_ratio_one_on_policy(ranks4, tmp_path, layout):
    replayed = ranks4.run(case_on_policy_ratio, [*REPLAY, *layout, "model.moe_routing_replay=true"], str(tmp_path / "a"))
    free = ranks4.run(case_on_policy_ratio, [*REPLAY, *layout], str(tmp_path / "b"))
    last = len(replayed) - 1  # the loss metrics live on the last stage
    assert replayed[last]["recorded"] and not free[last]["recorded"]
    assert replayed[last]["ratio_min"] == 1.0 and replayed[last]["ratio_max"] == 1.0
    assert replayed[last]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # an fp32 mean of exact ones
    deviation = max(abs(free[last]["ratio_max"] - 1.0), abs(free[last]["ratio_min"] - 1.0))
    assert deviation > 1e-3, free[last]  # without replay the re-routed tokens change their log-probs
    print("replay", replayed[last], "no replay", free[last])
