"""Regenerate the embedded reverse-word datasets (deterministic; no downloads).

    python -m mrl.data.builtin.make_builtin [--out DIR]

Files (one JSON object per line):
  reverse_sft.jsonl         2000 {"prompt", "response"}  SFT demonstrations
  reverse_preference.jsonl  1000 {"prompt", "chosen", "rejected"}  rejected = a near miss
  reverse_prompts.jsonl      500 {"prompt", "answer"}  prompts for online GRPO (other seed)
  reverse_rollout.jsonl       64 {"prompt", "responses", "rewards"}  offline groups of 4
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mrl.data.tasks import ReverseWordTask

SIZES = {"sft": 2000, "preference": 1000, "prompts": 500, "rollout": 64}
SEEDS = {"sft": 1, "preference": 2, "prompts": 3, "rollout": 4}
ROLLOUT_GROUP = 4


def near_miss(answer: str, rng: random.Random, alphabet: str) -> str:
    """A wrong answer close to ``answer``: unreversed, two letters swapped, one replaced, or cut."""
    kind = rng.choice(("copy", "swap", "replace", "cut"))
    if kind == "copy":
        wrong = answer[::-1]
    elif kind == "swap":
        i = rng.randrange(len(answer) - 1)
        wrong = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
    elif kind == "cut":
        wrong = answer[:-1]
    else:
        wrong = answer
    if wrong == answer:  # "replace", or a copy/swap that changed nothing
        i = rng.randrange(len(answer))
        letter = rng.choice([c for c in alphabet if c != answer[i]])
        wrong = answer[:i] + letter + answer[i + 1:]
    return wrong


def records(task: ReverseWordTask) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    out["sft"] = [{"prompt": p.prompt, "response": p.answer}
                  for p in task.prompts(SIZES["sft"], SEEDS["sft"])]
    rng = random.Random(SEEDS["preference"] + 100)
    out["preference"] = [
        {"prompt": p.prompt, "chosen": p.answer, "rejected": near_miss(p.answer, rng, task.alphabet)}
        for p in task.prompts(SIZES["preference"], SEEDS["preference"])
    ]
    out["prompts"] = [{"prompt": p.prompt, "answer": p.answer}
                      for p in task.prompts(SIZES["prompts"], SEEDS["prompts"])]
    rng = random.Random(SEEDS["rollout"] + 100)
    out["rollout"] = []
    for p in task.prompts(SIZES["rollout"], SEEDS["rollout"]):
        responses = [p.answer if rng.random() < 0.25 else near_miss(p.answer, rng, task.alphabet)
                     for _ in range(ROLLOUT_GROUP)]
        out["rollout"].append({"prompt": p.prompt, "responses": responses,
                               "rewards": [task.reward(p.prompt, r) for r in responses]})
    return out


def write(out_dir: Path) -> list[Path]:
    """Write the four files into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in records(ReverseWordTask()).items():
        path = out_dir / f"reverse_{name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, separators=(", ", ": ")) + "\n")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output directory")
    for path in write(parser.parse_args().out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
