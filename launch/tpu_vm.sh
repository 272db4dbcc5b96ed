#!/usr/bin/env bash
# Launch a TAPO run on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/qwen7b.py gs://BUCKET/run1 [--config.key=value ...]
#
# The repository is copied to each worker, installed, and the same command runs on all of them.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/tapo_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/tapo_jax.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/tapo_jax && tar -C ~/tapo_jax -xzf /tmp/tapo_jax.tgz && cd ~/tapo_jax
  pip install -q -e . 'jax[tpu]'
  python -m tapo_jax.main --config=$CONFIG --workdir=$WORKDIR --config.distributed=True $*
"
