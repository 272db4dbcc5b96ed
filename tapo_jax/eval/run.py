"""mode = eval: sample k per problem on every configured eval set and report the metrics.

With no eval.paths and the toy model, a held-out set of generated arithmetic problems is used.
"""

from __future__ import annotations

import json
import os
import sys

from tapo_jax.data import Problem
from tapo_jax.eval.evaluate import eval_kwargs, evaluate_sets, load_eval_sets
from tapo_jax.toy import arith
from tapo_jax.train import metrics, setup

TOY_EVAL_PROBLEMS = 64


def eval_sets(cfg) -> dict[str, list[Problem]]:
  """{name: problems} from config eval.paths, or the toy set."""
  if cfg.eval.paths:
    return load_eval_sets(cfg.eval.paths)
  toy = arith.make_problems(TOY_EVAL_PROBLEMS, seed=cfg.seed + 999)
  return {
    "arith": [
      Problem(id=f"arith-eval-{i}", problem=p.problem, answer=p.answer) for i, p in enumerate(toy)
    ]
  }


def run(cfg, workdir: str) -> dict[str, float]:
  """Evaluates the configured model; writes eval/<set>.jsonl, metrics.jsonl and a summary."""
  mesh, model, tokenizer = setup.load_policy(cfg)
  sets = eval_sets(cfg)
  os.makedirs(workdir, exist_ok=True)
  summary = evaluate_sets(
    model, tokenizer, sets, out_dir=os.path.join(workdir, "eval"), **eval_kwargs(cfg)
  )
  writer = metrics.MetricWriter(workdir, total_steps=0, quiet=True)
  writer.write(0, summary, prefix="eval/")
  writer.close()
  for key, value in sorted(summary.items()):
    print(f"{key:>28s}  {value:.4f}", file=sys.stderr)
  with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  return summary
