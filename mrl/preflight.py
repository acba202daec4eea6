"""Checks that need more than the recipe itself: its data files and the optional packages it uses.

``mrl validate`` runs them, and so does ``mrl train`` before it starts any rank: a missing or empty
file, malformed records, missing fields or over-long records (every one, with file:line) and a
missing package come back as one message in seconds, instead of as an error on every rank after
the model was built.
"""

from __future__ import annotations

import importlib.util

from mrl.job import JobConfig


def missing_packages(cfg: JobConfig) -> list[str]:
    """One line for each optional package the recipe needs and this interpreter lacks."""
    from mrl.model.hf import is_hf_model_dir

    needs: list[tuple[str, str, str]] = []  # (module, the setting that needs it, how to install)
    if cfg.log.tensorboard:
        needs.append(("tensorboard", "log.tensorboard=true", "pip install 'mrl[tensorboard]'"))
    if cfg.log.wandb:
        needs.append(("wandb", "log.wandb=true", "pip install 'mrl[wandb]'"))
    if cfg.log.mlflow:
        needs.append(("mlflow", "log.mlflow=true", "pip install 'mrl[mlflow]'"))
    if cfg.data.tokenizer != "byte":
        needs.append(("tokenizers", f"data.tokenizer={cfg.data.tokenizer}", "pip install 'mrl[hf]'"))
    sources = [("train.init_checkpoint", cfg.train.init_checkpoint)]
    if cfg.reference.source == "checkpoint":
        sources.append(("reference.checkpoint", cfg.reference.checkpoint))
    for name, source in sources:
        if source and is_hf_model_dir(source):
            needs.append(("safetensors", f"{name}={source} (a Hugging Face directory)", "pip install 'mrl[hf]'"))
    if cfg.algorithm == "grpo" and getattr(cfg.rollout, "engine", "megatron") == "vllm":
        needs.append(("vllm", "rollout.engine=vllm",
                      "pip install 'mrl[vllm]' on a GPU machine; on CPU, make venv-vllm builds .venv-vllm "
                      "with vLLM's CPU build (run mrl from there)"))
    return [f"{setting} needs the '{module}' package, which this Python ({_python()}) lacks: {how}"
            for module, setting, how in needs if importlib.util.find_spec(module) is None]


def data_problems(cfg: JobConfig) -> list[str]:
    """Every problem of the recipe's data files (each file is read whole, as the ranks would)."""
    from mrl.data import DataError, build_dataset, build_tokenizer

    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
    except (ValueError, OSError, ImportError) as exc:
        return [f"data.tokenizer={cfg.data.tokenizer}: {exc}"]
    sources = [("data", cfg.data)]
    if cfg.algorithm == "grpo" and cfg.rollout.sft_warmup_steps > 0:
        sources.append(("rollout.warmup_data", cfg.rollout.warmup_data))
    problems = []
    for name, data in sources:
        try:
            build_dataset(data, tokenizer)
        except DataError as exc:
            problems.append(f"{name}: {exc}")
    return problems


def preflight(cfg: JobConfig) -> None:
    """Raise one ``ValueError`` listing every missing package and data problem of ``cfg``."""
    packages = missing_packages(cfg)
    problems = packages + (data_problems(cfg) if not any("tokenizers" in p for p in packages) else [])
    if problems:
        raise ValueError("\n".join(problems))


def _python() -> str:
    import sys

    return sys.executable
