"""The built-in toy domains, each with a tiny checkpoint shipped beside its generator.

  arith   chained two-digit additions (2-4 terms); the checkpoint is trained on solutions only
  chain   mixed + - * chains over 3-6 steps with seeded train / held-out splits; the checkpoint
          is cold-started (worked solutions, then synthesis examples: tapo_jax.toy.teacher)

config.model.toy names one when config.model.path is empty; the run then trains on that domain's
generated problems and evaluates on its held-out set.
"""

from __future__ import annotations

import pathlib

from tapo_jax.data import Problem

DOMAINS = ("arith", "chain")
TRAIN_PROBLEMS = 4096
EVAL_PROBLEMS = 64


def _module(name: str):
  if name == "arith":
    from tapo_jax.toy import arith

    return arith
  if name == "chain":
    from tapo_jax.toy import chain

    return chain
  raise ValueError(f"no toy domain {name!r}: expected one of {', '.join(DOMAINS)}")


def checkpoint_dir(name: str) -> pathlib.Path:
  """The shipped checkpoint of toy domain `name`."""
  return _module(name).CHECKPOINT_DIR


def train_problems(name: str, seed: int, n: int = TRAIN_PROBLEMS) -> list[Problem]:
  """`n` generated training problems of domain `name`, deterministic in `seed`."""
  if name == "arith":
    from tapo_jax.toy import arith

    toy = arith.make_problems(n, seed=seed + 12345)
  else:
    toy = _module(name).make_split("train", n, seed=seed)
  return [
    Problem(id=f"{name}-{i}", problem=p.problem, answer=p.answer, solution=p.solution)
    for i, p in enumerate(toy)
  ]  # the worked solution: OPSD's reference solution


def eval_problems(name: str, seed: int, n: int = EVAL_PROBLEMS) -> list[Problem]:
  """`n` held-out problems of domain `name` (chain: the held-out split, disjoint from training)."""
  if name == "arith":
    from tapo_jax.toy import arith

    toy = arith.make_problems(n, seed=seed + 999)
  else:
    toy = _module(name).make_split("heldout", n, seed=0)  # one fixed held-out set for every run
  return [
    Problem(id=f"{name}-eval-{i}", problem=p.problem, answer=p.answer, solution=p.solution)
    for i, p in enumerate(toy)
  ]  # the worked solution: the chain toy's step reference (eval/reflection.py)
