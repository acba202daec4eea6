#!/bin/bash
# Single-node mrl training under torchrun --standalone (one rank per GPU).
#
#   launch/torchrun.sh [NPROC] CONFIG [key=value ...]
#   launch/torchrun.sh configs/sft.yaml train.steps=100          # one rank per visible GPU
#   launch/torchrun.sh 4 configs/sft-tiny-cpu.yaml               # 4 ranks (e.g. a CPU recipe)
#
# Ranks: NPROC, else MRL_NPROC_PER_NODE, else the GPUs in CUDA_VISIBLE_DEVICES, else those that
# `nvidia-smi -L` lists. The recipe is validated at that world size before any rank starts, and the
# environment conventions of launch/mrl.sbatch apply (MRL_PYTHON, MRL_SITE_ENV, MRL_TORCHRUN_ARGS,
# NCCL_DEBUG=WARN, TORCH_NCCL_ASYNC_ERROR_HANDLING=3, the NCCL flight recorder, and
# CUDA_DEVICE_MAX_CONNECTIONS=1 when tp > 1 or cp > 1); variables already set are kept.
# SIGTERM or SIGINT (Ctrl-C) to this script reaches every rank as SIGTERM: the ranks finish the
# current step, save a checkpoint and exit; the script then exits with 128 + the signal number.

set -euo pipefail
# shellcheck source=launch/mrl.sbatch
source "$(dirname "${BASH_SOURCE[0]}")/mrl.sbatch"

mrl_local_gpu_count() {
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    local devices=()
    IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#devices[@]}"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi -L | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

mrl_torchrun_main() {
  local nproc
  if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    nproc=$1
    shift
  else
    nproc=${MRL_NPROC_PER_NODE:-$(mrl_local_gpu_count)}
  fi
  (($# >= 1)) && [[ $1 != -h && $1 != --help ]] || {
    echo "usage: launch/torchrun.sh [NPROC] CONFIG [key=value ...]" >&2
    exit 2
  }
  [[ $nproc =~ ^[1-9][0-9]*$ ]] ||
    mrl_die "no ranks to start (nproc '$nproc'): pass NPROC or set MRL_NPROC_PER_NODE"
  mrl_source_site_env

  mrl_log "phase recipe ($nproc ranks)"
  local python
  python=$(mrl_find_python)
  mrl_validate "$python" "$nproc" "$@"
  if ((MRL_COMPLETE)); then
    mrl_log "the run is already complete; no rank was started"
    exit 0
  fi
  mrl_export_env "$MRL_TP" "$MRL_CP" ""

  mrl_log "phase launch"
  local extra=()
  read -r -a extra <<<"${MRL_TORCHRUN_ARGS:-}"
  mrl_run_forwarding "$python" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$nproc" \
    --max-restarts=0 "${extra[@]}" -m mrl train "$@"
  local status=$MRL_STATUS
  if [[ -n $MRL_STOP_SIGNAL ]]; then
    mrl_log "stopped on SIG$MRL_STOP_SIGNAL after ${SECONDS}s; rerun the same command to resume"
    exit $((128 + $(kill -l "$MRL_STOP_SIGNAL")))
  fi
  ((status == 0)) || mrl_die "training failed (torchrun exit status $status) after ${SECONDS}s"
  mrl_log "phase done in ${SECONDS}s"
}

mrl_torchrun_main "$@"
