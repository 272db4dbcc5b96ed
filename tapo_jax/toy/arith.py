"""The toy arithmetic domain: chained additions with step-by-step solutions and a char tokenizer.

Problems look like "Compute 12+7+30." and solutions like "12+7=19\n19+30=49\n\\boxed{49}", one
step per line, so the rule-based `divergence` construction has real steps to cut at. The tiny model
that ships in `tapo_jax/toy/arith/` is trained on these by `python -m tapo_jax.build_toy` (1100
SFT steps, the byte-level tokenizer: spaces and newlines kept) and solves ~90% of them sampling at
temperature 1, ~74% at 1.3 (configs/smoke.py), where 58% of the queries get 2-6 of 8 samples right:
the zone where TAPO has right and wrong samples to contrast.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random

from tapo_jax.toy import tokenizer as toy_tokenizer

CHECKPOINT_DIR = pathlib.Path(__file__).parent / "arith"

# Token ids: the specials, then these characters in this order (the shipped checkpoint's layout).
CHARS = (
  "0123456789+-*/=()[].,;:!?'\" \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\\{}<>^_$"
)
SPECIALS, CHAT_TEMPLATE = toy_tokenizer.SPECIALS, toy_tokenizer.CHAT_TEMPLATE


@dataclasses.dataclass(frozen=True)
class ArithProblem:
  problem: str  # "Compute 12+7+30."
  answer: str  # "49"
  solution: str  # "12+7=19\n19+30=49\n\\boxed{49}"


def make_tokenizer():
  """The character-level tokenizer of this domain: one token per character of CHARS, keyed by
  byte-level symbols so that it survives `AutoTokenizer` (see tapo_jax.toy.tokenizer)."""
  return toy_tokenizer.make_tokenizer(CHARS)


def make_problem(rng: random.Random, min_terms: int = 2, max_terms: int = 4) -> ArithProblem:
  """One chained addition of 2-4 terms of up to two digits."""
  terms = [rng.randint(1, 99) for _ in range(rng.randint(min_terms, max_terms))]
  steps, acc = [], terms[0]
  for t in terms[1:]:
    steps.append(f"{acc}+{t}={acc + t}")
    acc += t
  steps.append(f"\\boxed{{{acc}}}")
  return ArithProblem(
    problem=f"Compute {'+'.join(map(str, terms))}.", answer=str(acc), solution="\n".join(steps)
  )


def make_problems(n: int, seed: int = 0, **kw) -> list[ArithProblem]:
  """`n` problems, deterministic in `seed`."""
  rng = random.Random(seed)
  return [make_problem(rng, **kw) for _ in range(n)]
