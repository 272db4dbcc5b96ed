#!/usr/bin/env bash
# Run TAPO on the GPUs of one machine, or of several machines (one process each, same command):
#
#   launch/gpu.sh configs/qwen7b.py runs/qwen7b --config.mesh.tensor=8
#   # two 8-GPU machines; run on each, with i = 0 on host0 and 1 on the other:
#   launch/gpu.sh --coordinator=host0:8476 --num-processes=2 --process-id=i \
#     configs/qwen7b.py /shared/run1 --config.mesh.tensor=8
#
# With --coordinator every process calls jax.distributed.initialize with the coordinator's
# HOST:PORT (process 0's machine, a port free there and reachable from the others), the process
# count and its own id, passed as config.distributed_coordinator / _num_processes / _process_id:
# GPU machines have no metadata server to discover them from (under SLURM or Open MPI, pass
# --config.distributed=True alone and JAX reads them from the scheduler). The workdir must be
# one directory all machines share. --dry-run prints the command instead of running it.
set -euo pipefail
DRY_RUN=0 COORDINATOR='' NUM_PROCESSES='' PROCESS_ID=''
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --coordinator=*) COORDINATOR=${1#*=} ;;
    --num-processes=*) NUM_PROCESSES=${1#*=} ;;
    --process-id=*) PROCESS_ID=${1#*=} ;;
    *) break ;;
  esac
  shift
done
fail() {
  echo "error: $1" >&2
  echo "usage: $0 [--dry-run] [--coordinator=HOST:PORT --num-processes=N --process-id=I]" \
    "CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
}
[ $# -ge 2 ] || fail "CONFIG and WORKDIR are required"
CONFIG=$1 WORKDIR=$2
shift 2
distributed=()
if [ -n "$COORDINATOR$NUM_PROCESSES$PROCESS_ID" ]; then
  [[ $COORDINATOR =~ ^[^:]+:[0-9]+$ ]] || fail "--coordinator=$COORDINATOR: expected HOST:PORT"
  [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || fail "--num-processes=$NUM_PROCESSES: expected N >= 1"
  if ! [[ $PROCESS_ID =~ ^[0-9]+$ ]] || [ "$PROCESS_ID" -ge "$NUM_PROCESSES" ]; then
    fail "--process-id=$PROCESS_ID: expected 0 <= I < $NUM_PROCESSES"
  fi
  distributed=(--config.distributed=True --config.distributed_coordinator="$COORDINATOR"
    --config.distributed_num_processes="$NUM_PROCESSES"
    --config.distributed_process_id="$PROCESS_ID")
fi
cd "$(dirname "$0")/.."
cmd=(python -m tapo_jax.main --config="$CONFIG" --workdir="$WORKDIR"
  --config.model.attention_impl=cudnn "${distributed[@]}" "$@")
if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()" || {
  echo "no GPU visible to JAX: pip install -U 'jax[cuda12]'" >&2
  exit 1
}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${cmd[@]}"
