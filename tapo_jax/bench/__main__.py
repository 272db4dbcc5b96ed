"""python -m tapo_jax.bench {verifier,sampler,tapo,train,memory,rl,aot}: us vs a peer, in one run
(aot: TPU compiles without a TPU)."""

import importlib
import sys

BENCHMARKS = {
  "verifier": "tapo_jax.bench.verifier",  # answers/s vs math-verify
  "sampler": "tapo_jax.bench.sampler",  # tokens/s vs transformers generate
  "tapo": "tapo_jax.bench.tapo",  # DCS + splice + DAE cost vs rollout time
  "train": "tapo_jax.bench.train",  # tokens/s, MFU vs transformers fwd+bwd+AdamW
  "memory": "tapo_jax.bench.memory",  # planner vs XLA's compiled temp bytes; attention impls
  "rl": "tapo_jax.bench.rl",  # the whole RL step stage by stage; one-step-off vs synchronous
  "aot": "tapo_jax.bench.aot",  # TPU compiles without a TPU: collectives, memory vs the planner
}


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in BENCHMARKS:
    print(f"usage: python -m tapo_jax.bench {{{','.join(BENCHMARKS)}}} [flags]", file=sys.stderr)
    return 2
  module = importlib.import_module(BENCHMARKS[argv[1]])
  return module.main(argv[2:]) or 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
