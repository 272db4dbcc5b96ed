"""mode = eval: sample k per problem on every configured eval set and report the metrics.

With no eval.paths and the toy model, a held-out set of generated arithmetic problems is used.
"""

from __future__ import annotations

import json
import os
import sys

from tapo_jax import distributed, metrics
from tapo_jax import policy as policy_lib
from tapo_jax import rewards as rewards_lib
from tapo_jax.eval.evaluate import checked_eval_sets, eval_kwargs, evaluate_sets
from tapo_jax.sampling import engines as engines_lib


def run(cfg, workdir: str) -> dict[str, float]:
  """Evaluates the configured model; writes eval/<set>.jsonl, metrics.jsonl and a summary."""
  mesh, model, tokenizer = policy_lib.load_policy(cfg)
  sets = checked_eval_sets(cfg, tokenizer)
  engine = engines_lib.eval_engine(cfg, model, mesh)
  os.makedirs(workdir, exist_ok=True)
  pool = rewards_lib.VerifierPool(
    workers=cfg.reward.workers, timeout_s=cfg.reward.timeout_s, extract=cfg.reward.extract
  )
  with pool:
    summary = evaluate_sets(
      engine, engine.load_params(model), tokenizer, sets,
      out_dir=os.path.join(workdir, "eval") if distributed.is_main() else None,
      grade_fn=distributed.divided(pool.grade), **eval_kwargs(cfg),
    )  # fmt: skip
  writer = metrics.MetricWriter(workdir, total_steps=0, quiet=True)
  writer.write(0, summary, prefix="eval/")
  writer.close()
  if distributed.is_main():
    for key, value in sorted(summary.items()):
      print(f"{key:>28s}  {value:.4f}", file=sys.stderr)
    with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  return summary
