"""Learning-rate and weight-decay schedules.

All LR schedules start with a linear warmup over ``W`` steps: step ``k < W`` uses
``warmup_init_lr + (η0 − warmup_init_lr)·(k+1)/W``, so the first step already moves and step
``W − 1`` reaches the peak ``η0``. After warmup, with ``t = step − W`` and ``T = decay_steps`` (default: total − W), ``m`` the
floor ``min_lr`` and ``u = min(t/T, 1)``:

==================  =========================================================
constant            η = η0
linear              η = m + (η0 − m)·(1 − u)                (= η0·(1−t/T) for m = 0)
cosine              η = m + (η0 − m)·½(1 + cos(π·u))        (half period)
quarter-cosine      η = m + (η0 − m)·cos(π·u/2)             (= η0·cos(πt/2T) for m = 0)
exponential         η = max(m, η0·γ^t)
inverse-sqrt        η = max(m, η0·√(max(W,1) / max(step, W, 1)))
wsd                 η = η0 until the last ``wsd_decay_steps`` of T, then linear or cosine to m
==================  =========================================================

Weight decay ramps from ``start`` to ``end`` over ``incr_steps`` (constant, linear or cosine).
``Scheduler`` writes ``lr·lr_mult`` and ``wd·wd_mult`` into each optimizer param group, so
Megatron's per-group multipliers (no decay on biases and norms) are honoured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

LRStyle = Literal["constant", "linear", "cosine", "quarter-cosine", "exponential", "inverse-sqrt", "wsd"]


@dataclass
class SchedulerConfig:
    """Learning-rate and weight-decay schedules (the peak LR is ``optim.lr``)."""

    style: LRStyle = "cosine"
    """LR decay after warmup: constant, linear, cosine, quarter-cosine, exponential, inverse-sqrt, wsd."""

    warmup_steps: int = 0
    """Steps of linear warmup from warmup_init_lr to the peak LR."""

    warmup_init_lr: float = 0.0
    """LR at step 0 of the warmup."""

    min_lr: float = 0.0
    """Floor of the decayed LR."""

    decay_steps: Optional[int] = None
    """Length T of the decay after warmup; None means the rest of training."""

    gamma: float = 0.99
    """exponential: per-step decay factor γ."""

    wsd_decay_steps: int = 0
    """wsd: steps at the end of the decay window spent annealing to min_lr."""

    wsd_decay_style: Literal["linear", "cosine"] = "linear"
    """wsd: shape of the final anneal."""

    wd_start: Optional[float] = None
    """Weight decay at step 0; None means optim.weight_decay (constant decay)."""

    wd_end: Optional[float] = None
    """Weight decay after wd_incr_steps; None means optim.weight_decay."""

    wd_incr_steps: int = 0
    """Steps over which weight decay moves from wd_start to wd_end."""

    wd_incr_style: Literal["constant", "linear", "cosine"] = "constant"
    """Weight-decay ramp shape."""

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "wsd_decay_steps", "wd_incr_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1 or null, got {self.decay_steps}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.min_lr < 0 or self.warmup_init_lr < 0:
            raise ValueError("min_lr and warmup_init_lr must be >= 0")


def learning_rate(cfg: SchedulerConfig, peak: float, step: int, total_steps: int) -> float:
    """The LR at optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.warmup_init_lr + (peak - cfg.warmup_init_lr) * (step + 1) / warmup
    t = step - warmup
    horizon = cfg.decay_steps or max(total_steps - warmup, 1)
    u = min(t / horizon, 1.0)
    floor = cfg.min_lr
    if cfg.style == "constant":
        return peak
    if cfg.style == "linear":
        return floor + (peak - floor) * (1.0 - u)
    if cfg.style == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * u))
    if cfg.style == "quarter-cosine":
        return floor + (peak - floor) * math.cos(0.5 * math.pi * u)
    if cfg.style == "exponential":
        return max(floor, peak * cfg.gamma**t)
    if cfg.style == "inverse-sqrt":
        return max(floor, peak * math.sqrt(max(warmup, 1) / max(step, warmup, 1)))
    if cfg.style == "wsd":
        anneal_start = horizon - cfg.wsd_decay_steps
        if t < anneal_start or cfg.wsd_decay_steps == 0:
            return peak
        v = min((t - anneal_start) / cfg.wsd_decay_steps, 1.0)
        shape = 1.0 - v if cfg.wsd_decay_style == "linear" else 0.5 * (1.0 + math.cos(math.pi * v))
        return floor + (peak - floor) * shape
    raise ValueError(f"unknown scheduler.style {cfg.style!r}")


def weight_decay(cfg: SchedulerConfig, base: float, step: int) -> float:
    """The weight decay at ``step``: ``base`` unless a ramp is configured."""
    start = base if cfg.wd_start is None else cfg.wd_start
    end = base if cfg.wd_end is None else cfg.wd_end
    if cfg.wd_incr_style == "constant":
        return start
    if cfg.wd_incr_steps == 0:
        return end
    u = min(step / cfg.wd_incr_steps, 1.0)
    if cfg.wd_incr_style == "linear":
        return start + (end - start) * u
    return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * u))


class Scheduler:
    """Applies the schedules to an optimizer's param groups; its state is the step count."""

    def __init__(self, cfg: SchedulerConfig, optimizer, peak_lr: float, base_wd: float, total_steps: int):
        self.cfg = cfg
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.base_wd = base_wd
        self.total_steps = total_steps
        self.step_count = 0
        self.apply()

    @property
    def lr(self) -> float:
        return learning_rate(self.cfg, self.peak_lr, self.step_count, self.total_steps)

    @property
    def wd(self) -> float:
        return weight_decay(self.cfg, self.base_wd, self.step_count)

    def apply(self) -> None:
        lr, wd = self.lr, self.wd
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.apply()
