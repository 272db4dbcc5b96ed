"""What a run trains on: the configured file (or the toy domain's problems) and the difficulty
filter that keeps the problems at the initial policy's capability boundary (what it evaluates on:
tapo_jax.eval.evaluate.eval_sets)."""

from __future__ import annotations

import json
import os
import sys

from tapo_jax import distributed, toy
from tapo_jax import eval as eval_lib
from tapo_jax.data import DataError, Problem, filter_by_pass_rate, load_problems


def training_problems(cfg) -> list[Problem]:
  """The configured training file, or generated toy problems for the toy model."""
  if cfg.data.train_path:
    return load_problems(cfg.data.train_path, cfg.data.layout)
  return toy.train_problems(cfg.model.toy, cfg.seed)


def filter_by_difficulty(cfg, engine, params, tokenizer, pool, problems, workdir) -> list[Problem]:
  """The problems whose pass rate under the initial policy lies in data.pass_rate_window.

  The rates are computed once (rollout.n samples per problem at the rollout settings) and cached
  in WORKDIR/pass_rates.json, so a resumed run trains on exactly the same set."""
  low, high = cfg.data.pass_rate_window
  path = os.path.join(workdir, "pass_rates.json")
  if distributed.agree(os.path.exists(path)):  # every process samples, or none
    with open(path) as f:
      rates = json.load(f)
  else:
    n = len(problems)
    print(f"measuring pass rates of {n} problems for the difficulty filter", file=sys.stderr)
    r = cfg.rollout
    rates = eval_lib.compute_pass_rates(
      engine,
      params,
      tokenizer,
      problems,
      k=r.n,
      temperature=r.temperature,
      top_p=r.top_p,
      top_k=r.top_k,
      max_new_tokens=r.max_new_tokens,
      template=cfg.data.prompt_template,
      use_chat_template=cfg.data.use_chat_template,
      seed=cfg.seed,
      grade_fn=distributed.divided(pool.grade),
      extract=cfg.reward.extract,
    )
    if distributed.is_main():
      with open(path + ".tmp", "w") as f:
        json.dump(rates, f)
      os.replace(path + ".tmp", path)
  kept = filter_by_pass_rate(problems, rates, low, high)
  msg = f"difficulty filter [{low}, {high}]: kept {len(kept)} of {len(problems)} problems"
  print(msg, file=sys.stderr)
  if not kept:
    raise DataError(
      f"config.data.pass_rate_window=({low}, {high}) keeps none of {len(problems)} problems "
      f"(their pass rates: {path}); widen the window"
    )
  return kept
