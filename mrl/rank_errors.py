"""An error on the ranks, printed once: one short block on stderr, full tracebacks in files.

Every failing rank writes its traceback to ``<output_dir>/logs/rank<k>.log``. The first rank to
fail for a reason of its own (not because a peer vanished: "Connection closed by peer" and the
like) claims ``logs/error-<run id>.txt`` with an exclusive create and prints the short block;
the others stay quiet. The claim file works across nodes on a shared file system and needs no
collective, which a failing job cannot count on.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from pathlib import Path

# How a collective fails on the ranks that survive a dead peer (gloo, NCCL, the c10d store).
_PEER_FAILURE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Connection refused|"
    r"NCCL communicator was aborted|ProcessGroupNCCL.*(?:abort|error)|"
    r"failed to recv|Socket Timeout|recvValue|DistNetworkError|DistBackendError",
    re.IGNORECASE,
)


def run_id() -> str:
    """An id shared by the ranks of one launch: the local spawner's, torchrun's, or SLURM's."""
    for name in ("MRL_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(name):
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            return re.sub(r"[^A-Za-z0-9._-]", "_", os.environ[name]) + (f"-{restart}" if restart != "0" else "")
    return "job"


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` only says that another rank went away."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in ("DistNetworkError", "DistBackendError", "DistStoreError"):
            return True
        if _PEER_FAILURE.search(f"{type(exc).__name__}: {exc}"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def short_message(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report(exc: BaseException, rank: int, log_dir: Path | None) -> bool:
    """Record ``exc`` of ``rank``; print the short block when this rank is the first to fail.

    Returns True when this rank printed it."""
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_dir / f"rank{rank}.log", "a") as handle:
                handle.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} run {run_id()} rank {rank}\n{detail}")
        except OSError:
            log_dir = None
    if is_peer_failure(exc):
        return False
    block = f"[mrl] error on rank {rank}: {short_message(exc)}\n"
    if log_dir is not None:
        try:
            fd = os.open(log_dir / f"error-{run_id()}.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(block)
        block += f"[mrl] full tracebacks: {log_dir}/rank*.log\n"
    else:
        block += detail
    sys.stderr.write(block)
    sys.stderr.flush()
    return True


def first_error(log_dir: Path) -> str | None:
    """The short block a rank of this launch printed, if any."""
    path = log_dir / f"error-{run_id()}.txt"
    try:
        return path.read_text().strip()
    except OSError:
        return None
