#!/usr/bin/env bash
# The GPU benchmarks on one GPU, Qwen2.5-1.5B shape (random weights), bf16, each side by side with
# transformers in the same run:
#   sampler: batch 256, 128 prompt + 256 new tokens, plus the fraction of the HBM roofline;
#   train:   batch 4 x 4096, forward + backward + AdamW, tokens/s and MFU; then an RL step's
#            64 sequences of <= 4096 tokens, padded vs packed vs transformers, real tokens/s.
# Needs CUDA JAX and CUDA torch:
#
#   pip install -U "jax[cuda12]" torch
#   launch/bench_gpu.sh [--json=sampler_gpu.json] [--batch=... other sampler flags]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()" || {
  echo "no GPU visible to JAX: pip install -U 'jax[cuda12]'" >&2
  exit 1
}
python -c "import torch; assert torch.cuda.is_available()" || {
  echo "no GPU visible to torch: pip install -U torch (a CUDA build)" >&2
  exit 1
}
# transformers runs in the same process: JAX must not preallocate most of the GPU's memory
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python -m tapo_jax.bench sampler --shape=qwen2.5-1.5b --dtype=bfloat16 --batch=256 \
  --prompt-len=128 --new-tokens=256 "$@"
python -m tapo_jax.bench train --shape=qwen2.5-1.5b --dtype=bfloat16 --batch=4 --seq=4096 \
  --remat --attention=cudnn
python -m tapo_jax.bench train --shape=qwen2.5-1.5b --dtype=bfloat16 --batch=4 --seq=4096 \
  --remat --attention=cudnn --lengths=rl --seqs=64
