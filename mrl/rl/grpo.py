"""Online GRPO: sample G responses per prompt from the policy, reward them, update on-policy.

One rollout (per ``rollout.updates_per_rollout`` optimizer steps):
  1. this DP rank's prompts (whole groups stay on one rank), each repeated G times;
  2. completions from the ``RolloutSource`` that ``rollout.engine`` names (KV-cached decoding of
     the policy by default; a vLLM engine refit from the policy), each token with its sampling
     log-prob (``rollout_logprobs``; the loss's ``behaviour_logprobs`` when loss.is_correction is set);
  3. rewards from the reward function; advantages from the estimator rollout.advantage_estimator
     names (``mrl.rl.advantages``; group-normalised GRPO by default, zero-variance groups get 0);
     a token-level estimator (GAE, REINFORCE++, ...) runs after step 4, on the last stage, over
     the global batch gathered from every DP rank (``mrl.rl.advantage_batches``);
  4. old-policy log-probs (and reference log-probs for the KL term) with the same micro-batching
     as training, so the first update is exactly on-policy (ratio 1); the mismatch between them
     and the rollout log-probs is logged every rollout (``mismatch_*``);
  5. the rows are split into mini-batches, one optimizer step each, for ``rollout.epochs`` passes.

With ``rollout.sft_warmup_steps`` the run starts with SFT steps on ``rollout.warmup_data`` (a
random tiny model almost never earns reward, so GRPO would have no signal); the reference model
is then the policy as the warm-up left it, and it is saved with every checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mrl.data import build_dataset
from mrl.data.loader import build_sampler
from mrl.data.sequences import IGNORE_INDEX
from mrl.data.tasks import load_reward_fn
from mrl.losses import functional as LF
from mrl.losses.base import BatchNeeds
from mrl.model.init import unwrap_ddp
from mrl.rl.advantage_batches import assign_advantages, with_reward_kl
from mrl.rl.advantages import AdvantageInputs, estimate, get_estimator, group_advantages
from mrl.rl.credit import token_credits
from mrl.rl.rollout import build_rollout_source
from mrl.rl.targets import value_targets
from mrl.train.trainer import Trainer


class GRPOTrainer(Trainer):
    """``Trainer`` whose batches are online rollouts of the policy."""

    def __init__(self, cfg, layout) -> None:
        super().__init__(cfg, layout)
        self.reward_fn = load_reward_fn(cfg.rollout.reward)
        self.rollout_source = build_rollout_source(cfg, self.model, layout, self.tokenizer, log=self.announce)
        self.queue: list[tuple[list[dict], dict]] = []

    # Prompts ------------------------------------------------------------------------------------

    def _build_data(self):
        cfg = self.cfg
        self.prompts = build_dataset(cfg.data, self.tokenizer)
        prompts_per_step = cfg.train.global_batch_size // cfg.rollout.group_size
        return build_sampler(self.prompts, global_batch_size=prompts_per_step,
                             micro_batch_size=prompts_per_step // self.layout.dp,
                             dp_rank=self.layout.dp_rank, dp_size=self.layout.dp)

    def _build_reference(self):
        if self.cfg.reference.source == "none" and self.cfg.rollout.sft_warmup_steps > 0 \
                and self.batch_needs().reference_logprobs:
            raise ValueError("a KL penalty after SFT warm-up needs reference.source: initial")
        return super()._build_reference()

    def batch_needs(self) -> BatchNeeds:
        """The loss's needs, and the reference log-probs of a KL penalty in the reward."""
        return with_reward_kl(super().batch_needs(), self.cfg.rollout)

    # Rollouts -----------------------------------------------------------------------------------

    def next_batches(self) -> tuple[list[dict], dict[str, float]]:
        if not self.queue:
            self.queue = self._rollout()
        return self.queue.pop(0)

    def prepare(self, micro_batches: list[dict]) -> None:
        """Log-probs were computed once per rollout, before any update (see ``_rollout``); the
        loss reads the step's statistics (``Loss.prepare_step``)."""
        self.loss_fn.prepare_step(micro_batches, self.layout.dp_group, self.layout.tp_group)

    def _rollout(self) -> list[tuple[list[dict], dict]]:
        cfg = self.cfg
        group = cfg.rollout.group_size
        estimator = get_estimator(cfg.rollout.advantage_estimator)
        examples = [self.prompts[i] for batch in self.data.next_step() for i in batch]
        room = cfg.data.seq_length - cfg.rollout.max_new_tokens
        prompts = [_fit(list(map(int, ex.tokens)), room) for ex in examples for _ in range(group)]
        started = time.monotonic()
        rollout = self.rollout_source.generate(prompts, seed=cfg.seed * 1_000_003 + self.step)
        completions = rollout.completions
        generated = time.monotonic()
        rewards, credits = self._score(examples, completions)  # [rows], per-token credits or None
        greedy = self._greedy_rewards(examples, prompts[::group]) if "greedy_rewards" in estimator.needs else None
        _, adv_metrics = group_advantages(rewards, group)  # group counts
        group_ids = (self.layout.dp_rank * len(prompts) + torch.arange(len(prompts))) // group  # [rows], global
        if estimator.token_level:  # set after the old-policy pass, on the last stage
            advantages = [0.0] * len(prompts)
        else:
            advantages = self._sequence_advantages(rewards, group_ids, completions, credits, greedy)
        rows = [self._row(p, c, lp, a, r) for p, c, lp, a, r
                in zip(prompts, completions, rollout.logprobs, advantages, rewards.tolist())]
        micro = cfg.train.micro_batch_size
        micro_batches = [_stack(rows[i: i + micro], self.device) for i in range(0, len(rows), micro)]
        scored_at = time.monotonic()
        self.annotate(micro_batches)
        if estimator.token_level and self.layout.is_last_stage:
            token_rewards = None if credits is None else self._label_credits(prompts, credits)
            assign_advantages(micro_batches, cfg.rollout, group=self.layout.dp_group, rank=self.layout.dp_rank,
                              group_ids=group_ids, group_size=group, token_rewards=token_rewards)
        if self.batch_needs().value_targets and cfg.model.value_head:
            for batch in micro_batches:
                value_targets(batch, cfg.rollout.advantage_estimator)
        metrics = self._rollout_metrics(rewards, completions, adv_metrics)
        metrics.update(self._mismatch_metrics(micro_batches))
        timings = {"time_rollout_s": generated - started, "time_reward_s": scored_at - generated,
                   "time_logprobs_s": time.monotonic() - scored_at,
                   "gen_tokens_per_s": rollout.stats["tokens"] / max(generated - started, 1e-9)}
        if "refit_s" in rollout.stats:  # an engine refit from the policy before generating
            timings.update(time_refit_s=rollout.stats["refit_s"], refit_mib=rollout.stats["refit_mib"])
        per_update = len(micro_batches) // cfg.rollout.updates_per_rollout
        updates = [(micro_batches[i: i + per_update], metrics) for i in range(0, len(micro_batches), per_update)]
        updates = updates * cfg.rollout.epochs
        # The rollout's phases are paid once, by the step that ran it.
        updates[0] = (updates[0][0], dict(metrics, **timings))
        return updates

    def _score(self, examples, completions: list[list[int]]):
        """Sequence rewards [rows] and, for a reward function that returns per-character credits,
        each completion token's credit (``token_credits``); the sequence reward is then the mean
        character credit."""
        group, eos = self.cfg.rollout.group_size, self.tokenizer.eos_id
        scored = [self._reward(ex, c) for ex, c in zip((ex for ex in examples for _ in range(group)), completions)]
        if not isinstance(scored[0], list):
            return torch.tensor(scored, dtype=torch.float32), None
        per_token = [token_credits(self.tokenizer.decode, c, credit, eos) for c, credit in zip(completions, scored)]
        return torch.tensor([sum(c) / len(c) for c in scored], dtype=torch.float32), per_token

    def _reward(self, example, completion: list[int]):
        """The reward function's score of one completion: a number or per-character credits."""
        text = self.tokenizer.decode(_strip_eos(completion, self.tokenizer.eos_id))
        return self.reward_fn(example.prompt, text, example.answer)

    def _greedy_rewards(self, examples, prompts: list[list[int]]) -> torch.Tensor:
        """[rows] reward of the greedy completion of each row's prompt (ReMax's baseline)."""
        greedy = self.rollout_source.generate(prompts, seed=0, greedy=True).completions
        scores = []
        for ex, c in zip(examples, greedy):
            score = self._reward(ex, c)
            scores.append(sum(score) / len(score) if isinstance(score, list) else score)
        return torch.tensor(scores, dtype=torch.float32).repeat_interleave(self.cfg.rollout.group_size)

    def _sequence_advantages(self, rewards, group_ids, completions, credits, greedy) -> list:
        """Advantages of a sequence-level estimator: a number per row, or per-token ones (token-level
        GRPO of the credits)."""
        cfg = self.cfg.rollout
        inputs = AdvantageInputs(rewards, group_ids, group_size=cfg.group_size, greedy_rewards=greedy,
                                 lengths=torch.tensor([len(c) for c in completions]))
        if credits is not None and cfg.advantage_estimator == "grpo":
            length = max(len(c) for c in credits)
            inputs.token_rewards = torch.zeros(len(credits), length)  # [rows, T]
            inputs.mask = torch.zeros(len(credits), length, dtype=torch.bool)
            for row, values in enumerate(credits):
                inputs.token_rewards[row, : len(values)] = torch.tensor(values)
                inputs.mask[row, : len(values)] = True
        advantages = estimate(cfg.advantage_estimator, inputs, cfg).advantages
        if advantages.dim() == 1:
            return advantages
        return [advantages[row, : len(v)] for row, v in enumerate(credits)]

    def _label_credits(self, prompts: list[list[int]], credits: list[list[float]]) -> torch.Tensor:
        """[rows, S] each completion token's credit at its label position (as ``_row`` lays rows out)."""
        out = torch.zeros(len(prompts), self.cfg.data.seq_length)
        for row, (prompt, values) in enumerate(zip(prompts, credits)):
            start = len(prompt) - 1
            out[row, start: start + len(values)] = torch.tensor(values)
        return out.to(self.device)

    def _row(self, prompt: list[int], completion: list[int], logprobs: list[float], advantage, reward: float) -> dict:
        length = self.cfg.data.seq_length
        full = prompt + completion
        tokens = torch.full((length,), self.tokenizer.pad_id, dtype=torch.long)
        tokens[: len(full)] = torch.tensor(full)
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        start = len(prompt) - 1  # position that predicts the first completion token
        labels[start: start + len(completion)] = torch.tensor(completion, dtype=torch.long)
        sampled = torch.zeros(length)  # [S] log-prob of each completion token when it was sampled
        sampled[start: start + len(completion)] = torch.tensor(logprobs)
        if isinstance(advantage, torch.Tensor):  # token-level: one advantage per completion token
            per_token = torch.zeros(length)
            per_token[start: start + len(completion)] = advantage
            advantage = per_token  # [S]
        else:
            advantage = torch.tensor(advantage)
        row = {"tokens": tokens, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).long(),
               "position_ids": torch.arange(length), "advantages": advantage,
               "rewards": torch.tensor(reward), "rollout_logprobs": sampled}
        if "behaviour_logprobs" in self.batch_needs().keys:
            row["behaviour_logprobs"] = sampled  # the loss's importance weights: old vs rollout engine
        return row

    def _rollout_metrics(self, rewards: torch.Tensor, completions: list[list[int]], adv_metrics) -> dict:
        """Global (all DP ranks) reward statistics; identical on every rank."""
        eos = self.tokenizer.eos_id
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        finished = torch.tensor([bool(c) and c[-1] == eos for c in completions], dtype=torch.float64)
        sums = torch.stack([
            rewards.double().sum(), rewards.double().pow(2).sum(), torch.tensor(float(rewards.numel())),
            lengths.sum(), finished.sum(), (rewards == 1.0).double().sum(),
            adv_metrics["zero_variance_groups"].value.double(), adv_metrics["groups"].value.double(),
        ])
        dist.all_reduce(sums, group=self.layout.dp_group)
        total, square, count, length, finished_n, solved, zero_var, groups = sums.tolist()
        mean = total / count
        return {
            "reward_mean": mean,
            "reward_std": math.sqrt(max(square / count - mean * mean, 0.0)),
            "solved_fraction": solved / count,
            "response_length": length / count,
            "finished_fraction": finished_n / count,
            "zero_variance_groups": zero_var,
            "groups": groups,
        }

    def _mismatch_metrics(self, micro_batches: list[dict]) -> dict:
        """Rollout engine vs trainer log-probs of the sampled tokens, over every response token.

        ``mismatch_logprob_max``/``_mean``: max and mean |engine − trainer|; ``mismatch_kl``: the
        k3 estimate of KL(engine || trainer) from the engine's samples; ``mismatch_outside_frac``
        and ``mismatch_outside_seq_frac``: tokens and sequences whose token weight exp(trainer −
        engine) lies outside [loss.is_low, loss.is_high]. Computed on the last stage (where the
        trainer's log-probs are), reduced over DP, identical on every rank.
        """
        low, high = getattr(self.cfg.loss, "is_low", 0.0), getattr(self.cfg.loss, "is_high", 2.0)
        sums = torch.zeros(5, dtype=torch.float64)  # |d| sum, k3 sum, tokens, outside tokens, outside seqs
        peak = torch.zeros(1, dtype=torch.float64)
        seqs = torch.zeros(1, dtype=torch.float64)
        if self.layout.is_last_stage:
            for batch in micro_batches:
                mask = (batch["labels"] != IGNORE_INDEX).cpu()
                log_w = (batch["old_logprobs"].cpu().double() - batch["rollout_logprobs"].cpu().double())
                log_w = torch.where(mask, log_w, torch.zeros_like(log_w))
                gap = log_w.abs()
                _, outside, seq_outside = LF.importance_weights(log_w, mask, correction="mask", low=low, high=high)
                sums += torch.stack([gap.sum(), (torch.expm1(log_w) - log_w).sum(), mask.sum().double(),
                                     outside.sum().double(), seq_outside.sum().double()])
                peak = torch.maximum(peak, gap.max().reshape(1))
                seqs += mask.any(-1).sum().double()
        sums = torch.cat([sums, seqs]).to(self.device)
        peak = peak.to(self.device)
        dist.all_reduce(sums, group=self.layout.dp_group)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.layout.dp_group)
        packed = torch.cat([sums, peak])
        if self.layout.pp > 1:
            dist.broadcast(packed, src=dist.get_global_rank(self.layout.pp_group, self.layout.pp - 1),
                           group=self.layout.pp_group)
        gap, k3, tokens, outside, seq_outside, seqs, peak = packed.tolist()
        tokens, seqs = max(tokens, 1.0), max(seqs, 1.0)
        return {"mismatch_logprob_max": peak, "mismatch_logprob_mean": gap / tokens, "mismatch_kl": k3 / tokens,
                "mismatch_outside_frac": outside / tokens, "mismatch_outside_seq_frac": seq_outside / seqs}

    # SFT warm-up ------------------------------------------------------------------------------

    def before_training(self) -> None:
        if self.step == 0 and self.cfg.rollout.sft_warmup_steps > 0 and not self._has_checkpoint():
            self._sft_warmup()

    def close(self) -> None:
        close = getattr(self.rollout_source, "close", None)
        if close is not None:  # an engine's processes end with the run
            close()

    def _has_checkpoint(self) -> bool:
        return (self.checkpoint_dir / "latest").exists()

    def _sft_warmup(self) -> None:
        """SFT steps on rollout.warmup_data; the reference then starts from the warmed-up policy."""
        cfg = self.cfg
        self.sft_steps(cfg.rollout.warmup_data, cfg.rollout.sft_warmup_steps, cfg.rollout.warmup_lr or cfg.optim.lr,
                       Path(cfg.log.output_dir) / "warmup_metrics.jsonl")
        if self.reference is not None:
            _copy_weights(self.model, self.reference)

    # Checkpoints also hold the reference (it is the post-warm-up policy) -------------------------

    def extra_models(self) -> dict[str, list]:
        return {"reference": self.reference} if self.reference is not None else {}


def _fit(prompt: list[int], room: int) -> list[int]:
    """Cut a prompt from the left (keeping its first, bos, token) to leave room for the response."""
    return prompt if len(prompt) <= room else prompt[:1] + prompt[len(prompt) - room + 1:]


def _strip_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def _stack(rows: list[dict], device) -> dict:
    return {key: torch.stack([row[key] for row in rows]).to(device) for key in rows[0]}


@torch.no_grad()
def _copy_weights(source_chunks: list, target_chunks: list) -> None:
    for source, target in zip(source_chunks, target_chunks):
        for (name, src), (_, dst) in zip(_named(source), _named(target)):
            dst.copy_(src)


def _named(chunk):
    return list(unwrap_ddp(chunk).named_parameters())
