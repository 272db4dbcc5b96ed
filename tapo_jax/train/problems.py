"""What a run trains and evaluates on: the configured files (or the toy domain's problems) and
the difficulty filter that keeps the problems at the initial policy's capability boundary."""

from __future__ import annotations

import json
import os
import sys

from tapo_jax import distributed, toy
from tapo_jax import eval as eval_lib
from tapo_jax.data import DataError, Problem, filter_by_pass_rate, load_problems
from tapo_jax.data.prompts import check_prompt_lengths


def training_problems(cfg) -> list[Problem]:
  """The configured training file, or generated toy problems for the toy model."""
  if cfg.data.train_path:
    return load_problems(cfg.data.train_path, cfg.data.layout)
  return toy.train_problems(cfg.model.toy, cfg.seed)


def eval_sets(cfg) -> dict[str, list[Problem]]:
  """{name: problems} from config eval.paths, or the toy model's held-out set."""
  if cfg.eval.paths:
    return eval_lib.load_eval_sets(cfg.eval.paths)
  return {cfg.model.toy: toy.eval_problems(cfg.model.toy, cfg.seed)}


def checked_eval_sets(cfg, tokenizer) -> dict[str, list[Problem]]:
  """eval_sets, loaded once before any work: a prompt longer than the largest prefill bucket
  (what the eval engine can take) is a DataError naming its file and row."""
  sets = eval_sets(cfg)
  for problems in sets.values():
    check_prompt_lengths(
      problems, cfg.data.prompt_template, tokenizer, max(cfg.rollout.prefill_buckets),
      cfg.data.use_chat_template, limit_key="max(rollout.prefill_buckets)",
    )  # fmt: skip
  return sets


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
