"""Version shims for Megatron-Core, Transformer Engine and apex: the one place that knows them.

Transformer Engine (TE) and apex are optional. They are never imported at package import time:
callers ask ``te_available()`` / ``import_transformer_engine()`` at the point of use. A CPU machine
must not have TE at all, because even its bare meta package makes ``import megatron.core`` raise
(Megatron only catches ``ImportError``), so the check here catches every exception.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

# Megatron-Core releases mrl has been tested against. mrl reaches into a few Megatron internals
# (the RNG tracker, CUDA device literals on CPU, the schedules' loss scaling), so an untested
# release is refused instead of silently misbehaving.
MCORE_TESTED_VERSIONS: tuple[str, ...] = ("0.16.1",)

# Escape hatch for trying a new release on purpose; not for production runs.
ALLOW_UNTESTED_ENV = "MRL_ALLOW_UNTESTED_MEGATRON"


def megatron_version() -> str:
    """The installed megatron-core version string (e.g. ``"0.16.1"``)."""
    from megatron.core import package_info

    return package_info.__version__


def require_tested_megatron() -> str:
    """Return the installed megatron-core version, or raise if mrl was not tested against it."""
    found = megatron_version()
    if found not in MCORE_TESTED_VERSIONS and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise RuntimeError(
            f"mrl was tested with megatron-core {', '.join(MCORE_TESTED_VERSIONS)} but "
            f"megatron-core {found} is installed. Install megatron-core=="
            f"{MCORE_TESTED_VERSIONS[-1]}, or set {ALLOW_UNTESTED_ENV}=1 to try {found} anyway."
        )
    return found


@functools.lru_cache(maxsize=None)
def _probe(module: str) -> tuple[ModuleType | None, str]:
    """Import ``module`` if it is installed and importable; return (module, why-not)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:  # find_spec imports the parent package, which may be missing
        found = False
    if not found:
        return None, f"{module} is not installed"
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # a broken TE install raises RuntimeError, not ImportError
        return None, f"{module} is installed but fails to import ({type(exc).__name__}: {exc})"


def te_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports."""
    return _probe("transformer_engine.pytorch")[0] is not None


def fused_softmax_available() -> bool:
    """True when Megatron's fused masked-softmax CUDA extension (built with apex) imports; without it,
    ``masked_softmax_fusion`` fails at the first forward instead of falling back."""
    return _probe("scaled_masked_softmax_cuda")[0] is not None


def import_transformer_engine(purpose: str) -> ModuleType:
    """Import ``transformer_engine.pytorch`` for ``purpose`` or raise a clear ``RuntimeError``."""
    module, why = _probe("transformer_engine.pytorch")
    if module is None:
        raise RuntimeError(
            f"{purpose} needs NVIDIA Transformer Engine on a CUDA machine, but {why}. "
            "Install mrl with the 'gpu' extra (pip install 'mrl[gpu]') on a GPU node."
        )
    return module


def te_version() -> str | None:
    """Installed Transformer Engine version, or None."""
    module, _ = _probe("transformer_engine")
    return getattr(module, "__version__", None) if module is not None else None


def apex_available() -> bool:
    """True when NVIDIA apex (a source build) imports."""
    return _probe("apex")[0] is not None


def gpt_layer_spec(*, use_te: bool, normalization: str, qk_layernorm: bool, num_experts: int | None = None,
                   moe_grouped_gemm: bool = False):
    """Megatron-Core's GPT layer spec: Transformer Engine layers or its local (torch) layers; with
    ``num_experts`` a MoE layer (routed experts as sequential MLPs, or grouped GEMM with TE)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        import_transformer_engine("The Transformer Engine layer spec")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization=normalization, qk_layernorm=qk_layernorm
    )


def load_megatron_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` with two fixes for torch Adam (no TE/apex).

    megatron-core 0.16.1 restores torch Adam's per-parameter ``step`` from the param groups by
    assigning ONE tensor to every parameter's state. torch keeps that tensor shared, so each
    optimizer step then increments it once per parameter and Adam's bias correction goes wrong
    after a resume. The ``fully_reshardable`` load also copies every live state key from the
    checkpoint's per-parameter tensors, which do not carry ``step`` (``KeyError: 'step'``).
    Here the copy gets the already-restored ``step`` (a no-op), and the shared tensor is
    replaced by one tensor per parameter afterwards.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    for inner in inners:
        original = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if original is not None and not getattr(original, "_mrl_patched", False):
            inner._set_main_param_and_optimizer_states = _with_step(inner, original)
    optimizer.load_state_dict(state_dict)
    for inner in inners:
        torch_opt = getattr(inner, "optimizer", None)
        for state in (torch_opt.state.values() if torch_opt is not None else ()):
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()


def _with_step(inner, original):
    def set_states(model_param, tensors):
        group_index, group_order = inner.model_param_group_index_map[model_param]
        main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
        state = inner.optimizer.state.get(main_param, {})
        if "step" in state and "step" not in tensors:
            tensors = {**tensors, "step": state["step"].clone()}
        return original(model_param, tensors)

    set_states._mrl_patched = True
    return set_states


_MOE_TE_NAMES = ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                 "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                 "fused_topk_with_score_function", "fused_unpermute", "te_general_gemm")


def prepare_moe_without_te() -> None:
    """megatron-core 0.16.1's ``moe_utils`` leaves its Transformer Engine names undefined when TE is
    absent, yet tests ``te_general_gemm is not None`` in the router (``NameError`` on the first forward);
    define the missing names as None so the torch paths run."""
    from megatron.core.transformer.moe import moe_utils

    for name in _MOE_TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)
