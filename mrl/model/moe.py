"""Router losses of Mixture-of-Experts models: mrl's global normalisation and their per-step metrics.

Megatron-Core's router attaches its load-balancing (aux) loss and z-loss to the activations
(``MoEAuxLossAutoScaler``): their gradients join the backward pass of the micro-batch that produced
them, scaled by the router's coefficient and, under ``calculate_per_token_loss`` (which mrl's DDP
contract sets), by the number of tokens the rank routed. mrl's losses are fragments of a *global*
mean (see ``mrl.losses.base``); the router losses are made fragments of one too:

    router loss of the step = Σ_mb (n_mb / N) · (aux_coeff · Σ_layers aux_mb,l + z_coeff · Σ_layers z_mb,l)

with ``n_mb`` the tokens of micro-batch ``mb`` (padding included: the router routes every position)
and ``N`` their sum over every micro-batch and data-parallel rank of the step. ``RouterLosses``
gets there by giving Megatron's routers the coefficient ``coeff / N`` for the step: the token count
the router multiplies its losses by then turns each micro-batch's share into ``n_mb / N``, and the
gradients are the same at every TP(+SP)/PP/EP/DP layout and micro-batch count (tests/test_moe.py).

Forward-only passes (log-probs of the old policy, the reference, a rollout) run in eval mode under
``no_grad``, where Megatron's router computes neither loss: they never see router losses.

Metrics (the same on every rank): ``moe_aux_loss`` and ``moe_z_loss``, the unscaled losses averaged
over MoE layers and over the step's micro-batches (what the coefficients multiply).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def moe_routers(chunks) -> list:
    """This rank's Megatron ``TopKRouter`` modules, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [module for chunk in chunks for module in chunk.modules() if isinstance(module, TopKRouter)]


def _model_config(chunks):
    for chunk in chunks:
        config = getattr(chunk, "config", None)
        if config is not None:
            return config
    return None


class RouterLosses:
    """Scales the routers' loss coefficients for one step and reads back the step's router-loss metrics."""

    def __init__(self, chunks, layout, config) -> None:
        self.layout = layout
        self.config = config
        self.aux_coeff = float(config.moe_aux_loss_coeff or 0.0)
        self.z_coeff = config.moe_z_loss_coeff
        self.num_moe_layers = sum(int(v) for v in config.moe_layer_freq) if isinstance(config.moe_layer_freq, list) \
            else len(range(0, config.num_layers, config.moe_layer_freq))
        # Ranks one micro-batch's tokens are split over (their routers each see a part; the metrics
        # combine the parts).
        self.token_split = (layout.tp if config.sequence_parallel else 1) * layout.cp

    @classmethod
    def for_chunks(cls, chunks, layout) -> "RouterLosses | None":
        config = _model_config(chunks)
        if config is None or not getattr(config, "num_moe_experts", None):
            return None
        return cls(chunks, layout, config)

    def begin_step(self, micro_batches: list[dict]) -> None:
        """Set the step's coefficients (global normalisation) and clear Megatron's loss tracker."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
        device = micro_batches[0]["tokens"].device
        local = torch.tensor([sum(b["tokens"].numel() for b in micro_batches), len(micro_batches)],
                             dtype=torch.float64, device=device)
        dist.all_reduce(local, group=self.layout.dp_group)
        self.num_tokens, self.num_micro_batches = float(local[0]), float(local[1])
        scale = 1.0 / self.num_tokens
        self.config.moe_aux_loss_coeff = self.aux_coeff * scale
        if self.z_coeff is not None:
            self.config.moe_z_loss_coeff = self.z_coeff * scale

    def restore(self) -> None:
        """Give the routers their configured coefficients back."""
        self.config.moe_aux_loss_coeff = self.aux_coeff
        self.config.moe_z_loss_coeff = self.z_coeff

    def end_step(self) -> dict[str, float]:
        """Restore the coefficients; return the step's router-loss metrics (collective over all ranks)."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        self.restore()
        tracker = get_moe_layer_wise_logging_tracker()
        names = {"moe_aux_loss": ("load_balancing_loss", "seq_load_balancing_loss"), "moe_z_loss": ("z_loss",)}
        wanted = {"moe_aux_loss": self.aux_coeff > 0, "moe_z_loss": self.z_coeff is not None}
        device = torch.device("cpu") if not torch.cuda.is_available() else torch.device(torch.cuda.current_device())
        values = torch.zeros(2, dtype=torch.float64, device=device)
        for index, (metric, keys) in enumerate(names.items()):
            for key in keys:
                if key in tracker:
                    values[index] += tracker[key]["values"].double().sum()
        # aux: the partial losses of the token-split ranks add up; z: each of them holds its tokens' mean.
        values[1] /= self.token_split
        groups = [self.layout.pp_group, self.layout.dp_group]
        if self.token_split > 1:
            groups.append(self.layout.groups.tp_cp)
        for group in groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(values, group=group)
        values /= self.num_micro_batches * self.num_moe_layers
        tracker.clear()
        return {metric: float(values[i]) for i, metric in enumerate(names) if wanted[metric]}

    def loss(self, metrics: dict[str, float]) -> float:
        """The router losses' share of the step's objective (coefficients times the metrics, summed over layers)."""
        return self.num_moe_layers * (self.aux_coeff * metrics.get("moe_aux_loss", 0.0)
                                      + (self.z_coeff or 0.0) * metrics.get("moe_z_loss", 0.0))


# ---- routing replay ---------------------------------------------------------------------------

ROUTING_KEY = "moe_routing"
"""Batch key of the recorded routing: ``{layer number: [local tokens, topk] expert indices}``."""


def replay_routers(model) -> list:
    """The routers of ``model`` (one chunk) that can record and replay (``model.moe_routing_replay``)."""
    return [router for router in moe_routers([model]) if getattr(router, "router_replay", None) is not None]


def disable_routing_replay(chunks) -> None:
    """Frozen models (references) never record or replay routing."""
    for chunk in chunks:
        for router in moe_routers([chunk]):
            router.router_replay = None


class RoutingReplay:
    """Record each token's top-k experts in one pass and replay them in later passes, per micro-batch.

    Megatron-Core's ``RouterReplay`` (one per router) does the top-k substitution; this class keeps
    the indices *per micro-batch* in the micro-batch's dict, keyed by the global layer number, so
    every schedule (1F1B, interleaved) and every layout finds them. ``mode`` is "record" (the
    old-policy log-prob pass: the indices are stored in ``batch[ROUTING_KEY]``) or "replay" (the
    training passes: micro-batches that carry recorded indices are routed with them; the router
    scores of the replayed experts give the gate weights, so the output equals the recorded pass's).
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("record", "replay"):
            raise ValueError(f"routing replay mode must be 'record' or 'replay', got {mode!r}")
        self.mode = mode

    def before(self, model, batch: dict) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        routers = replay_routers(model)
        if not routers:
            return
        if self.mode == "record":
            for router in routers:
                router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
            return
        recorded = batch.get(ROUTING_KEY)
        if recorded is None:
            return
        for router in routers:
            if router.layer_number not in recorded:
                raise ValueError(f"routing replay: no recorded routing for MoE layer {router.layer_number}")
            router.router_replay.target_topk_idx = recorded[router.layer_number]
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def after(self, model, batch: dict) -> None:
        routers = replay_routers(model)
        if self.mode == "record" and routers:
            recorded = batch.setdefault(ROUTING_KEY, {})
            for router in routers:
                recorded[router.layer_number] = router.router_replay.get_recorded_indices().detach().clone()
        for router in routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
