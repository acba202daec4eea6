"""The launchers in launch/, run for real on this machine.

launch/mrl.sbatch runs end to end with SLURM's environment set and the stand-ins in tests/fakebin
for srun (one local process per node), scontrol (host lists) and getent (host addresses from
MRL_TEST_HOSTS): two "nodes" of two CPU ranks each meet at a c10d rendezvous on this machine's
address and train the tiny SFT recipe at TP=2 x PP=2. launch/torchrun.sh runs the same job on one
node and must reproduce its losses. The failure paths (unresolvable head, bad recipe, failing
ranks) must stop before or right after srun, with a message; the helpers that read the allocation
are checked one by one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKEBIN = REPO / "tests" / "fakebin"
SBATCH = REPO / "launch" / "mrl.sbatch"
TORCHRUN = REPO / "launch" / "torchrun.sh"
RECIPE = "configs/sft-tiny-cpu.yaml"
SHORT_RUN = ("train.steps=2",)
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_VISIBLE_DEVICES")


def host_address() -> str:
    """This machine's IPv4 address on its default route: what another node would connect to."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("203.0.113.1", 9))  # no packet is sent: this only picks the route
        except OSError:
            pytest.skip("no network interface besides loopback")
        address = sock.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no network interface besides loopback")
    return address


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def clean_env(**values: str) -> dict[str, str]:
    """The test's environment without any SLURM, launcher or rank variable, plus ``values``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SLURM", "MRL_", "TORCH_NCCL", "TORCH_FR", "NCCL_")) and name not in RANK_VARS}
    env.update(PATH=f"{FAKEBIN}{os.pathsep}{env['PATH']}", MRL_PYTHON=sys.executable, **values)
    return env


def slurm_env(tmp: Path, nodelist: str = "node[1-2]", hosts: str | None = None, **values: str) -> dict[str, str]:
    """SLURM's variables for a 2-node batch job submitted from ``tmp``, 2 CPU ranks per node."""
    if hosts is None:
        hosts = f"node1={host_address()} node2={host_address()}"
    job = dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="mrl test", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST=nodelist, SLURM_SUBMIT_DIR=str(tmp), SLURM_CPUS_ON_NODE="2",
               MRL_NPROC_PER_NODE="2", MRL_FAKE_SRUN_LOG=str(tmp / "srun.jsonl"), MRL_TEST_HOSTS=hosts)
    return clean_env(**{**job, **values})


def run(command: list[str], env: dict[str, str], timeout: float = 540) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root, stdout and stderr together. On a timeout the whole
    process group gets SIGTERM (torchrun stops its ranks on it), then SIGKILL."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
        pytest.fail(f"{command[:2]} ran past {timeout} s:\n{stdout}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_trained_two_steps(output_dir: Path) -> list[float]:
    metrics = read_metrics(output_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses), losses
    assert "parallel:" in (output_dir / "config.yaml").read_text()
    return losses


def srun_calls(tmp: Path) -> list[list[str]]:
    log = tmp / "srun.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def bash_helper(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``script`` in bash after sourcing the helpers of launch/mrl.sbatch."""
    return run(["bash", "-c", f'source "{SBATCH}"\n{script}'], env, timeout=30)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sbatch_job(tmp_path_factory):
    """One 2-node x 2-rank batch job of the tiny SFT recipe; returns (tmp dir, output dir, process)."""
    tmp = tmp_path_factory.mktemp("sbatch")
    output_dir = tmp / "out"
    env = slurm_env(tmp, MRL_RDZV_PORT=str(free_port()))
    proc = run(["bash", str(SBATCH), RECIPE, *SHORT_RUN, f"log.output_dir={output_dir}"], env)
    return tmp, output_dir, proc


def test_sbatch_trains_across_two_nodes(sbatch_job):
    tmp, output_dir, proc = sbatch_job
    assert proc.returncode == 0, proc.stdout
    assert_trained_two_steps(output_dir)

    log_dir = tmp / "logs" / "mrl_test-4242"  # the job name, made safe for a path
    assert sorted(path.name for path in log_dir.iterdir()) == ["job.log", "node0-node1.log", "node1-node2.log"]
    job_log = (log_dir / "job.log").read_text()
    assert job_log == proc.stdout  # the batch output is kept in the job's log directory
    phases = [job_log.index(f"phase {name}") for name in ("topology", "recipe", "launch", "done")]
    assert phases == sorted(phases)
    address = host_address()
    assert f"2 node(s) x 2 rank(s) = 4 ranks; rendezvous at {address}:" in job_log
    assert "4 ranks: tp=2 pp=2 cp=1 dp=1" in job_log  # validated at the job's world size
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in job_log  # the recipe has tp=2
    assert f"TORCH_FR_DUMP_TEMP_FILE={log_dir}/nccl-trace-rank-" in job_log
    node_logs = "".join((log_dir / name).read_text() for name in ("node0-node1.log", "node1-node2.log"))
    assert "step 2/2" in node_logs and "Traceback" not in node_logs
    # The logging rank's progress and end-of-run summary reach the job's own log.
    assert "\nstep 2/2 | loss " in job_log and "\n[mrl] trained steps 1-2 of 2 in " in job_log
    assert f"\n[mrl] export: mrl export-hf {output_dir} {output_dir}-hf\n" in job_log

    (call,) = srun_calls(tmp)
    assert "--nodes=2" in call and "--ntasks-per-node=1" in call and "--kill-on-bad-exit=1" in call
    torchrun = call[call.index("mrl-node") + 1:]
    assert torchrun[0] == sys.executable
    for flag in ("--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-id=4242"):
        assert flag in torchrun
    assert torchrun[-6:] == ["-m", "mrl", "train", RECIPE, *SHORT_RUN, f"log.output_dir={output_dir}"]
    assert not any("localhost" in arg or "127.0.0.1" in arg for arg in call)


def test_torchrun_single_node_matches_the_batch_job(sbatch_job, tmp_path):
    _, batch_output, batch = sbatch_job
    assert batch.returncode == 0, batch.stdout
    output_dir = tmp_path / "out"
    proc = run(["bash", str(TORCHRUN), "4", RECIPE, *SHORT_RUN, f"log.output_dir={output_dir}"], clean_env())
    assert proc.returncode == 0, proc.stdout
    losses = assert_trained_two_steps(output_dir)
    assert "4 ranks: tp=2 pp=2 cp=1 dp=1" in proc.stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in proc.stdout
    # Same recipe, seed and layout: the launcher must not change a single number.
    assert losses == pytest.approx([m["loss"] for m in read_metrics(batch_output)], rel=1e-6)


@pytest.mark.parametrize("launcher", ["sbatch", pytest.param("torchrun", marks=pytest.mark.soak)])
def test_a_stop_signal_saves_a_checkpoint_and_leaves_no_process(tmp_path, launcher):
    """sbatch: SLURM's early warning (SIGUSR1 to the batch script); torchrun.sh: SIGTERM."""
    from tests.test_run_control import session_processes

    output_dir = tmp_path / "out"
    overrides = ["parallel.tp=1", "parallel.pp=1", "train.steps=500", "train.global_batch_size=8",
                 "train.micro_batch_size=4", f"log.output_dir={output_dir}"]
    if launcher == "sbatch":
        env = slurm_env(tmp_path, MRL_NPROC_PER_NODE="1", MRL_RDZV_PORT=str(free_port()), MRL_REQUEUE="1",
                        MRL_FAKE_REQUEUE_LOG=str(tmp_path / "requeue.log"))
        command, signum = ["bash", str(SBATCH), RECIPE, *overrides], signal.SIGUSR1
    else:
        command, signum = ["bash", str(TORCHRUN), "2", RECIPE, *overrides], signal.SIGTERM
        env = clean_env()
    log = tmp_path / "launcher.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ((output_dir / "metrics.jsonl").exists() and len(read_metrics(output_dir)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signum)
        status = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    step = read_metrics(output_dir)[-1]["step"]
    assert (output_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}", text
    if launcher == "sbatch":
        log_dir = tmp_path / "logs" / "mrl_test-4242"
        assert status == 0, text
        assert "SIGUSR1: the ranks finish their step and save a checkpoint (train.stop_timeout_s=240)" in text
        assert "stopped on SIGUSR1" in text and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=270" in text
        assert (tmp_path / "requeue.log").read_text() == "4242\n"
        text += "".join(path.read_text() for path in log_dir.glob("node*.log"))
    else:
        assert status == 128 + signal.SIGTERM, text
        assert "stopped on SIGTERM" in text
    assert f"stopped by SIGTERM at step {step}/500: saved {output_dir}/checkpoints/step_{step:08d}" in text
    assert session_processes(proc.pid) == []


# --------------------------------------------------------------------------- failure paths


@pytest.mark.parametrize("nodelist, hosts, message", [
    ("ghost[1-2]", "node1=192.0.2.7", "cannot resolve the head node 'ghost1'"),
    ("node[1-2]", "node1=127.0.1.1 node2=127.0.1.1", "resolves to the loopback address 127.0.1.1"),
])
def test_unresolvable_head_stops_the_job(tmp_path, nodelist, hosts, message):
    env = slurm_env(tmp_path, nodelist=nodelist, hosts=hosts)
    proc = run(["bash", str(SBATCH), RECIPE, *SHORT_RUN], env)
    assert proc.returncode != 0
    assert message in proc.stdout and "MRL_HEAD_ADDR" in proc.stdout
    assert "localhost" not in proc.stdout and "127.0.0.1" not in proc.stdout
    assert "phase recipe" not in proc.stdout and srun_calls(tmp_path) == []
    assert message in (tmp_path / "logs" / "mrl_test-4242" / "job.log").read_text()


@pytest.mark.parametrize("overrides, nproc_per_node, message", [
    (["train.no_such_key=1"], "2", "unknown key 'train.no_such_key'"),
    ([], "3", "world size 6 is not divisible by tp=2"),  # fine alone, not on 2 nodes x 3 ranks
])
def test_bad_recipe_fails_before_any_rank(tmp_path, overrides, nproc_per_node, message):
    env = slurm_env(tmp_path, MRL_NPROC_PER_NODE=nproc_per_node)
    proc = run(["bash", str(SBATCH), RECIPE, *overrides], env)
    assert proc.returncode == 1
    assert message in proc.stdout
    assert f"does not validate at world size {2 * int(nproc_per_node)}; no rank was started" in proc.stdout
    assert "phase launch" not in proc.stdout and srun_calls(tmp_path) == []


def test_failing_ranks_fail_the_job_with_their_logs(tmp_path):
    env = slurm_env(tmp_path, MRL_TORCHRUN_ARGS="--no-such-torchrun-flag")
    proc = run(["bash", str(SBATCH), RECIPE, *SHORT_RUN, f"log.output_dir={tmp_path / 'out'}"], env)
    assert proc.returncode == 1
    assert "training failed (srun exit status 2)" in proc.stdout
    for node_log in ("node0-node1.log", "node1-node2.log"):  # their tails are in the batch output
        assert f"last lines of {tmp_path}/logs/mrl_test-4242/{node_log}" in proc.stdout
    assert "unrecognized arguments: --no-such-torchrun-flag" in proc.stdout


def test_the_launchers_check_that_their_python_has_torch_and_mrl(tmp_path):
    bare = tmp_path / "python-without-site-packages"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    proc = run(["bash", str(TORCHRUN), "4", RECIPE], dict(clean_env(), MRL_PYTHON=str(bare)))
    assert proc.returncode == 1
    assert f"'{bare}' cannot import torch; set MRL_PYTHON to the interpreter mrl is installed in" in proc.stdout
    assert "does not validate" not in proc.stdout


def test_a_finished_run_starts_no_rank(tmp_path):
    from mrl.config import dump_yaml, load_config
    from mrl.job import JobConfig

    output_dir = tmp_path / "out"
    overrides = [*SHORT_RUN, f"log.output_dir={output_dir}"]
    (output_dir / "checkpoints").mkdir(parents=True)
    (output_dir / "checkpoints" / "latest").write_text("step_00000002\n")
    (output_dir / "config.yaml").write_text(dump_yaml(load_config(str(REPO / RECIPE), JobConfig, overrides)))
    proc = run(["bash", str(TORCHRUN), "4", RECIPE, *overrides], clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert f"{output_dir} is already complete: its latest checkpoint is step 2 (train.steps=2)" in proc.stdout
    assert "the run is already complete; no rank was started" in proc.stdout and "phase launch" not in proc.stdout


def test_torchrun_script_needs_a_rank_count(tmp_path):
    proc = run(["bash", str(TORCHRUN), RECIPE], clean_env(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 1 and "pass NPROC or set MRL_NPROC_PER_NODE" in proc.stdout
    # One rank per visible GPU: three here, which the TP=2 x PP=2 recipe cannot use.
    proc = run(["bash", str(TORCHRUN), RECIPE], clean_env(CUDA_VISIBLE_DEVICES="0,1,2"))
    assert proc.returncode == 1 and "does not validate at world size 3" in proc.stdout


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("variables, expected", [
    ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "gpu:8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "h100:4"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "gpu:h100:08"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "gpu:4(IDX:0-3)"}, "4"),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "gpu:8"}, "4"),
    ({"MRL_NPROC_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"}, "2"),
])
def test_ranks_per_node_from_the_allocation(variables, expected):
    proc = bash_helper("mrl_nproc_per_node", clean_env(**variables))
    assert (proc.returncode, proc.stdout) == (0, f"{expected}\n")


@pytest.mark.parametrize("variables, message", [
    ({}, "submit with --gpus-per-node=N, or set MRL_NPROC_PER_NODE"),
    ({"SLURM_GPUS_PER_NODE": "gpu:0"}, "SLURM_GPUS_PER_NODE='gpu:0' is not a GPU count"),
    ({"SLURM_GPUS_PER_NODE": "h100:4,a100:2"}, "SLURM_GPUS_PER_NODE='h100:4,a100:2' is not a GPU count"),
    ({"MRL_NPROC_PER_NODE": "two", "SLURM_GPUS_ON_NODE": "8"}, "MRL_NPROC_PER_NODE='two' is not a GPU count"),
])
def test_ranks_per_node_errors(variables, message):
    proc = bash_helper("mrl_nproc_per_node", clean_env(**variables))
    assert proc.returncode == 1 and message in proc.stdout


def test_nodes_head_and_port():
    env = clean_env(SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="gpu[07-09]", SLURM_JOB_ID="123456",
                    MRL_TEST_HOSTS="gpu07=10.1.2.7")
    proc = bash_helper('echo "$(mrl_num_nodes) $(mrl_head_node) $(mrl_resolve_addr gpu07 3) $(mrl_rdzv_port)"', env)
    assert proc.stdout == f"3 gpu07 10.1.2.7 {15000 + 123456 % 15000}\n", proc.stdout
    proc = bash_helper("mrl_rdzv_port; MRL_HEAD_ADDR=10.9.9.9 mrl_resolve_addr gpu07 3",
                       dict(env, MRL_RDZV_PORT="29500"))
    assert proc.stdout == "29500\n10.9.9.9\n"
    proc = bash_helper("mrl_resolve_addr gpu07 1", dict(env, MRL_TEST_HOSTS="gpu07=127.0.1.1"))
    assert proc.stdout == "127.0.1.1\n"  # a lone node may rendezvous over loopback
    proc = bash_helper("mrl_rdzv_port", dict(env, MRL_RDZV_PORT="70000"))
    assert proc.returncode == 1 and "MRL_RDZV_PORT='70000' is not a port" in proc.stdout


@pytest.mark.parametrize("tp, cp, preset, connections", [
    (1, 1, {}, None),
    (2, 1, {}, "1"),
    (1, 2, {}, "1"),
    (2, 1, {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}, "8"),  # what the user set wins
])
def test_rank_environment(tp, cp, preset, connections):
    env = clean_env(NCCL_SOCKET_IFNAME="ib0", TORCH_NCCL_TRACE_BUFFER_SIZE="500", **preset)
    names = ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_FR_BUFFER_SIZE",
             "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE",
             "NCCL_SOCKET_IFNAME")
    script = f'mrl_export_env {tp} {cp} /logs/trace- >/dev/null\nfor n in {" ".join(names)}; do echo "$n=${{!n-}}"; done'
    proc = bash_helper(script, env)
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert values == {
        "CUDA_DEVICE_MAX_CONNECTIONS": connections or "", "NCCL_DEBUG": "WARN",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_FR_BUFFER_SIZE": "",  # the older spelling is set: it is kept, not overridden
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "500", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": "/logs/trace-", "NCCL_SOCKET_IFNAME": "ib0",
    }
