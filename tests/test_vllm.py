"""``rollout.engine: vllm`` on CPU: a real vLLM engine refit in place from the policy's shards.

The proof that a refit is complete: after every optimizer step, the engine's log-prob of each token
it sampled equals the trainer's recomputed log-prob within 1e-5 (fp32), for every response token of
every rollout (``mismatch_logprob_max``). A stale, missing or misnamed tensor shows up there. The
engine's KV blocks hold 32 tokens (the smallest the CPU attention takes; its default is 128) and
every prompt starts with the same 60-odd tokens, so every rollout after the first finds whole
prompt blocks in the prefix cache: without the reset after each refit they would hold KV of the
old weights (off by up to a nat here).

Needs vLLM (``make venv-vllm``: the CPU build in .venv-vllm); skipped where it does not import.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make venv-vllm; make test-vllm)")

from tests.test_run_control import clean_env  # noqa: E402
from tests.test_trainer import _trainer  # noqa: E402

RECIPE = "configs/grpo-tiny-cpu.yaml"
PREFIX = "Spell the word backwards, one letter after another, then stop. "
BLOCK = 32  # tokens per KV block of the engine (rollout.vllm.block_size)


def _prompt_file(tmp_path: Path) -> str:
    rng = random.Random(0)
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as handle:
        for _ in range(64):
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
            handle.write(json.dumps({"prompt": f"{PREFIX}reverse {word}=", "answer": word[::-1]}) + "\n")
    assert len(PREFIX.encode()) > BLOCK  # byte tokenizer: a whole block of every prompt is shared
    return str(path)


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return ["rollout.sft_warmup_steps=0", "train.steps=3", "train.global_batch_size=16",
            "train.micro_batch_size=4", "rollout.group_size=4", "rollout.max_new_tokens=6",
            "rollout.epochs=1", "log.progress=false", "precision.dtype=fp32", "optim.lr=1.0e-3",
            "rollout.engine=vllm", "rollout.vllm.dtype=fp32", f"rollout.vllm.block_size={BLOCK}",
            f"data.path={_prompt_file(tmp_path)}",
            "data.seq_length=96", "model.max_sequence_length=96", *extra]


def _own_processes() -> dict[int, str]:
    """This rank's descendants, less Python's resource tracker (a helper that ends with the rank)."""
    import psutil

    own = {}
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
            if "resource_tracker" not in command:
                own[process.pid] = command[:120]
        except psutil.NoSuchProcess:
            pass
    return own


def _left(before: dict[int, str]) -> list[str]:
    return [f"{pid}: {command}" for pid, command in _own_processes().items() if pid not in before]


def _engine_processes(source) -> list[int]:
    """The engine's processes (its core and workers) on the replica's first rank."""
    import psutil

    engine = getattr(source, "engine", None)
    if engine is None:
        return []
    pids = set(engine.pids)
    for pid in engine.pids:
        pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    return sorted(pids)


def _alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def case_grpo(overrides: list[str], output_dir: str) -> dict:
    # The replica's other ranks wait in a collective while its first rank starts vLLM (17-45 s on
    # a quiet machine, minutes on a loaded one): a longer collective timeout than the other tests use.
    trainer = _trainer(RECIPE, overrides, output_dir, timeout_minutes=10)
    engine = _engine_processes(trainer.rollout_source)
    results = trainer.train()  # closes the engine at the end
    return {"losses": [r.loss for r in results], "engine": engine, "left": _alive(engine)}


LAYOUTS2 = {
    # trainer TP2, one engine (TP1); untied embeddings, GQA, q/k/v biases (a Qwen2 config)
    "tp2-engine-tp1-gqa-qkv-bias": ["parallel.tp=2", "parallel.pp=1", "model.num_query_groups=2",
                                    "model.add_qkv_bias=true"],
    # trainer TP1 x DP2: two engines, one per replica; tied embeddings
    "tp1xdp2-engine-tp1-tied": ["parallel.tp=1", "parallel.pp=1", "model.tie_embeddings=true"],
    # trainer PP2, engine TP2; qk-norm (a Qwen3 config)
    "pp2-engine-tp2-qk-norm": ["parallel.tp=1", "parallel.pp=2", "rollout.vllm.tensor_parallel_size=2",
                               "model.qk_layernorm=true"],
}
LAYOUTS4 = {
    # trainer TP2 x PP2, engine TP2; tied embeddings across stages, GQA, q/k/v biases
    "tp2xpp2-engine-tp2-tied-gqa-qkv-bias": ["parallel.tp=2", "parallel.pp=2", "rollout.vllm.tensor_parallel_size=2",
                                             "model.tie_embeddings=true", "model.num_query_groups=2",
                                             "model.add_qkv_bias=true"],
}


def _check_run(results: list[dict], output_dir: Path, engines: int) -> None:
    assert sum(len(r["engine"]) > 0 for r in results) == engines  # one engine per replica, on its first rank
    for result in results:
        assert len(result["losses"]) == 3
        assert result["left"] == [], f"engine processes left behind: {result['left']}"
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:  # one refit before every rollout, after every optimizer step
        assert record["mismatch_logprob_max"] <= 1e-5, record
        assert record["mismatch_kl"] <= 1e-9, record
        assert record["refit_mib"] > 0.05 and record["time_refit_s"] > 0
        assert record["mismatch_outside_frac"] == 0.0
    assert records[0]["approx_kl"] >= 0.0


@pytest.mark.parametrize("name", list(LAYOUTS2))
def test_engine_logprobs_equal_the_trainers_after_every_refit_2ranks(ranks2, tmp_path, name):
    results = ranks2.run(case_grpo, _overrides(tmp_path, *LAYOUTS2[name]), str(tmp_path / "run"), timeout=600)
    _check_run(results, tmp_path / "run", engines=2 if "dp2" in name else 1)


@pytest.mark.parametrize("name", list(LAYOUTS4))
def test_engine_logprobs_equal_the_trainers_after_every_refit_4ranks(ranks4, tmp_path, name):
    results = ranks4.run(case_grpo, _overrides(tmp_path, *LAYOUTS4[name]), str(tmp_path / "run"), timeout=600)
    _check_run(results, tmp_path / "run", engines=1)


# ---- failures ------------------------------------------------------------------------------------

def case_start_fails(overrides: list[str], output_dir: str) -> dict:
    from mrl.rl.vllm_engine import RolloutEngineError

    import glob
    import tempfile

    pattern = f"{tempfile.gettempdir()}/mrl-vllm-*"
    before, dirs = _own_processes(), set(glob.glob(pattern))
    try:
        _trainer(RECIPE, overrides, output_dir, timeout_minutes=10)
        error = None
    except RolloutEngineError as exc:
        error = str(exc)
    return {"error": error, "left": _left(before), "workdirs": sorted(set(glob.glob(pattern)) - dirs)}


@pytest.mark.parametrize("setting, message", [
    # vLLM's workers start, then refuse the KV block size (CPU attention takes multiples of 32)
    ("rollout.vllm.block_size=8", "did not start"),
    ("rollout.vllm.start_timeout_s=2", "no engine within rollout.vllm.start_timeout_s=2"),
])
def test_an_engine_that_does_not_start_stops_every_rank_and_leaves_no_process(ranks2, tmp_path, setting, message):
    overrides = _overrides(tmp_path, "parallel.tp=2", "parallel.pp=1", setting)
    for result in ranks2.run(case_start_fails, overrides, str(tmp_path / "run"), timeout=300):
        assert result["error"] is not None and message in result["error"], result["error"]
        assert result["workdirs"] == [], result["workdirs"]  # the engine's config directory is gone too
        assert "replica 0" in result["error"]
        assert result["left"] == [], f"processes left behind: {result['left']}"


def case_refit_fails(overrides: list[str], output_dir: str) -> dict:
    """The engine's processes die between two rollouts: the next refit must fail on every rank."""
    from mrl.rl.vllm_engine import RolloutEngineError

    before = _own_processes()
    trainer = _trainer(RECIPE, overrides, output_dir, timeout_minutes=10)
    source = trainer.rollout_source
    prompts = [[1] + list(range(40, 80))] * 4
    first = source.generate(prompts, seed=1)
    if source.engine is not None:
        source.engine._kill_processes()  # as if the machine killed them (out of memory, ...)
    try:
        source.generate(prompts, seed=2)
        error = None
    except RolloutEngineError as exc:
        error = str(exc)
    return {"first": len(first.completions), "error": error, "left": _left(before)}


def test_a_refit_that_fails_stops_every_rank_and_leaves_no_process(ranks2, tmp_path):
    overrides = _overrides(tmp_path, "parallel.tp=2", "parallel.pp=1", "rollout.vllm.refit_timeout_s=60")
    for result in ranks2.run(case_refit_fails, overrides, str(tmp_path / "run"), timeout=300):
        assert result["first"] == 4
        assert result["error"] is not None and "refit failed in the vLLM engine" in result["error"], result["error"]
        assert result["left"] == [], f"processes left behind: {result['left']}"


def test_a_rank_killed_under_torchrun_takes_its_engine_with_it(tmp_path):
    """SIGKILL of the engine's host rank outside mrl's own spawner (here torchrun, which only
    watches its direct workers): the engine's processes and its files must not outlive the rank."""
    import glob
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import psutil

    overrides = _overrides(tmp_path, "parallel.tp=1", "parallel.pp=1", "train.steps=50",
                           "train.global_batch_size=4", "train.micro_batch_size=4", "rollout.group_size=4",
                           f"log.output_dir={tmp_path / 'run'}", "log.progress=true")
    log = tmp_path / "torchrun.out"
    pattern = f"{tempfile.gettempdir()}/mrl-vllm-*"
    dirs_before = set(glob.glob(pattern))
    with open(log, "w") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                     "--nproc-per-node=1", "--max-restarts=0", "-m", "mrl", "train", RECIPE,
                                     *overrides], cwd=Path(__file__).resolve().parents[1], env=clean_env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    engine: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while "engine ready" not in log.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        (rank,) = [p for p in psutil.Process(launcher.pid).children() if "mrl" in " ".join(p.cmdline())]
        engine = [p.pid for p in rank.children(recursive=True) if "mrl.processes" not in " ".join(p.cmdline())]
        assert engine, "no engine process under the rank"
        workdirs = sorted(set(glob.glob(pattern)) - dirs_before)
        assert len(workdirs) == 1, workdirs
        rank.send_signal(signal.SIGKILL)
        launcher.wait(timeout=120)
        deadline = time.monotonic() + 30
        while (_alive(engine) or Path(workdirs[0]).exists()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(engine) == [], f"engine processes outlived their rank: {_alive(engine)}"
        assert not Path(workdirs[0]).exists(), "the engine's files outlived their rank"
    finally:
        for pid in [launcher.pid, *engine]:
            try:
                os.kill(pid, signal.SIGKILL)  # torchrun starts its workers in sessions of their own
            except ProcessLookupError:
                pass
