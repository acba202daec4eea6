"""Every LR schedule and the weight-decay ramp against its formula; the scheduler's param groups."""

from __future__ import annotations

import math

import pytest

from mrl.train.schedules import Scheduler, SchedulerConfig, learning_rate, weight_decay

PEAK, FLOOR, W, TOTAL = 3e-4, 3e-5, 10, 110


def _lr(style, step, **kw):
    cfg = SchedulerConfig(style=style, warmup_steps=W, min_lr=FLOOR, **kw)
    return learning_rate(cfg, PEAK, step, TOTAL)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "quarter-cosine", "exponential",
                                   "inverse-sqrt", "wsd"])
def test_warmup_is_linear_and_reaches_the_peak(style):
    for k in range(W):
        assert _lr(style, k) == pytest.approx(PEAK * (k + 1) / W, rel=1e-12)


def test_constant():
    assert all(_lr("constant", s) == PEAK for s in range(W, TOTAL + 5))


def test_linear_formula():
    for t in range(0, TOTAL - W + 5):
        u = min(t / (TOTAL - W), 1.0)
        assert _lr("linear", W + t) == pytest.approx(FLOOR + (PEAK - FLOOR) * (1 - u), rel=1e-12)
    # η0·(1 − t/T) exactly when min_lr = 0
    cfg = SchedulerConfig(style="linear", warmup_steps=0)
    assert learning_rate(cfg, 1.0, 25, 100) == pytest.approx(0.75)


def test_cosine_is_half_period_down_to_min_lr():
    T = TOTAL - W
    for t in range(0, T + 5):
        u = min(t / T, 1.0)
        expected = FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * u))
        assert _lr("cosine", W + t) == pytest.approx(expected, rel=1e-12)
    assert _lr("cosine", W) == pytest.approx(PEAK)
    assert _lr("cosine", W + T // 2) == pytest.approx((PEAK + FLOOR) / 2)
    assert _lr("cosine", TOTAL) == pytest.approx(FLOOR)


def test_quarter_cosine_formula():
    cfg = SchedulerConfig(style="quarter-cosine", warmup_steps=0)
    for t in range(0, 101):
        assert learning_rate(cfg, 2.0, t, 100) == pytest.approx(2.0 * math.cos(math.pi * t / 200), abs=1e-15)


def test_exponential_formula_with_floor():
    cfg = SchedulerConfig(style="exponential", warmup_steps=0, gamma=0.9, min_lr=0.05)
    for t in range(40):
        assert learning_rate(cfg, 1.0, t, 100) == pytest.approx(max(0.05, 0.9**t), rel=1e-12)


def test_inverse_sqrt_formula():
    for step in range(W, TOTAL):
        assert _lr("inverse-sqrt", step) == pytest.approx(max(FLOOR, PEAK * math.sqrt(W / step)), rel=1e-12)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_warmup_stable_decay(shape):
    cfg = SchedulerConfig(style="wsd", warmup_steps=W, min_lr=FLOOR, wsd_decay_steps=20, wsd_decay_style=shape)
    T = TOTAL - W
    for t in range(T + 3):
        lr = learning_rate(cfg, PEAK, W + t, TOTAL)
        if t < T - 20:
            assert lr == PEAK
        else:
            v = min((t - (T - 20)) / 20, 1.0)
            s = 1 - v if shape == "linear" else 0.5 * (1 + math.cos(math.pi * v))
            assert lr == pytest.approx(FLOOR + (PEAK - FLOOR) * s, rel=1e-12)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_ramp(style):
    cfg = SchedulerConfig(wd_start=0.0, wd_end=0.1, wd_incr_steps=50, wd_incr_style=style)
    for step in range(60):
        u = min(step / 50, 1.0)
        frac = u if style == "linear" else 0.5 * (1 - math.cos(math.pi * u))
        assert weight_decay(cfg, 0.05, step) == pytest.approx(0.1 * frac, abs=1e-15)
    assert weight_decay(SchedulerConfig(), 0.05, 17) == 0.05


class _FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"lr_mult": 1.0, "wd_mult": 1.0}, {"lr_mult": 0.5, "wd_mult": 0.0}]


def test_scheduler_writes_multiplied_values_and_resumes():
    opt = _FakeOptimizer()
    cfg = SchedulerConfig(style="linear", warmup_steps=0)
    sched = Scheduler(cfg, opt, 1.0, 0.1, 10)
    for _ in range(3):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.7)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.35)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    other = Scheduler(cfg, _FakeOptimizer(), 1.0, 0.1, 10)
    other.load_state_dict(sched.state_dict())
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(0.7)


@pytest.mark.parametrize("field,value", [("warmup_steps", -1), ("gamma", 0.0), ("decay_steps", 0), ("min_lr", -1.0)])
def test_invalid_schedule_fields_are_named(field, value):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SchedulerConfig(**{field: value})
