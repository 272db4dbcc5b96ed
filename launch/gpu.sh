#!/usr/bin/env bash
# Run TAPO on the GPUs of one machine (CUDA JAX), e.g.
#
#   launch/gpu.sh configs/qwen7b.py runs/qwen7b --config.mesh.tensor=8
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2
cd "$(dirname "$0")/.."
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()" || {
  echo "no GPU visible to JAX: pip install -U 'jax[cuda12]'" >&2
  exit 1
}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m tapo_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.model.attention_impl=cudnn "$@"
