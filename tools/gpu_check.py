"""Check a single-GPU machine in one call: the CUDA tests and the numbers only a GPU can give.

    python tools/gpu_check.py --out DIR [--dry-run] [--budget-s 480] [--wheels gpu-wheels] [--time-scale 1]

Each step runs in its own subprocess with its own time box; a step that would not fit in what is
left of ``--budget-s`` is skipped, so the whole call ends within it (8 minutes by default).
``--time-scale`` multiplies every step's budget (a slow or loaded machine; the whole budget stays):

==========  ======  ===========================================================================
step        budget  what
==========  ======  ===========================================================================
setup         40 s  probe Python, torch, CUDA and Megatron-Core; install megatron-core from the
                    wheels in ``--wheels`` (``make gpu-wheels``) into a private folder when it
                    does not import
gpu-tests     70 s  ``pytest -m gpu`` over the GPU test files (Transformer Engine tests skip with a reason)
vocab-ops     60 s  ``tools/bench_vocab_ops.py --device cuda``: the ops against the bandwidth floor
fused-head    60 s  ``tools/bench_fused_head.py --device cuda`` (skipped while the file is absent)
train-step   140 s  ``tools/bench_train_step.py --device cuda --size 1b``: one bf16 step of a 1.1B
                    model with local layers: tokens/s, MFU, peak memory
rollout       90 s  ``tools/bench_rollout.py --device cuda``: the KV-cached sampler's tokens/s
                    (skipped while the file is absent)
==========  ======  ===========================================================================

``DIR`` receives ``summary.json`` (every step's status, reason, duration, time box, command and
parsed numbers, and the environment), ``summary.txt`` (a short table, also printed) and one
``<step>.log`` per step that ran: eight files at most. A status is ``ok``, ``failed``, ``skipped`` (with the reason) or
``timeout``; nothing that did not run has numbers. Exit status 0 when no step failed or timed out.

``--dry-run`` checks this script's own logic on any machine: the child steps see no GPU
(``CUDA_VISIBLE_DEVICES=``), the setup probe and the wheel discovery run for real, the GPU tests run
(and all skip), the CUDA benchmarks are skipped with a reason, and the train step runs for real at
``--size tiny --device cpu``.

A benchmark may print one line ``SUMMARY {json}``; its numbers are taken as they are. Otherwise the
numbers come from its known output (``bench_vocab_ops.py``) or from lines ending in a value with
a unit (tokens/s, TFLOP/s, GB/s, GiB, ms).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_parse import (  # noqa: E402
    junit_outcome,
    last_error_line,
    parse_summary_line,
    parse_unit_numbers,
    parse_vocab_ops,
)

REPO = Path(__file__).resolve().parents[1]
MEGATRON_VERSION = "0.16.1"
# Modules mrl and its GPU tests import besides torch and Megatron-Core (pip name in brackets).
REQUIRED_MODULES = {"numpy": "numpy", "yaml": "pyyaml", "psutil": "psutil", "packaging": "packaging",
                    "pytest": "pytest"}
MIN_BOX_S = 10.0  # a step is not started with less time than this left
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL this much later


@dataclass
class Context:
    """What every step needs: where things are, the children's environment, the deadline."""

    out: Path
    wheels: Path
    site: Path
    dry_run: bool
    deadline: float
    time_scale: float = 1.0
    python: str = sys.executable
    env: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    setup_error: str | None = None


@dataclass
class Outcome:
    """What a step reports: status, reason, parsed numbers, and anything worth keeping."""

    status: str
    reason: str | None = None
    numbers: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    command: list[str] | None = None
    log: str | None = None


@dataclass
class Step:
    name: str
    budget_s: float
    what: str
    run: Callable[[Context, float], Outcome]
    headline: Callable[[Outcome], str]


def main() -> int:
    args = _parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for step in STEPS:  # logs are appended to: start from none
        (args.out / f"{step.name}.log").unlink(missing_ok=True)
    started = time.monotonic()
    ctx = Context(out=args.out, wheels=args.wheels, site=args.site, dry_run=args.dry_run,
                  deadline=started + args.budget_s, time_scale=args.time_scale, env=_child_env(args.dry_run))
    results = [run_step(step, ctx) for step in STEPS]
    summary = write_summary(ctx, results, args.budget_s, time.monotonic() - started)
    print((ctx.out / "summary.txt").read_text(), end="")
    return 0 if summary["ok"] else 1


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.json, summary.txt, logs")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: check this script's logic on CPU")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole call's limit (default 480)")
    parser.add_argument("--wheels", type=Path, default=REPO / "gpu-wheels", help="wheels from make gpu-wheels")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "mrl-gpu-check-site",
                        help="where missing packages are installed (pip --target)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply each step's budget (default 1)")
    args = parser.parse_args()
    if args.budget_s <= MIN_BOX_S:
        parser.error(f"--budget-s must be more than {MIN_BOX_S:.0f}")
    if args.time_scale <= 0:
        parser.error("--time-scale must be > 0")
    return args


def _child_env(dry_run: bool) -> dict:
    """The environment of every step: the repository importable, output unbuffered, no GPU in a dry run."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# Running steps ----------------------------------------------------------------------------------


def run_step(step: Step, ctx: Context) -> dict:
    """Run one step in its time box (or skip it) and return its record for the summary."""
    left = ctx.deadline - time.monotonic()
    box = min(step.budget_s * ctx.time_scale, left)
    started = time.monotonic()
    if step.name != "setup" and ctx.setup_error:
        outcome = Outcome("skipped", "setup failed")
    elif box < MIN_BOX_S:
        outcome = Outcome("skipped", f"the total budget is spent ({left:.0f} s left, {MIN_BOX_S:.0f} s needed)")
    else:
        _say(f"{step.name}: {step.what} (time box {box:.0f} s)")
        try:
            outcome = step.run(ctx, box)
        except Exception as exc:  # a bug in a step's own logic must not hide the other steps
            outcome = Outcome("failed", f"{type(exc).__name__}: {exc}")
    seconds = time.monotonic() - started
    _say(f"{step.name}: {outcome.status}" + (f" ({outcome.reason})" if outcome.reason else ""))
    record = dict(name=step.name, status=outcome.status, reason=outcome.reason, seconds=round(seconds, 2),
                  budget_s=step.budget_s * ctx.time_scale, box_s=round(max(box, 0.0), 1), command=outcome.command,
                  log=outcome.log, numbers=outcome.numbers, details=outcome.details)
    ok_with_numbers = outcome.status == "ok" and (outcome.numbers or not outcome.reason)
    record["headline"] = step.headline(outcome) if ok_with_numbers else (outcome.reason or "")
    return record


@dataclass
class Completed:
    returncode: int | None
    output: str
    timed_out: bool
    log: str


def run_command(ctx: Context, name: str, argv: list[str], box_s: float) -> Completed:
    """Run ``argv`` from the repository root in its own process group, at most ``box_s`` seconds.

    Output is appended to ``<out>/<name>.log``. On timeout the whole group (spawned ranks included) gets
    SIGTERM, then SIGKILL after a grace period, so no child outlives its box.
    """
    log = ctx.out / f"{name}.log"
    with open(log, "a") as sink:
        sink.write("$ " + " ".join(a if len(a) < 200 else "<script>" for a in argv) + "\n")
        sink.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=ctx.env, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=box_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc, signal.SIGTERM)
            _wait(proc, KILL_GRACE_S)
        finally:
            _signal_group(proc, signal.SIGKILL)  # whatever is left: a stuck step, or its orphans
            _wait(proc, KILL_GRACE_S)
    return Completed(None if timed_out else proc.returncode, log.read_text(errors="replace"), timed_out, log.name)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is gone already
        pass


def _wait(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def command_outcome(done: Completed, argv: list[str], box_s: float, numbers: dict, ok_when: bool,
                    missing: str) -> Outcome:
    """The outcome of a step that ran one command: timeout, failed (with its last error) or ok."""
    if done.timed_out:
        return Outcome("timeout", f"stopped after its time box of {box_s:.0f} s", command=argv, log=done.log)
    if done.returncode != 0:
        return Outcome("failed", f"exit status {done.returncode}: {last_error_line(done.output)}",
                       command=argv, log=done.log)
    if not ok_when:
        return Outcome("failed", missing, numbers=numbers, command=argv, log=done.log)
    return Outcome("ok", numbers=numbers, command=argv, log=done.log)


def _say(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)


# Setup ------------------------------------------------------------------------------------------

PROBE = r"""
import importlib, json, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable, "modules": {}}
for name in sys.argv[1].split(","):
    try:
        info["modules"][name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as exc:
        info["modules"][name] = None
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
    if info["cuda"]:
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
except Exception as exc:
    info.update(torch=None, torch_error=f"{type(exc).__name__}: {exc}", cuda=False)
try:
    from megatron.core import package_info
    info["megatron_core"] = package_info.__version__
    import megatron.core
    info["megatron_core_path"] = megatron.core.__file__
except Exception as exc:
    info.update(megatron_core=None, megatron_error=f"{type(exc).__name__}: {exc}")
try:
    import mrl
    from mrl.compat import te_available
    info.update(mrl_path=mrl.__file__, transformer_engine=te_available())
except Exception as exc:
    info.update(mrl_path=None, mrl_error=f"{type(exc).__name__}: {exc}")
print("SUMMARY " + json.dumps(info))
"""


def setup(ctx: Context, box_s: float) -> Outcome:
    """Probe the environment; install megatron-core from the carried wheels if it does not import."""
    started = time.monotonic()
    wheels = discover_wheels(ctx.wheels)
    info, error = _probe(ctx, box_s)
    details = {"wheels": wheels}
    if info is not None and info.get("torch") is None:
        error = f"torch does not import: {info.get('torch_error')}"
    if error is None and install_needed(info):
        plan = install_plan(info, wheels, ctx.wheels)
        if isinstance(plan, str):
            return _setup_failed(ctx, plan, info, details)
        error = _install(ctx, plan, box_s - (time.monotonic() - started))
        if error is None:
            info, error = _probe(ctx, box_s - (time.monotonic() - started))
            details["installed"] = [Path(w).name for w in plan]
            if info is not None and install_needed(info):
                error = f"megatron-core still does not import after installing into {ctx.site}: {_why_no_megatron(info)}"
    if error is None:
        error = environment_error(info, ctx.dry_run)
    if error is not None:
        return _setup_failed(ctx, error, info, details)
    ctx.environment = info
    numbers = {"cuda": info["cuda"], "gpus": info.get("gpus", 0), "wheels_found": len(wheels),
               "wheels_usable": sum(w["usable"] for w in wheels)}
    details["summary"] = _environment_line(info, details)
    return Outcome("ok", numbers=numbers, details=details, command=[ctx.python, "-c", "<probe>"], log="setup.log")


def _setup_failed(ctx: Context, error: str, info: dict | None, details: dict) -> Outcome:
    ctx.setup_error = error
    ctx.environment = info or {}
    return Outcome("failed", error, details=details, log="setup.log")


def _probe(ctx: Context, box_s: float) -> tuple[dict | None, str | None]:
    argv = [ctx.python, "-c", PROBE, ",".join(REQUIRED_MODULES)]
    done = run_command(ctx, "setup", argv, max(box_s, 1.0))
    if done.timed_out:
        return None, f"the environment probe did not finish in {box_s:.0f} s"
    info = parse_summary_line(done.output)
    if done.returncode != 0 or info is None:
        return None, f"the environment probe failed: {last_error_line(done.output)}"
    return info, None


def discover_wheels(folder: Path) -> list[dict]:
    """The wheels in ``folder``: name, project, version, size, and whether this interpreter can use them."""
    if not folder.is_dir():
        return []
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # no way to read tags: let pip decide
        sys_tags = parse_wheel_filename = None
    supported = set(sys_tags()) if sys_tags else set()
    found = []
    for path in sorted(folder.glob("*.whl")):
        entry = {"file": path.name, "path": str(path), "mib": round(path.stat().st_size / 2**20, 2),
                 "project": path.name.split("-")[0].replace("_", "-").lower(), "version": None, "usable": True}
        if parse_wheel_filename is not None:
            try:
                project, version, _, tags = parse_wheel_filename(path.name)
                entry.update(project=str(project), version=str(version), usable=bool(supported & set(tags)))
            except Exception as exc:  # a malformed name is reported, not installed
                entry.update(usable=False, problem=str(exc))
        found.append(entry)
    return found


def install_needed(info: dict) -> bool:
    return info.get("megatron_core") != MEGATRON_VERSION


def install_plan(info: dict, wheels: list[dict], folder: Path) -> list[str] | str:
    """The wheel paths to install, or an error message saying what is missing and how to get it."""
    usable = [w for w in wheels if w["usable"]]
    by_project: dict[str, list[str]] = {}
    for wheel in usable:
        by_project.setdefault(wheel["project"], []).append(wheel["file"])
    doubles = {project: files for project, files in by_project.items() if len(files) > 1}
    if doubles:
        return f"more than one wheel of the same project in {folder}: {doubles}; keep one of each"
    megatron = [w for w in usable if w["project"] == "megatron-core" and w["version"] in (MEGATRON_VERSION, None)]
    if not megatron:
        unusable = [w["file"] for w in wheels if not w["usable"]]
        return (f"megatron-core {MEGATRON_VERSION} is needed ({_why_no_megatron(info)}) and {folder} holds no "
                f"wheel of it for Python {info.get('python')}"
                + (f" (not for this interpreter: {', '.join(unusable)})" if unusable else "")
                + "; run `make gpu-wheels` on a machine with package-index access and bring the folder along")
    return [w["path"] for w in usable]


def _why_no_megatron(info: dict) -> str:
    if info.get("megatron_core"):
        return f"{info['megatron_core']} is installed"
    return info.get("megatron_error", "it does not import")


def _install(ctx: Context, wheel_paths: list[str], box_s: float) -> str | None:
    """pip-install the wheels into ``ctx.site`` (no index, no dependencies) and put it on PYTHONPATH."""
    argv = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(ctx.site), *wheel_paths]
    done = run_command(ctx, "setup", argv, max(box_s, 1.0))
    if done.timed_out or done.returncode != 0:
        return f"pip install into {ctx.site} failed: {last_error_line(done.output) if not done.timed_out else 'timed out'}"
    ctx.env["PYTHONPATH"] = os.pathsep.join((str(ctx.site), ctx.env["PYTHONPATH"]))
    return None


def environment_error(info: dict, dry_run: bool) -> str | None:
    """What is missing for the steps to run, in words; None when nothing is."""
    if info.get("mrl_path") is None:
        return f"mrl does not import from {REPO}: {info.get('mrl_error')}"
    missing = [pip for module, pip in REQUIRED_MODULES.items() if info["modules"].get(module) is None]
    if missing:
        return (f"missing Python packages: {', '.join(missing)}; add them to GPU_WHEELS in the Makefile, "
                "run `make gpu-wheels` and bring the folder along")
    if not dry_run and not info["cuda"]:
        return (f"no CUDA device: torch {info['torch']} (CUDA build {info.get('torch_cuda')}) sees none; "
                "on a machine without a GPU use --dry-run")
    return None


def _environment_line(info: dict, details: dict) -> str:
    gpu = f"{info.get('gpu')} x{info.get('gpus')}" if info["cuda"] else "no GPU visible"
    source = f"installed from {', '.join(details['installed'])}" if details.get("installed") else "importable"
    return (f"Python {info['python']}, torch {info['torch']}, {gpu}, megatron-core {info['megatron_core']} "
            f"({source}), Transformer Engine {'yes' if info.get('transformer_engine') else 'no'}")


# The steps --------------------------------------------------------------------------------------

GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_gpu_decoding.py")


def gpu_tests(ctx: Context, box_s: float) -> Outcome:
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "gpu-tests.xml"
        argv = [ctx.python, "-m", "pytest", "-q", "-m", "gpu", *GPU_TEST_FILES, "-rs", "-p", "no:cacheprovider",
                f"--junitxml={junit}"]
        done = run_command(ctx, "gpu-tests", argv, box_s)
        numbers, tests = junit_outcome(junit)
    if done.timed_out:
        return Outcome("timeout", f"stopped after its time box of {box_s:.0f} s", command=argv, log=done.log)
    details = {"tests": tests}
    if numbers is None:
        return Outcome("failed", f"no test report (exit status {done.returncode}): {last_error_line(done.output)}",
                       command=argv, log=done.log)
    if numbers["failed"] or numbers["errors"] or done.returncode not in (0, 5):
        bad = [f"{t['id']}: {t['reason']}" for t in tests if t["status"] in ("failed", "error")]
        return Outcome("failed", f"{numbers['failed'] + numbers['errors']} of {numbers['tests']} tests failed: "
                       + "; ".join(bad)[:400], numbers, details, argv, done.log)
    if not numbers["passed"]:
        return Outcome("skipped", "no test ran: " + _skip_reasons(tests), numbers, details, argv, done.log)
    return Outcome("ok", None, numbers, details, argv, done.log)


def _skip_reasons(tests: list[dict]) -> str:
    counts: dict[str, int] = {}
    for test in tests:
        if test["status"] == "skipped":
            counts[test["reason"]] = counts.get(test["reason"], 0) + 1
    return "; ".join(f"{n} skipped ({reason})" for reason, n in counts.items()) or "none collected"


def vocab_ops(ctx: Context, box_s: float) -> Outcome:
    if ctx.dry_run:
        return Outcome("skipped", "dry run: tools/bench_vocab_ops.py --device cuda needs CUDA")
    argv = [ctx.python, "tools/bench_vocab_ops.py", "--device", "cuda"]
    done = run_command(ctx, "vocab-ops", argv, box_s)
    numbers = parse_vocab_ops(done.output)
    return command_outcome(done, argv, box_s, numbers, "copy_gbps" in numbers,
                           "no bandwidth-floor lines in its output")


def optional_benchmark(script: str, name: str) -> Callable[[Context, float], Outcome]:
    """A step for a benchmark script that may not exist yet: skipped with a reason while absent."""

    def run(ctx: Context, box_s: float) -> Outcome:
        if not (REPO / script).is_file():
            return Outcome("skipped", f"{script} not present")
        if ctx.dry_run:
            return Outcome("skipped", f"dry run: {script} --device cuda needs CUDA")
        argv = [ctx.python, script, "--device", "cuda"]
        done = run_command(ctx, name, argv, box_s)
        numbers = parse_summary_line(done.output) or parse_unit_numbers(done.output)
        outcome = command_outcome(done, argv, box_s, numbers, True, "")
        if outcome.status == "ok" and not numbers:
            outcome.reason = f"ran, but printed no SUMMARY line nor numbers with units: see {done.log}"
        return outcome

    return run


def train_step(ctx: Context, box_s: float) -> Outcome:
    device, size = ("cpu", "tiny") if ctx.dry_run else ("cuda", "1b")
    argv = [ctx.python, "tools/bench_train_step.py", "--device", device, "--size", size]
    done = run_command(ctx, "train-step", argv, box_s)
    numbers = parse_summary_line(done.output) or {}
    return command_outcome(done, argv, box_s, numbers, bool(numbers.get("finite")),
                           "no finite SUMMARY line in its output")


# Headlines for the text table -------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "?") -> str:
    return missing if value is None else format(value, spec)


def _tests_headline(outcome: Outcome) -> str:
    n = outcome.numbers
    return f"{n['passed']} passed, {n['skipped']} skipped of {n['tests']}"


def _vocab_headline(outcome: Outcome) -> str:
    n = outcome.numbers
    parts = [f"copy {_fmt(n.get('copy_gbps'), '.0f')} GB/s"]
    for key, label in (("mrl_logprobs", "logprobs"), ("mrl_fused", "fused"), ("megatron_core", "megatron-core")):
        parts.append(f"{label} {_fmt(n.get(key + '_x_floor'), '.1f')}x floor")
    return ", ".join(parts)


def _train_headline(outcome: Outcome) -> str:
    n = outcome.numbers
    mfu = "n/a" if n.get("mfu") is None else f"{n['mfu']:.1%}"
    params = f"{n['params'] / 1e9:.2f}B" if n["params"] >= 1e8 else f"{n['params'] / 1e6:.2f}M"
    return (f"{params} params {n['dtype']}: {n['tokens_per_s']:.0f} tokens/s, MFU {mfu}, "
            f"{n['vs_gemm']:.1%} of GEMM, peak {n['peak_memory_gib']:.2f} GiB")


def _generic_headline(outcome: Outcome) -> str:
    shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in outcome.numbers.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(shown[:4])


STEPS = [
    Step("setup", 40, "environment probe, megatron-core from the wheels", setup, lambda o: o.details["summary"]),
    Step("gpu-tests", 70, "pytest -m gpu " + " ".join(GPU_TEST_FILES), gpu_tests, _tests_headline),
    Step("vocab-ops", 60, "vocab-parallel ops against the bandwidth floor", vocab_ops, _vocab_headline),
    Step("fused-head", 60, "fused-head benchmark", optional_benchmark("tools/bench_fused_head.py", "fused-head"),
         _generic_headline),
    Step("train-step", 140, "bf16 training step (1.1B, local layers; tiny on CPU in a dry run)", train_step,
         _train_headline),
    Step("rollout", 90, "KV-cached sampler tokens/s", optional_benchmark("tools/bench_rollout.py", "rollout"),
         _generic_headline),
]


# Summary ----------------------------------------------------------------------------------------


def write_summary(ctx: Context, results: list[dict], budget_s: float, total_s: float) -> dict:
    """Write summary.json and summary.txt into the output folder; return the summary."""
    summary = {
        "ok": all(r["status"] in ("ok", "skipped") for r in results),
        "dry_run": ctx.dry_run,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "budget_s": budget_s,
        "total_s": round(total_s, 2),
        "environment": ctx.environment,
        "steps": results,
    }
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (ctx.out / "summary.txt").write_text(summary_table(summary))
    return summary


def summary_table(summary: dict) -> str:
    mode = "dry run (no GPU)" if summary["dry_run"] else "GPU run"
    lines = [f"mrl GPU check, {mode}, {summary['finished']}, commit {summary['commit'] or 'unknown'}",
             f"{'step':<11} {'status':<8} {'time / box':>12}  result"]
    for r in summary["steps"]:
        lines.append(f"{r['name']:<11} {r['status']:<8} {r['seconds']:>5.1f} / {r['box_s']:>3.0f} s  {r['headline']}")
    verdict = "all steps ok or skipped" if summary["ok"] else "FAILED: see the steps above and their logs"
    lines.append(f"total {summary['total_s']:.1f} s of {summary['budget_s']:.0f} s; {verdict}")
    return "\n".join(lines) + "\n"


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


if __name__ == "__main__":
    sys.exit(main())
