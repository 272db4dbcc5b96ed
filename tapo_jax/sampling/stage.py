"""The one sample-and-grade stage of every mode: problems -> prompt ids -> n samples each from an
engine -> response texts as the verifier reads them -> rewards.

Legend: P problems, R = P * n rows (prompt-major, as `generate` returns them).

RL rollouts (train/rollouts.py), evaluation and the difficulty filter (eval/evaluate.py) and the
cold-start builder's rollouts (coldstart/build.py) all call `sample_and_grade`; rows that were not
sampled from a prompt (the policy's constructions) are graded by `grade`, the same decoding and
grading path (the text helpers it uses, shared with eval, are in tapo_jax/data/text.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tapo_jax.data.prompts import DEFAULT_TEMPLATE, format_prompts
from tapo_jax.data.text import decode_responses
from tapo_jax.sampling.driver import Generation, generate
from tapo_jax.sampling.sample import Sampling

GradeFn = Callable[[list[str], list[str]], Sequence[float]]  # (texts, golds) -> rewards


def grade(grade_fn: GradeFn, tokenizer, responses, golds, eos) -> np.ndarray:
  """Rewards [N] f32 of responses (token lists) against their golds: the one decoding and grading
  path of every row (originals, constructions, eval samples, cold-start data)."""
  texts = decode_responses(tokenizer, responses, eos)
  return _grade_texts(grade_fn, texts, golds)


def _grade_texts(grade_fn: GradeFn, texts: list[str], golds) -> np.ndarray:
  scores = np.asarray(grade_fn(texts, list(golds)), np.float32)
  if scores.shape != (len(texts),):
    raise ValueError(f"grade_fn returned {scores.shape[0]} scores for {len(texts)} responses")
  return scores


@dataclasses.dataclass(frozen=True)
class Graded:
  """n graded samples of each of P problems."""

  prompts: list[list[int]]  # P prompt ids
  generation: Generation  # R completions (EOS included when emitted), logprobs, truncated
  texts: list[str]  # R, as the verifier read them
  rewards: np.ndarray  # [R] f32
  sample_s: float  # seconds sampling
  grade_s: float  # seconds grading

  @property
  def tokens(self) -> int:
    """Tokens generated."""
    return sum(map(len, self.generation.completions))


def sample_and_grade(
  engine: Any,
  params: Any,
  problems: Sequence,
  sampling: Sampling,
  *,
  tokenizer: Any,
  grade_fn: GradeFn,
  n: int,
  max_new_tokens: int,
  seed: int = 0,
  template: str | None = DEFAULT_TEMPLATE,
  use_chat_template: bool = True,
  max_prompt_tokens: int | None = None,
  generate_fn: Callable = generate,
) -> Graded:
  """Prompts from `problems` (data.prompts.format_prompts), n samples each from `engine` with
  `params`, decoded and graded against each problem's `answer`."""
  prompts = format_prompts(problems, template, tokenizer, use_chat_template, max_prompt_tokens)
  t0 = time.time()
  gen = generate_fn(
    engine, params, prompts, sampling, n=n, max_new_tokens=max_new_tokens, seed=seed
  )
  rows = n * len(problems)
  if len(gen.completions) != rows:
    raise ValueError(f"generate returned {len(gen.completions)} completions, want {rows}")
  t1 = time.time()
  texts = decode_responses(tokenizer, gen.completions, sampling.eos_ids)
  rewards = _grade_texts(grade_fn, texts, [p.answer for p in problems for _ in range(n)])
  return Graded(prompts, gen, texts, rewards, t1 - t0, time.time() - t1)
