"""Verifiable tasks with partial-credit rewards, and loading user reward functions.

A reward function is called as ``fn(prompt, completion, answer)`` (or ``fn(prompt, completion)``
when it takes two arguments) and returns a finite number; ``answer`` is the prompt record's
'answer' field or None. ``load_reward_fn("package.module:function")`` loads one.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class TaskPrompt:
    prompt: str
    answer: str


class ReverseWordTask:
    """Reverse a random lowercase word: prompt ``"reverse abc="``, answer ``"cba"``.

    Reward (Wordle-style partial credit), with c the completion's first line stripped of
    surrounding whitespace and a the answer:

        reward = (exact + 0.5·misplaced) / max(|c|, |a|)

    exact counts positions i with c[i] = a[i]; misplaced counts the other characters of c that
    still occur in a after removing the exact matches (as a multiset). So the reward is 1 only
    for the exact answer, a copy of the word scores above random text, and a random model's
    completions get small, varying rewards.
    """

    PATTERN = re.compile(r"reverse ([a-z]+)=")

    def __init__(self, min_length: int = 3, max_length: int = 5,
                 alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> None:
        if not 1 <= min_length <= max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        if not alphabet or not set(alphabet) <= set("abcdefghijklmnopqrstuvwxyz"):
            raise ValueError(f"alphabet must be non-empty lowercase letters, got {alphabet!r}")
        self.min_length, self.max_length, self.alphabet = min_length, max_length, alphabet

    def make(self, word: str) -> TaskPrompt:
        return TaskPrompt(f"reverse {word}=", word[::-1])

    def random_word(self, rng: random.Random) -> str:
        length = rng.randint(self.min_length, self.max_length)
        return "".join(rng.choice(self.alphabet) for _ in range(length))

    def prompts(self, n: int, seed: int) -> list[TaskPrompt]:
        """``n`` prompts with their answers, deterministic in ``seed``."""
        rng = random.Random(seed)
        return [self.make(self.random_word(rng)) for _ in range(n)]

    def answer_for(self, prompt: str) -> str:
        match = self.PATTERN.fullmatch(prompt)
        if match is None:
            raise ValueError(f"not a reverse-word prompt: {prompt!r}")
        return match.group(1)[::-1]

    def reward(self, prompt: str, completion: str, answer: Optional[str] = None) -> float:
        """Partial credit in [0, 1]; see the class docstring."""
        target = self.answer_for(prompt) if answer is None else answer
        lines = completion.strip().splitlines()
        text = lines[0].strip() if lines else ""
        return partial_credit(text, target)


def partial_credit(text: str, target: str) -> float:
    """(exact + 0.5·misplaced) / max(|text|, |target|); 0 when both are empty."""
    longest = max(len(text), len(target))
    if longest == 0:
        return 0.0
    exact = [i for i in range(min(len(text), len(target))) if text[i] == target[i]]
    exact_set = set(exact)
    left = Counter(c for i, c in enumerate(target) if i not in exact_set)
    misplaced = 0
    for i, c in enumerate(text):
        if i not in exact_set and left[c] > 0:
            left[c] -= 1
            misplaced += 1
    return (len(exact) + 0.5 * misplaced) / longest


def character_credit(text: str, target: str) -> list[float]:
    """Per-character partial credit: 1 exact, 0.5 misplaced (as in ``partial_credit``), else 0,
    plus a last entry for the end of the answer: 1 when ``text`` has the target's length.

    The mean over the characters equals ``partial_credit`` when the lengths agree.
    """
    exact = {i for i in range(min(len(text), len(target))) if text[i] == target[i]}
    left = Counter(c for i, c in enumerate(target) if i not in exact)
    credits = []
    for i, c in enumerate(text):
        if i in exact:
            credits.append(1.0)
        elif left[c] > 0:
            left[c] -= 1
            credits.append(0.5)
        else:
            credits.append(0.0)
    return credits + [1.0 if len(text) == len(target) else 0.0]


def reverse_word_reward(prompt: str, completion: str, answer: Optional[str] = None) -> float:
    """The default ``ReverseWordTask`` reward, loadable as 'mrl.data.tasks:reverse_word_reward'."""
    return ReverseWordTask().reward(prompt, completion, answer)


def reverse_word_credit(prompt: str, completion: str, answer: Optional[str] = None) -> list[float]:
    """Per-character credit of a ``ReverseWordTask`` completion (``character_credit``), for
    token-level GRPO: loadable as 'mrl.data.tasks:reverse_word_credit'."""
    target = ReverseWordTask().answer_for(prompt) if answer is None else answer
    return character_credit(completion, target)


class RewardFunction:
    """A user reward function loaded from 'package.module:function', with checked results."""

    def __init__(self, spec: str) -> None:
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"a reward function is given as 'package.module:function', got {spec!r}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ImportError(f"cannot import module {module_name!r} of reward function {spec!r}: {err}") from err
        fn: Any = module
        for part in attr.split("."):
            if not hasattr(fn, part):
                raise AttributeError(f"module {module_name!r} has no attribute {attr!r} (reward function {spec!r})")
            fn = getattr(fn, part)
        if not callable(fn):
            raise TypeError(f"reward function {spec!r} is not callable")
        self.spec = spec
        self.fn: Callable[..., Any] = fn
        self.takes_answer = _accepts(fn, 3)
        if not self.takes_answer and not _accepts(fn, 2):
            raise TypeError(f"reward function {spec!r} must accept (prompt, completion[, answer])")

    def __call__(self, prompt: str, completion: str, answer: Any = None) -> float | list[float]:
        """The reward: one number (outcome reward), or a list of per-character credits (one per
        character of ``completion`` plus one for its end) for token-level advantages."""
        value = self.fn(prompt, completion, answer) if self.takes_answer else self.fn(prompt, completion)
        if isinstance(value, (list, tuple)):
            if len(value) != len(completion) + 1 or not all(_finite_number(v) for v in value):
                raise ValueError(
                    f"reward function {self.spec!r} returned {len(value)} credits for a completion of "
                    f"{len(completion)} characters; expected {len(completion) + 1} finite numbers "
                    "(one per character and one for the end)"
                )
            return [float(v) for v in value]
        if not _finite_number(value):
            raise ValueError(f"reward function {self.spec!r} returned {value!r}; expected a finite number")
        return float(value)


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _accepts(fn: Callable[..., Any], count: int) -> bool:
    try:
        inspect.signature(fn).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): assume the full form
        return count == 3
    return True


def load_reward_fn(spec: str) -> RewardFunction:
    """Load 'package.module:function' (e.g. 'mrl.data.tasks:reverse_word_reward')."""
    return RewardFunction(spec)
